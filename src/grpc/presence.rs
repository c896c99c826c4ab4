//! The `presence.v1.Presence` service: identity in, validated domain values to the engine,
//! views back out as protos.
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Identity;
use crate::domain::{PresenceView, UserId, Viewer, now_millis, printable};
use crate::engine::{Engine, EventStream, Welcome};
use crate::pb::{self, client_message::Kind as ClientKind, server_message::Kind as ServerKind};

use bytes::Bytes;

use super::codec::frame;
use super::convert::{self, presence_to_proto};
use super::inbound::DeviceInbound;
use super::limits::{HelloGate, RateLimits};
use super::{ApiError, RequestLimits, identity};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Longest accepted device label, in characters.
pub const MAX_DEVICE_LABEL: usize = 64;

/// Most users in one welcome, snapshot or resync message: a larger list comes in pages, so a
/// user with a million contacts still connects (each page stays far below the message limit).
pub const PAGE: usize = 1000;

#[derive(Clone)]
pub struct PresenceService {
    engine: Engine,
    limits: RequestLimits,
    rates: Arc<RateLimits>,
    hellos: Arc<HelloGate>,
}

impl PresenceService {
    pub fn new(engine: Engine, limits: RequestLimits, rates: Arc<RateLimits>) -> Self {
        let hellos = HelloGate::new(limits.max_hello_pending_per_conn);
        PresenceService {
            engine,
            limits,
            rates,
            hellos,
        }
    }
}

/// The user a call acts as, or a clear refusal for a service that did not name one.
pub(super) fn acting_user(id: &Identity, rpc: &str) -> Result<UserId, ApiError> {
    id.user().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "{rpc} acts as a user: a service caller must name one with x-presence-user-id"
        ))
    })
}

/// Users, and services acting for a user, see through that user's eyes; services see all.
pub(super) fn viewer_of(id: &Identity) -> Viewer {
    match id.user() {
        Some(u) => Viewer::User(u),
        None => Viewer::Service,
    }
}

/// Tells the streams of one HTTP/2 connection apart from other connections' (by the peer's
/// address), so their deliveries are released together and their hellos counted together; 0
/// when the transport has no address.
pub(super) fn connection_key<T>(req: &Request<T>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    req.remote_addr().map_or(0, |a| {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(a)
    })
}

/// A device label as a client sent it: at most [`MAX_DEVICE_LABEL`] characters, no control or
/// format characters (it goes into logs).
pub(super) fn device_label(raw: &str, field: &str) -> Result<(), ApiError> {
    if raw.chars().count() > MAX_DEVICE_LABEL {
        return Err(ApiError::Invalid(format!(
            "{field} is longer than {MAX_DEVICE_LABEL} characters"
        )));
    }
    if printable(raw, MAX_DEVICE_LABEL) != raw {
        return Err(ApiError::Invalid(format!(
            "{field} must be printable: no control or format characters, got {:?}",
            printable(raw, MAX_DEVICE_LABEL)
        )));
    }
    Ok(())
}

/// A list of views cut into pages (at least one, possibly empty).
pub(super) fn pages(views: &[PresenceView]) -> Vec<Vec<pb::UserPresence>> {
    let mut pages: Vec<Vec<pb::UserPresence>> = views
        .chunks(PAGE)
        .map(|c| c.iter().map(presence_to_proto).collect())
        .collect();
    if pages.is_empty() {
        pages.push(Vec::new());
    }
    pages
}

/// A welcome in pages, each with the connection id and self; the last one marked.
pub(super) fn welcome_pages(w: &Welcome) -> Vec<pb::Welcome> {
    let pages = pages(&w.contacts);
    let n = pages.len();
    pages
        .into_iter()
        .enumerate()
        .map(|(i, contacts)| pb::Welcome {
            connection_id: w.connection_id.clone(),
            self_: Some(presence_to_proto(&w.self_view)),
            contacts,
            last_page: i + 1 == n,
        })
        .collect()
}

