//! Logs (tracing, pretty or JSON, RUST_LOG respected) and the Prometheus metrics endpoint.
use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Sends logs to stderr (stdout is kept for what commands print). Default level: info.
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Serves `/metrics` on its own listener. The recorder is process-wide (the `metrics` crate's
/// design), so only the first call in a process installs it.
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| {
            anyhow::anyhow!("cannot serve metrics on {addr} (PRESENCE_METRICS_LISTEN): {e}")
        })
}
