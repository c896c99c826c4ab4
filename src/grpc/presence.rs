//! The `presence.v1.Presence` service: identity in, validated domain values to the engine,
//! views back out as protos.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Identity;
use crate::domain::{UserId, Viewer};
use crate::engine::{EndReason, Engine, Event, Subscriber};
use crate::pb::{self, client_message::Kind as ClientKind, server_message::Kind as ServerKind};

use super::convert::{self, presence_to_proto};
use super::limits::RateLimits;
use super::{ApiError, RequestLimits, identity};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Longest accepted device label.
const MAX_DEVICE_LABEL: usize = 64;

#[derive(Clone)]
pub struct PresenceService {
    engine: Engine,
    limits: RequestLimits,
    rates: Arc<RateLimits>,
}

impl PresenceService {
    pub fn new(engine: Engine, limits: RequestLimits, rates: Arc<RateLimits>) -> Self {
        PresenceService {
            engine,
            limits,
            rates,
        }
    }
}

/// The user a call acts as, or a clear refusal for a service that did not name one.
fn acting_user(id: &Identity, rpc: &str) -> Result<UserId, ApiError> {
    id.user().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "{rpc} acts as a user: a service caller must name one with x-presence-user-id"
        ))
    })
}

/// Users, and services acting for a user, see through that user's eyes; services see all.
fn viewer_of(id: &Identity) -> Viewer {
    match id.user() {
        Some(u) => Viewer::User(u),
        None => Viewer::Service,
    }
}

/// Tells the streams of one HTTP/2 connection apart from other connections' (by the peer's
/// address), so their deliveries are released together; 0 when the transport has no address.
fn wake_group<T>(req: &Request<T>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    req.remote_addr().map_or(0, |a| {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(a)
    })
}

fn end_status(reason: &EndReason) -> Status {
    match reason {
        EndReason::Shutdown => {
            Status::unavailable("the server is shutting down; reconnect (to another node)")
        }
        EndReason::Expired => Status::unauthenticated("the token of this stream expired"),
        EndReason::InvalidInput(m) => Status::invalid_argument(m.clone()),
        EndReason::LimitExceeded(m) => Status::resource_exhausted(m.clone()),
    }
}

#[tonic::async_trait]
impl pb::presence_server::Presence for PresenceService {
    type AuthenticateStream = BoxStream<pb::ServerMessage>;

    async fn authenticate(
        &self,
        req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<Self::AuthenticateStream>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "Authenticate")?;
        let group = wake_group(&req);
        let mut inbound = req.into_inner();
        let hello = tokio::time::timeout(self.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {} s (PRESENCE_HELLO_TIMEOUT_S)",
                    self.limits.hello_timeout.as_secs()
                ))
            })??;
        let device = match hello.and_then(|m| m.kind) {
            Some(ClientKind::Hello(h)) => h.device,
            Some(_) => {
                return Err(Status::failed_precondition(
                    "the first message on Authenticate must be hello",
                ));
            }
            None => {
                return Err(Status::failed_precondition(
                    "the stream closed before its hello",
                ));
            }
        };
        if device.chars().count() > MAX_DEVICE_LABEL {
            return Err(Status::invalid_argument(format!(
                "hello.device is longer than {MAX_DEVICE_LABEL} characters"
            )));
        }
        let session = self
            .engine
            .connect_device(user)
            .await
            .map_err(ApiError::from)?;
        let welcome = &session.welcome;
        // No span lives as long as the device: one costs about 1.5 KiB for the whole
        // connection, and a device's task logs rarely; its few events name the device instead.
        tracing::debug!(
            user_id = %user,
            connection_id = %welcome.connection_id,
            device = %device,
            "device connected"
        );
        let first = pb::ServerMessage {
            kind: Some(ServerKind::Welcome(pb::Welcome {
                connection_id: welcome.connection_id.clone(),
                self_: Some(presence_to_proto(&welcome.self_view)),
                contacts: welcome.contacts.iter().map(presence_to_proto).collect(),
            })),
        };
        let sub = session.stream.subscriber().clone();
        sub.set_wake_group(group);
        let inbound_task = InboundTask {
            engine: self.engine.clone(),
            rates: self.rates.clone(),
            sub,
            user,
            expires_at: id.expires_at,
        };
        tokio::spawn(inbound_task.run(inbound));
        let updates = session.stream.map(|event| match event {
            Event::Presence(v) => Ok(pb::ServerMessage {
                kind: Some(ServerKind::PresenceUpdated(presence_to_proto(&v))),
            }),
            Event::Pong(nonce) => Ok(pb::ServerMessage {
                kind: Some(ServerKind::Pong(pb::Pong { nonce })),
            }),
            Event::End(reason) => Err(end_status(&reason)),
        });
        Ok(Response::new(Box::pin(
            stream::once(async { Ok(first) }).chain(updates),
        )))
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

    async fn watch_contacts(
        &self,
        req: Request<pb::WatchContactsRequest>,
    ) -> Result<Response<Self::WatchContactsStream>, Status> {
        let id = identity(&req)?;
        let ids = convert::user_ids(&req.get_ref().user_ids, "user_ids", self.limits.max_ids)
            .map_err(ApiError::from)?;
        let viewer = viewer_of(&id);
        if viewer == Viewer::Service && ids.is_empty() {
            return Err(ApiError::Invalid(
                "user_ids is empty: a service caller has no contacts; list the users to watch"
                    .into(),
            )
            .into());
        }
        let (stream, snapshot) = self
            .engine
            .watch(viewer, &ids)
            .await
            .map_err(ApiError::from)?;
        stream.subscriber().set_wake_group(wake_group(&req));
        let first = pb::WatchContactsResponse {
            kind: Some(pb::watch_contacts_response::Kind::Snapshot(pb::Snapshot {
                users: snapshot.iter().map(presence_to_proto).collect(),
            })),
        };
        let updates = stream.filter_map(|event| async move {
            match event {
                Event::Presence(v) => Some(Ok(pb::WatchContactsResponse {
                    kind: Some(pb::watch_contacts_response::Kind::PresenceUpdated(
                        presence_to_proto(&v),
                    )),
                })),
                Event::Pong(_) => None,
                Event::End(reason) => Some(Err(end_status(&reason))),
            }
        });
        Ok(Response::new(Box::pin(
            stream::once(async { Ok(first) }).chain(updates),
        )))
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let id = identity(&req)?;
        if !id.is_service() {
            return Err(Status::permission_denied(
                "GetStats is for service callers only",
            ));
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
        }))
    }

    async fn set_privacy(
        &self,
        req: Request<pb::SetPrivacyRequest>,
    ) -> Result<Response<pb::PrivacySettings>, Status> {
        let id = identity(&req)?;
        let user = acting_user(&id, "SetPrivacy")?;
        let privacy =
            convert::privacy_from_proto(req.into_inner().settings).map_err(ApiError::from)?;
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
}

