//! `presence health`: a gRPC health check for container probes.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// Prints the status; exit 0 only when SERVING.
pub async fn check(
    addr: SocketAddr,
    service: String,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let reply = client.check(HealthCheckRequest { service }).await?;
        anyhow::Ok(reply.into_inner().status())
    };
    let (line, code) = match tokio::time::timeout(timeout, check).await {
        Ok(Ok(ServingStatus::Serving)) => ("SERVING".to_string(), 0),
        Ok(Ok(status)) => (status.as_str_name().to_string(), 1),
        Ok(Err(e)) => (format!("UNREACHABLE: {e}"), 1),
        Err(_) => (format!("UNREACHABLE: no answer within {timeout:?}"), 1),
    };
    println!("{line}");
    Ok(ExitCode::from(code))
}
