//! The single mapping from errors to gRPC statuses: every refusal of the API goes through it.
//! Internal causes are logged here and never sent to clients.
use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::domain::InvalidInput;
use crate::engine::{EndReason, EngineError};

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The stream's token expired.
    #[error("{0}")]
    Expired(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::Invalid(e.0)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => ApiError::Unauthenticated(m),
            AuthError::Forbidden(m) => ApiError::PermissionDenied(m),
        }
    }
}

impl From<EndReason> for ApiError {
    fn from(reason: EndReason) -> Self {
        match reason {
            EndReason::Shutdown => ApiError::Engine(EngineError::ShuttingDown),
            EndReason::Expired => ApiError::Expired("the token of this stream expired".into()),
            EndReason::InvalidInput(m) => ApiError::Invalid(m),
            EndReason::LimitExceeded(m) => ApiError::RateLimited(m),
        }
    }
}

/// A retry hint for a refused set-up: gRPC's standard `grpc-retry-pushback-ms`, jittered so
/// that refused clients do not all come back at once.
fn with_pushback(mut status: Status) -> Status {
    let hint = 500 + rand::random::<u32>() % 1500;
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", hint.into());
    status
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Unauthenticated(m) | ApiError::Expired(m) => Status::unauthenticated(m),
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::RateLimited(m) => Status::resource_exhausted(m),
            ApiError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ApiError::Engine(e) => match e {
                EngineError::TooManyDevices { .. } => {
                    Status::resource_exhausted(format!("{e} (PRESENCE_MAX_DEVICES)"))
                }
                EngineError::TooManyWatches { .. } => {
                    Status::resource_exhausted(format!("{e} (PRESENCE_MAX_WATCHES)"))
                }
                EngineError::UserBusy { .. } => with_pushback(Status::resource_exhausted(format!(
                    "{e} (PRESENCE_MAX_PENDING_SETUPS_PER_USER); retry after grpc-retry-pushback-ms"
                ))),
                EngineError::ShuttingDown => {
                    Status::unavailable("the server is shutting down; reconnect to another node")
                }
                EngineError::Closed => Status::cancelled("the stream closed while it was set up"),
                EngineError::Busy => with_pushback(Status::unavailable(
                    "too many streams are being set up (a reconnect wave); retry after grpc-retry-pushback-ms",
                )),
                EngineError::Unstable(_) => {
                    tracing::warn!(error = %e, "a user's entry could not be loaded");
                    Status::unavailable("presence of this user is being reloaded; retry")
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

/// The gRPC code and message of an error, for protocols that carry them in a message (the
/// relay's results and ended sessions).
pub fn code_and_message(e: ApiError) -> (i32, String) {
    let status = Status::from(e);
    (status.code() as i32, status.message().to_string())
}