/// Reads what a device sends after its hello, for as long as the device is connected.
struct InboundTask {
    engine: Engine,
    rates: Arc<RateLimits>,
    sub: Arc<Subscriber>,
    user: UserId,
    /// When the stream's token expires (Unix seconds).
    expires_at: Option<u64>,
}

impl InboundTask {
    async fn run(self, mut inbound: Streaming<pb::ClientMessage>) {
        let expiry = async {
            match self.expires_at {
                Some(exp) => {
                    let left = exp.saturating_sub(crate::auth::unix_now());
                    tokio::time::sleep(Duration::from_secs(left)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        // A client that half-closes its side stays connected until it goes away.
        let mut open = true;
        loop {
            tokio::select! {
                msg = inbound.message(), if open => match msg {
                    Ok(Some(m)) => {
                        // Boxed: a future is as large as its largest state, and this rare one
                        // (a status change through the engine) made the task that every
                        // connected device keeps for hours 1,552 bytes instead of 856.
                        if let Err(reason) = Box::pin(self.handle(m)).await {
                            tracing::info!(
                                user_id = %self.user,
                                connection_id = %self.engine.connection_id(&self.sub),
                                ?reason,
                                "ending a device stream on a bad message"
                            );
                            self.sub.end(reason);
                            return;
                        }
                    }
                    Ok(None) => open = false,
                    Err(_) => return,
                },
                _ = self.sub.ended() => return,
                _ = &mut expiry => {
                    tracing::info!(
                        user_id = %self.user,
                        connection_id = %self.engine.connection_id(&self.sub),
                        "token expired; ending the device stream"
                    );
                    self.sub.end(EndReason::Expired);
                    return;
                }
            }
            if self.sub.is_closed() {
                return;
            }
        }
    }

    async fn handle(&self, msg: pb::ClientMessage) -> Result<(), EndReason> {
        match msg.kind {
            Some(ClientKind::Ping(p)) => {
                self.sub.pong(p.nonce);
                Ok(())
            }
            Some(ClientKind::UpdateStatus(u)) => {
                let status = convert::status_from_proto(u.status, "update_status.status")
                    .map_err(|e| EndReason::InvalidInput(e.0))?;
                self.rates
                    .status_change(self.user)
                    .map_err(|e| EndReason::LimitExceeded(e.to_string()))?;
                if let Err(e) = self.engine.update_status(self.user, status).await {
                    // A store failure must not end the device: the status is kept in memory
                    // whenever the entry is there; report and carry on.
                    tracing::warn!(
                        user_id = %self.user,
                        connection_id = %self.engine.connection_id(&self.sub),
                        error = %e,
                        "update_status on a device stream failed"
                    );
                }
                Ok(())
            }
            Some(ClientKind::Hello(_)) => Err(EndReason::InvalidInput(
                "hello was already received on this stream".into(),
            )),
            None => Err(EndReason::InvalidInput(
                "empty ClientMessage: set one of hello, update_status, ping".into(),
            )),
        }
    }
}
