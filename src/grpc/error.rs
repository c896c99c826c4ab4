//! The single mapping from errors to gRPC statuses. Internal causes are logged here and never
//! sent to clients.
use tonic::{Code, Status};

use crate::domain::InvalidInput;
use crate::engine::EngineError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    RateLimited(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::Invalid(e.0)
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::RateLimited(m) => Status::resource_exhausted(m),
            ApiError::Engine(e) => match e {
                EngineError::TooManyDevices { .. } => Status::resource_exhausted(e.to_string()),
                EngineError::ShuttingDown => {
                    Status::unavailable("the server is shutting down; reconnect to another node")
                }
                EngineError::Closed => Status::cancelled("the stream closed while it was set up"),
                EngineError::Busy => {
                    let mut status = Status::unavailable(
                        "too many streams are being set up (a reconnect wave); retry after grpc-retry-pushback-ms",
                    );
                    // gRPC's standard retry hint for clients with a retry policy.
                    // Jittered, so that refused clients do not all come back at once.
                    let hint = 500 + rand::random::<u32>() % 1500;
                    status
                        .metadata_mut()
                        .insert("grpc-retry-pushback-ms", hint.into());
                    status
                }
                EngineError::Store(cause) => {
                    tracing::error!(error = %cause, "store error while serving a call");
                    metrics::counter!("presence_store_errors_total").increment(1);
                    Status::new(
                        Code::Unavailable,
                        "presence storage is unavailable; retry later",
                    )
                }
            },
        }
    }
}
