//! The gRPC adapter: proto ⇄ domain conversion, the identity interceptor, abuse limits, and the
//! one mapping of errors to statuses. It stays thin: every decision about presence is the
//! engine's.
pub mod codec;
mod contacts;
mod convert;
mod error;
pub mod limits;
mod observe;
mod presence;

use std::sync::Arc;

use tonic::{Request, Status};

use crate::auth::{AuthError, Identity, Verifier};

pub use contacts::ContactsService;
pub use error::ApiError;
pub use observe::ObserveLayer;
pub use presence::PresenceService;

/// Request-size limits checked at the edge, before any work.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Most ids in one GetPresence or WatchContacts.
    pub max_ids: usize,
    /// Most pairs in one AddContacts / RemoveContacts.
    pub max_pairs: usize,
    /// How long an Authenticate stream may wait before its hello.
    pub hello_timeout: std::time::Duration,
}

/// Builds the interceptor that verifies every call's credentials and puts the [`Identity`] in
/// the request's extensions. Rejections happen here, before any handler or state change.
pub fn identity_interceptor(
    verifier: Arc<Verifier>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let identity = {
            let md = req.metadata();
            verifier.verify(|name| md.get(name).and_then(|v| v.to_str().ok()))
        }
        .map_err(|e| match e {
            AuthError::Unauthenticated(m) => Status::unauthenticated(m),
            AuthError::Forbidden(m) => Status::permission_denied(m),
        })?;
        tracing::Span::current().record("caller", identity.describe());
        req.extensions_mut().insert(identity);
        Ok(req)
    }
}

/// The identity the interceptor verified.
fn identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified identity on this call"))
}