/// A resync in pages; the last one marked.
pub(super) fn resync_pages(views: &[PresenceView]) -> Vec<pb::Resync> {
    let pages = pages(views);
    let n = pages.len();
    pages
        .into_iter()
        .enumerate()
        .map(|(i, users)| pb::Resync {
            users,
            last_page: i + 1 == n,
        })
        .collect()
}

impl PresenceService {
    /// An Authenticate call up to its stream: the hello read and checked, the device connected.
    /// Returns the welcome's frames, the device's queue and the reader of what it sends next,
    /// which [`super::device`] runs on the stream's task.
    pub(super) async fn open_device(
        &self,
        req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<(Vec<Bytes>, EventStream, DeviceInbound), Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "Authenticate")?;
        let connection = connection_key(&req);
        let waiting = self.hellos.enter(connection)?;
        let mut inbound = req.into_inner();
        let hello = tokio::time::timeout(self.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                ApiError::DeadlineExceeded(format!(
                    "no hello within {} s (PRESENCE_HELLO_TIMEOUT_S)",
                    self.limits.hello_timeout.as_secs()
                ))
            })??;
        drop(waiting);
        let hello = match hello.and_then(|m| m.kind) {
            Some(ClientKind::Hello(h)) => h,
            Some(_) => {
                return Err(ApiError::FailedPrecondition(
                    "the first message on Authenticate must be hello".into(),
                )
                .into());
            }
            None => {
                return Err(ApiError::FailedPrecondition(
                    "the stream closed before its hello".into(),
                )
                .into());
            }
        };
        device_label(&hello.device, "hello.device")?;
        let platform = convert::platform_from_proto(hello.platform, "hello.platform")
            .map_err(ApiError::from)?;
        let session = self
            .engine
            .connect_device(user, platform)
            .await
            .map_err(ApiError::from)?;
        let welcome = &session.welcome;
        // No span lives as long as the device: one costs about 1.5 KiB for the whole
        // connection, and a device's task logs rarely; its few events name the device instead.
        tracing::debug!(
            user_id = %user,
            connection_id = %welcome.connection_id,
            device = %hello.device,
            "device connected"
        );
        let first: Vec<Bytes> = welcome_pages(welcome)
            .into_iter()
            .map(|w| {
                frame(&pb::ServerMessage {
                    kind: Some(ServerKind::Welcome(w)),
                })
            })
            .collect();
        let sub = session.stream.subscriber().clone();
        sub.set_wake_group(connection);
        let inbound = DeviceInbound::new(
            self.engine.clone(),
            self.rates.clone(),
            sub,
            user,
            inbound,
            id.expires_at,
        );
        Ok((first, session.stream, inbound))
    }

    /// A WatchContacts call up to its stream: the ids checked, the watch registered. Returns
    /// the snapshot's frames, the watch's queue and when the caller's token expires.
    pub(super) async fn open_watch(
        &self,
        req: Request<pb::WatchContactsRequest>,
    ) -> Result<(Vec<Bytes>, EventStream, Option<u64>), Status> {
        let id = identity(&req)?;
        let ids = convert::user_ids(&req.get_ref().user_ids, "user_ids", self.limits.max_ids)
            .map_err(ApiError::from)?;
        let viewer = viewer_of(&id);
        match viewer {
            Viewer::Service if ids.is_empty() => {
                return Err(ApiError::Invalid(
                    "user_ids is empty: a service caller has no contacts; list the users to watch"
                        .into(),
                )
                .into());
            }
            Viewer::User(u) => self.rates.presence_ids(u, ids.len())?,
            Viewer::Service => {}
        }
        let (stream, snapshot) = self
            .engine
            .watch(viewer, &ids)
            .await
            .map_err(ApiError::from)?;
        stream.subscriber().set_wake_group(connection_key(&req));
        let pages = pages(&snapshot);
        let n = pages.len();
        let first: Vec<Bytes> = pages
            .into_iter()
            .enumerate()
            .map(|(i, users)| {
                frame(&pb::WatchContactsResponse {
                    kind: Some(pb::watch_contacts_response::Kind::Snapshot(pb::Snapshot {
                        users,
                        last_page: i + 1 == n,
                    })),
                })
            })
            .collect();
        Ok((first, stream, id.expires_at))
    }
}

