//! The `presence.v1.Contacts` service: service callers maintain who is whose contact.
use tonic::{Request, Response, Status};

use crate::domain::UserId;
use crate::engine::Engine;
use crate::pb;

use super::convert;
use super::{ApiError, RequestLimits, identity};

/// Default and largest ListContacts page.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Clone)]
pub struct ContactsService {
    engine: Engine,
    limits: RequestLimits,
}

impl ContactsService {
    pub fn new(engine: Engine, limits: RequestLimits) -> Self {
        ContactsService { engine, limits }
    }
}

fn require_service<T>(req: &Request<T>, rpc: &str) -> Result<(), ApiError> {
    if identity(req)?.is_service() {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "{rpc} is for service callers only"
        )))
    }
}

#[tonic::async_trait]
impl pb::contacts_server::Contacts for ContactsService {
    async fn add_contacts(
        &self,
        req: Request<pb::AddContactsRequest>,
    ) -> Result<Response<pb::AddContactsResponse>, Status> {
        require_service(&req, "AddContacts")?;
        let pairs =
            convert::pairs(&req.get_ref().pairs, self.limits.max_pairs).map_err(ApiError::from)?;
        self.engine
            .add_contacts(&pairs)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::AddContactsResponse {}))
    }

    async fn remove_contacts(
        &self,
        req: Request<pb::RemoveContactsRequest>,
    ) -> Result<Response<pb::RemoveContactsResponse>, Status> {
        require_service(&req, "RemoveContacts")?;
        let pairs =
            convert::pairs(&req.get_ref().pairs, self.limits.max_pairs).map_err(ApiError::from)?;
        self.engine
            .remove_contacts(&pairs)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RemoveContactsResponse {}))
    }

    async fn list_contacts(
        &self,
        req: Request<pb::ListContactsRequest>,
    ) -> Result<Response<pb::ListContactsResponse>, Status> {
        require_service(&req, "ListContacts")?;
        let r = req.get_ref();
        let user = convert::one_user_id(r.user_id, "user_id").map_err(ApiError::from)?;
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::Invalid(format!(
                    "page_size {n} is above the maximum of {MAX_PAGE}"
                ))
                .into());
            }
            n => n,
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(UserId::parse_str(&r.page_token).map_err(|_| {
                ApiError::Invalid("page_token is not one this server returned".into())
            })?)
        };
        let ids = self
            .engine
            .list_contacts(user, after, limit + 1)
            .await
            .map_err(ApiError::from)?;
        let more = ids.len() > limit as usize;
        let page: Vec<u64> = ids.iter().take(limit as usize).map(|u| u.get()).collect();
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => last.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListContactsResponse {
            contact_ids: page,
            next_page_token,
        }))
    }
}
