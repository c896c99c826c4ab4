//! A tower layer around every RPC: a tracing span per call, a counter and a latency histogram by
//! method and gRPC code. For streaming calls the latency is the time to the response headers
//! (the stream's setup), and the code is the one known then (errors at setup, else OK).
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};
use tracing::Instrument;

#[derive(Clone, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("/");
        let span = tracing::info_span!(
            "rpc",
            %method,
            caller = tracing::field::Empty,
            code = tracing::field::Empty
        );
        let started = Instant::now();
        // Entered while the inner service is called, so the identity layer (which runs
        // synchronously in `call`) can record the caller on this span.
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let result = fut.await;
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .unwrap_or(tonic::Code::Ok),
                    Err(_) => tonic::Code::Internal,
                };
                let elapsed = started.elapsed();
                tracing::Span::current().record("code", tracing::field::debug(code));
                tracing::debug!(?elapsed, "rpc answered");
                let code = format!("{code:?}");
                metrics::counter!("presence_rpc_total", "method" => method.clone(), "code" => code.clone())
                    .increment(1);
                metrics::histogram!("presence_rpc_seconds", "method" => method, "code" => code)
                    .record(elapsed.as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}