#[tonic::async_trait]
impl pb::presence_server::Presence for PresenceService {
    type AuthenticateStream = BoxStream<pb::ServerMessage>;

    /// Never called: [`super::device::DeviceRoutes`] answers this path before tonic's router
    /// would (see there why).
    async fn authenticate(
        &self,
        _req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<Self::AuthenticateStream>, Status> {
        Err(Status::internal(
            "Authenticate is served by the device route, not the generated server",
        ))
    }

    async fn update_status(
        &self,
        req: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::UpdateStatusResponse>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "UpdateStatus")?;
        let status =
            convert::status_from_proto(req.get_ref().status, "status").map_err(ApiError::from)?;
        self.rates.status_change(user)?;
        let view = self
            .engine
            .update_status(user, status)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::UpdateStatusResponse {
            presence: Some(presence_to_proto(&view)),
        }))
    }

    async fn get_presence(
        &self,
        req: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let id = identity(&req)?;
        let ids = convert::user_ids(&req.get_ref().user_ids, "user_ids", self.limits.max_ids)
            .map_err(ApiError::from)?;
        let viewer = viewer_of(&id);
        if let Viewer::User(u) = viewer {
            self.rates.presence_ids(u, ids.len())?;
        }
        let views = self
            .engine
            .get_presence(viewer, &ids)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetPresenceResponse {
            users: views.iter().map(presence_to_proto).collect(),
        }))
    }

    type WatchContactsStream = BoxStream<pb::WatchContactsResponse>;

    /// Never called: [`super::device::DeviceRoutes`] answers this path before tonic's router
    /// would.
    async fn watch_contacts(
        &self,
        _req: Request<pb::WatchContactsRequest>,
    ) -> Result<Response<Self::WatchContactsStream>, Status> {
        Err(Status::internal(
            "WatchContacts is served by the device route, not the generated server",
        ))
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let id = identity(&req)?;
        if !id.is_service() {
            return Err(
                ApiError::PermissionDenied("GetStats is for service callers only".into()).into(),
            );
        }
        let s = self.engine.stats();
        Ok(Response::new(pb::GetStatsResponse {
            online_users: s.online_users,
            connections: s.connections,
            watchers: s.watchers,
            changes: s.changes,
            deliveries: s.deliveries,
            db_statements: s.db_statements,
            db_rows: s.db_rows,
            coalesced: s.coalesced,
            passive_skipped: s.passive_skipped,
        }))
    }

    async fn set_privacy(
        &self,
        req: Request<pb::SetPrivacyRequest>,
    ) -> Result<Response<pb::PrivacySettings>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "SetPrivacy")?;
        let current = self.engine.privacy(user).await.map_err(ApiError::from)?;
        let privacy = convert::privacy_from_proto(req.into_inner().settings, current)
            .map_err(ApiError::from)?;
        self.rates.status_change(user)?;
        let saved = self
            .engine
            .set_privacy(user, privacy)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::privacy_to_proto(saved)))
    }

    async fn get_privacy(
        &self,
        req: Request<pb::GetPrivacyRequest>,
    ) -> Result<Response<pb::PrivacySettings>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "GetPrivacy")?;
        let p = self.engine.privacy(user).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::privacy_to_proto(p)))
    }

    async fn set_custom_status(
        &self,
        req: Request<pb::SetCustomStatusRequest>,
    ) -> Result<Response<pb::UserPresence>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "SetCustomStatus")?;
        let custom = convert::custom_from_proto(
            req.into_inner().custom_status,
            "custom_status",
            now_millis(),
        )
        .map_err(ApiError::from)?;
        self.rates.status_change(user)?;
        let view = self
            .engine
            .set_custom_status(user, custom)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(presence_to_proto(&view)))
    }
}
