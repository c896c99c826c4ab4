//! A tower layer around every RPC: a tracing span per call, a counter and a latency histogram by
//! method and gRPC code. For streaming calls the latency is the time to the response headers
//! (the stream's setup), and the code is the one known then (errors at setup, else OK).
//!
//! The method label comes from the set of methods this server has; any other path (anyone can
//! send any path, before any identity check) is counted as `unknown`, so that labels, and the
//! memory they take, are bounded by the contract, not by what clients send.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};
use tracing::Instrument;

/// Every method path this server serves, as `Service/Method` labels.
const METHODS: &[&str] = &[
    "presence.v1.Presence/Authenticate",
    "presence.v1.Presence/UpdateStatus",
    "presence.v1.Presence/GetPresence",
    "presence.v1.Presence/WatchContacts",
    "presence.v1.Presence/GetStats",
    "presence.v1.Presence/SetPrivacy",
    "presence.v1.Presence/GetPrivacy",
    "presence.v1.Presence/SetCustomStatus",
    "presence.v1.Contacts/AddContacts",
    "presence.v1.Contacts/RemoveContacts",
    "presence.v1.Contacts/ListContacts",
    "presence.v1.RelayService/Relay",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The label of a request path: one of [`METHODS`], or `unknown`.
fn method_label(path: &str) -> &'static str {
    let method = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

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
        let method = method_label(req.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method,
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
                metrics::counter!("presence_rpc_total", "method" => method, "code" => code.clone())
                    .increment(1);
                metrics::histogram!("presence_rpc_seconds", "method" => method, "code" => code)
                    .record(elapsed.as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_method_of_the_contract_has_its_label_and_nothing_else_does() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert_ne!(method_label(&path), "unknown", "{path} has a label");
                }
            }
        }
        assert_eq!(method_label("/x.Y/Z"), "unknown");
        assert_eq!(method_label(&format!("/{}", "a".repeat(4000))), "unknown");
    }
}
