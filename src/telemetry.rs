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
    // The Redis client logs every reconnect attempt during a failover as a warning; the node
    // says once, itself, that Redis is unreachable and when it is back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("redis=error".parse().expect("a valid directive"));
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

/// Publishes the engine's counters as metrics, and the store's state as the health of
/// `presence.store`, once a second. Sampling keeps metrics calls off the engine's hot paths.
pub async fn sample_engine(
    engine: crate::engine::Engine,
    health: tonic_health::server::HealthReporter,
) {
    use tonic_health::ServingStatus;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut store_ok = true;
    let mut cluster_ok = true;
    loop {
        tick.tick().await;
        let s = engine.stats();
        metrics::gauge!("presence_online_users").set(s.online_users as f64);
        metrics::gauge!("presence_connections").set(s.connections as f64);
        metrics::gauge!("presence_watchers").set(s.watchers as f64);
        metrics::gauge!("presence_write_behind_dirty_users").set(s.dirty_users as f64);
        metrics::gauge!("presence_store_up").set(if engine.store_ok() { 1.0 } else { 0.0 });
        // Only a node of a cluster has a Redis to be up or down: a single node's 1 would
        // tell an alert on this metric that a Redis exists.
        if engine.is_cluster() {
            metrics::gauge!("presence_redis_up").set(if engine.cluster_ok() { 1.0 } else { 0.0 });
        }
        metrics::counter!("presence_changes_total").absolute(s.changes);
        metrics::counter!("presence_deliveries_total").absolute(s.deliveries);
        metrics::counter!("presence_coalesced_total").absolute(s.coalesced);
        metrics::counter!("presence_db_statements_total").absolute(s.db_statements);
        metrics::counter!("presence_db_rows_total").absolute(s.db_rows);
        metrics::counter!("presence_db_errors_total").absolute(s.db_errors);
        if engine.store_ok() != store_ok {
            store_ok = engine.store_ok();
            let status = if store_ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(STORE_HEALTH, status).await;
        }
        if engine.cluster_ok() != cluster_ok {
            cluster_ok = engine.cluster_ok();
            let status = if cluster_ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(CLUSTER_HEALTH, status).await;
        }
    }
}

/// Health name of the cluster component: NOT_SERVING while Redis does not answer (the node
/// then serves from its own memory).
pub const CLUSTER_HEALTH: &str = "presence.cluster";

/// Health name of the store component: NOT_SERVING while writes to the database fail.
pub const STORE_HEALTH: &str = "presence.store";
