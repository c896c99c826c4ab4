//! `presence.v1.RelayService`: one stream per proxy process (the socket.io edge) carrying many
//! device sessions. Each session is a device like an Authenticate stream (same engine calls,
//! same rules, limits and token expiry), but every change is delivered once per relay stream,
//! grouped by identical view with the sessions that see it so: the proxy encodes each group
//! once. Commands of one session are handled in order; a session still opening keeps its
//! commands until its welcome is out.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Verifier;
use crate::domain::{PresenceView, UserId, Viewer, now_millis};
use crate::engine::{Engine, Event, EventStream, RelayQueue, Subscriber};
use crate::pb::{self, relay_request::Kind as Cmd, relay_response::Kind as Out};

use super::convert::{self, presence_to_proto};
use super::error::code_and_message;
use super::limits::RateLimits;
use super::presence::{device_label, resync_pages, welcome_pages};
use super::{ApiError, RequestLimits, identity};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Events taken from the relay queue per poll.
const DRAIN: usize = 4096;
/// A delivery is sent once it holds about this many bytes.
const DELIVERY_BYTES: usize = 256 * 1024;
/// Results (answers and refusals) waiting to be sent before the stream stops reading commands.
const RESULTS: usize = 1024;

#[derive(Clone)]
pub struct RelayService {
    engine: Engine,
    limits: RequestLimits,
    rates: Arc<RateLimits>,
    verifier: Arc<Verifier>,
}

impl RelayService {
    pub fn new(
        engine: Engine,
        limits: RequestLimits,
        rates: Arc<RateLimits>,
        verifier: Arc<Verifier>,
    ) -> Self {
        RelayService {
            engine,
            limits,
            rates,
            verifier,
        }
    }
}

#[tonic::async_trait]
impl pb::relay_service_server::RelayService for RelayService {
    type RelayStream = BoxStream<pb::RelayResponse>;

    async fn relay(
        &self,
        req: Request<Streaming<pb::RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let id = identity(&req)?;
        if !id.is_service() || id.acting_for.is_some() {
            return Err(ApiError::PermissionDenied(
                "RelayService/Relay is for service callers only (not acting for a user)".into(),
            )
            .into());
        }
        let queue = self.engine.relay_queue();
        let (results, results_rx) = mpsc::channel(RESULTS);
        let mut expiries = BTreeSet::new();
        // The stream's own credential expires too (session 0 stands for the stream).
        if let Some(exp) = id.expires_at {
            expiries.insert((exp, STREAM));
        }
        let service_name = match &id.credential {
            crate::auth::Credential::Service(name) => name.clone(),
            crate::auth::Credential::User(_) => String::new(),
        };
        let inbound = Inbound {
            service: self.clone(),
            service_name,
            queue: queue.clone(),
            results,
            sessions: HashMap::new(),
            expiries,
        };
        tokio::spawn(inbound.run(req.into_inner()));
        Ok(Response::new(Box::pin(Outbound {
            queue,
            results: results_rx,
            ready: VecDeque::new(),
            done: false,
            results_done: false,
        })))
    }
}

/// One session of a relay stream.
enum Session {
    /// Its open runs; commands wait here.
    Opening {
        waiting: Vec<Cmd>,
        closed: bool,
    },
    Open(Box<OpenSession>),
}

struct OpenSession {
    user: UserId,
    sub: Arc<Subscriber>,
    /// Dropping it disconnects the device.
    _stream: EventStream,
}

/// What a finished open reports to the command loop.
struct Opened {
    session: u64,
    outcome: Result<OpenSession, ApiError>,
    expires_at: Option<u64>,
}

/// The session id that stands for the relay stream itself in [`Inbound::expiries`] (real
/// sessions are never 0).
const STREAM: u64 = 0;

/// What the command loop and the reads it starts send out: results, or the error that ends the
/// stream.
type Outgoing = Result<pb::RelayResponse, Status>;

/// Reads the commands of one relay stream, in order.
struct Inbound {
    service: RelayService,
    /// The service the stream belongs to: a refreshed credential must name it too.
    service_name: String,
    queue: Arc<RelayQueue>,
    results: mpsc::Sender<Outgoing>,
    sessions: HashMap<u64, Session>,
    /// When credentials expire: (Unix seconds, session), [`STREAM`] for the stream's own.
    expiries: BTreeSet<(u64, u64)>,
}

impl Inbound {
    async fn run(mut self, mut inbound: Streaming<pb::RelayRequest>) {
        let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Opened>();
        // The proxy closed its side: sessions still opening get their welcome (or refusal),
        // then the stream ends, cleanly, and its sessions with it.
        let mut half_closed = false;
        loop {
            if half_closed
                && !self
                    .sessions
                    .values()
                    .any(|s| matches!(s, Session::Opening { .. }))
            {
                break;
            }
            let next_expiry = self.expiries.first().map(|(at, _)| *at);
            let expiry = async {
                match next_expiry {
                    Some(at) => {
                        let left = at.saturating_sub(crate::auth::unix_now());
                        tokio::time::sleep(Duration::from_secs(left)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = inbound.message(), if !half_closed => match msg {
                    Ok(Some(m)) => {
                        if let Some(cmd) = m.kind {
                            self.command(cmd, &opened_tx).await;
                        }
                    }
                    Ok(None) => half_closed = true,
                    // The proxy went away: every session goes with it (each a device leaving,
                    // with the grace).
                    Err(_) => break,
                },
                Some(opened) = opened_rx.recv() => self.opened(opened, &opened_tx).await,
                _ = expiry => {
                    if !self.expire_sessions().await {
                        break;
                    }
                }
                // The response side is done (the server ends the stream, or the proxy reset
                // it): the request side is let go too, so the connection can close.
                _ = self.results.closed() => break,
            }
            if self.results.is_closed() {
                break;
            }
        }
        self.queue.close();
    }

    /// Sends a result; false when the stream is gone.
    async fn send(&self, kind: Out) -> bool {
        self.results
            .send(Ok(pb::RelayResponse { kind: Some(kind) }))
            .await
            .is_ok()
    }

    async fn refuse(&self, session: u64, request_id: u64, e: ApiError) {
        let (code, message) = code_and_message(e);
        self.send(Out::Result(pb::RelayResult {
            session_id: session,
            request_id,
            code,
            message,
            ..Default::default()
        }))
        .await;
    }

    async fn end_session(&self, session: u64, e: ApiError) {
        let (code, message) = code_and_message(e);
        self.send(Out::Ended(pb::RelaySessionEnded {
            session_id: session,
            code,
            message,
        }))
        .await;
    }

    async fn command(&mut self, cmd: Cmd, opened_tx: &mpsc::UnboundedSender<Opened>) {
        let session = session_of(&cmd);
        if let Cmd::Ping(p) = cmd {
            self.queue.push(0, Event::Pong(p.nonce));
            return;
        }
        if let Cmd::Refresh(r) = cmd {
            match self.refresh(&r.service_token) {
                Ok(()) => {
                    self.send(Out::Result(pb::RelayResult {
                        request_id: r.request_id,
                        ..Default::default()
                    }))
                    .await;
                }
                Err(e) => self.refuse(STREAM, r.request_id, e).await,
            }
            return;
        }
        if let Cmd::Open(open) = cmd {
            if let Err(e) = self.open(open, opened_tx) {
                self.end_session(session, e).await;
            }
            return;
        }
        match self.sessions.get_mut(&session) {
            Some(Session::Opening { waiting, closed }) => {
                if matches!(cmd, Cmd::Close(_)) {
                    *closed = true;
                } else {
                    waiting.push(cmd);
                }
            }
            Some(Session::Open(_)) => self.run_command(session, cmd).await,
            None => {
                if !matches!(cmd, Cmd::Close(_)) {
                    let request_id = request_of(&cmd);
                    self.refuse(
                        session,
                        request_id,
                        ApiError::FailedPrecondition(format!(
                            "session {session} is not open on this relay stream"
                        )),
                    )
                    .await;
                }
            }
        }
    }

    /// Checks an open and starts it; its welcome is queued when the device is registered.
    fn open(
        &mut self,
        open: pb::RelayOpen,
        opened_tx: &mpsc::UnboundedSender<Opened>,
    ) -> Result<(), ApiError> {
        let session = open.session_id;
        if session == 0 {
            return Err(ApiError::Invalid("open.session_id must not be 0".into()));
        }
        if self.sessions.contains_key(&session) {
            return Err(ApiError::FailedPrecondition(format!(
                "session {session} is already open on this relay stream"
            )));
        }
        if self.sessions.len() >= self.service.limits.max_relay_sessions {
            return Err(ApiError::RateLimited(format!(
                "this relay stream already carries {} sessions (PRESENCE_MAX_RELAY_SESSIONS)",
                self.service.limits.max_relay_sessions
            )));
        }
        device_label(&open.device, "open.device")?;
        let platform = convert::platform_from_proto(open.platform, "open.platform")?;
        let (user, expires_at) = match open.user {
            Some(pb::relay_open::User::UserId(raw)) => {
                (convert::one_user_id(raw, "open.user_id")?, None)
            }
            Some(pb::relay_open::User::UserToken(token)) => {
                let (user, exp) = self.service.verifier.verify_user_token(&token)?;
                (user, Some(exp))
            }
            None => {
                return Err(ApiError::Invalid("open needs user_id or user_token".into()));
            }
        };
        self.sessions.insert(
            session,
            Session::Opening {
                waiting: Vec::new(),
                closed: false,
            },
        );
        let engine = self.service.engine.clone();
        let queue = self.queue.clone();
        let opened_tx = opened_tx.clone();
        tokio::spawn(async move {
            let outcome = match engine.connect_device(user, platform).await {
                Ok(device) => {
                    let sub = device.stream.subscriber().clone();
                    queue.push(session, Event::Welcome(Box::new(device.welcome)));
                    sub.forward_to(queue, session);
                    Ok(OpenSession {
                        user,
                        sub,
                        _stream: device.stream,
                    })
                }
                Err(e) => Err(ApiError::from(e)),
            };
            let _ = opened_tx.send(Opened {
                session,
                outcome,
                expires_at,
            });
        });
        Ok(())
    }

    async fn opened(&mut self, opened: Opened, _tx: &mpsc::UnboundedSender<Opened>) {
        let session = opened.session;
        let Some(Session::Opening { waiting, closed }) = self.sessions.remove(&session) else {
            return;
        };
        match opened.outcome {
            Err(e) => self.end_session(session, e).await,
            // Closed while opening: dropping it now is the device leaving.
            Ok(_) if closed => {}
            Ok(open) => {
                self.sessions.insert(session, Session::Open(Box::new(open)));
                if let Some(exp) = opened.expires_at {
                    self.expiries.insert((exp, session));
                }
                for cmd in waiting {
                    self.run_command(session, cmd).await;
                }
            }
        }
    }

    /// Replaces the stream's credential: a valid service token of the same service.
    fn refresh(&mut self, token: &str) -> Result<(), ApiError> {
        let (name, exp) = self.service.verifier.verify_service_token(token)?;
        if name != self.service_name {
            return Err(ApiError::PermissionDenied(format!(
                "refresh.service_token names service {name:?}; this stream belongs to {:?}",
                self.service_name
            )));
        }
        self.expiries.retain(|&(_, s)| s != STREAM);
        self.expiries.insert((exp, STREAM));
        Ok(())
    }

    /// Ends the sessions whose tokens expired; false (after saying why) when the stream's own
    /// credential did: the stream ends.
    async fn expire_sessions(&mut self) -> bool {
        let now = crate::auth::unix_now();
        while let Some(&(at, session)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.remove(&(at, session));
            if session == STREAM {
                let _ = self
                    .results
                    .send(Err(ApiError::Expired(
                        "the relay stream's service token expired; send RelayRefresh with a new one before that, or open a new stream".into(),
                    )
                    .into()))
                    .await;
                return false;
            }
            if self.sessions.remove(&session).is_some() {
                self.end_session(
                    session,
                    ApiError::Expired("the token of this session expired".into()),
                )
                .await;
            }
        }
        true
    }

    /// A command of an open session.
    async fn run_command(&mut self, session: u64, cmd: Cmd) {
        let Some(Session::Open(open)) = self.sessions.get(&session) else {
            return;
        };
        let (user, sub) = (open.user, open.sub.clone());
        let engine = &self.service.engine;
        let rates = &self.service.rates;
        match cmd {
            Cmd::Close(_) => {
                self.sessions.remove(&session);
            }
            Cmd::UpdateStatus(u) => {
                let result = async {
                    let status = convert::status_from_proto(u.status, "update_status.status")?;
                    rates.status_change(user)?;
                    engine.update_status(user, status).await?;
                    Ok::<_, ApiError>(())
                }
                .await;
                if let Err(e) = result {
                    self.refuse(session, u.request_id, e).await;
                }
            }
            Cmd::SetActivity(a) => {
                let result = async {
                    let activity =
                        convert::activity_from_proto(a.activity, "set_activity.activity")?;
                    rates.activity_change(sub.id())?;
                    engine.set_activity(&sub, user, activity).await;
                    Ok::<_, ApiError>(())
                }
                .await;
                if let Err(e) = result {
                    self.refuse(session, a.request_id, e).await;
                }
            }
            Cmd::SetCustomStatus(c) => {
                let result = async {
                    let custom = convert::custom_from_proto(
                        c.custom_status,
                        "set_custom_status.custom_status",
                        now_millis(),
                    )?;
                    rates.status_change(user)?;
                    Ok::<_, ApiError>(engine.set_custom_status(user, custom).await?)
                }
                .await;
                match result {
                    Ok(view) => {
                        self.send(Out::Result(pb::RelayResult {
                            session_id: session,
                            request_id: c.request_id,
                            presence: Some(presence_to_proto(&view)),
                            ..Default::default()
                        }))
                        .await;
                    }
                    Err(e) => self.refuse(session, c.request_id, e).await,
                }
            }
            Cmd::GetPresence(g) => {
                let checked = convert::user_ids(
                    &g.user_ids,
                    "get_presence.user_ids",
                    self.service.limits.max_ids,
                )
                .map_err(ApiError::from)
                .and_then(|ids| rates.presence_ids(user, ids.len()).map(|()| ids));
                let ids = match checked {
                    Ok(ids) => ids,
                    Err(e) => return self.refuse(session, g.request_id, e).await,
                };
                // Reads may wait on the store: answered on their own task, so one slow read
                // does not hold up the stream's other sessions.
                let engine = engine.clone();
                let results = self.results.clone();
                tokio::spawn(async move {
                    let reply = match engine.get_presence(Viewer::User(user), &ids).await {
                        Ok(views) => pb::RelayResult {
                            session_id: session,
                            request_id: g.request_id,
                            users: views.iter().map(presence_to_proto).collect(),
                            ..Default::default()
                        },
                        Err(e) => {
                            let (code, message) = code_and_message(e.into());
                            pb::RelayResult {
                                session_id: session,
                                request_id: g.request_id,
                                code,
                                message,
                                ..Default::default()
                            }
                        }
                    };
                    let _ = results
                        .send(Ok(pb::RelayResponse {
                            kind: Some(Out::Result(reply)),
                        }))
                        .await;
                });
            }
            Cmd::Open(_) | Cmd::Ping(_) | Cmd::Refresh(_) => {}
        }
    }
}

fn session_of(cmd: &Cmd) -> u64 {
    match cmd {
        Cmd::Open(o) => o.session_id,
        Cmd::Close(c) => c.session_id,
        Cmd::UpdateStatus(u) => u.session_id,
        Cmd::SetActivity(a) => a.session_id,
        Cmd::GetPresence(g) => g.session_id,
        Cmd::SetCustomStatus(c) => c.session_id,
        Cmd::Ping(_) | Cmd::Refresh(_) => STREAM,
    }
}

fn request_of(cmd: &Cmd) -> u64 {
    match cmd {
        Cmd::UpdateStatus(u) => u.request_id,
        Cmd::SetActivity(a) => a.request_id,
        Cmd::GetPresence(g) => g.request_id,
        Cmd::SetCustomStatus(c) => c.request_id,
        Cmd::Refresh(r) => r.request_id,
        Cmd::Open(_) | Cmd::Close(_) | Cmd::Ping(_) => 0,
    }
}

/// The relay stream's responses: results as they come, and the sessions' events from the
/// shared queue, identical deliveries grouped.
struct Outbound {
    queue: Arc<RelayQueue>,
    results: mpsc::Receiver<Outgoing>,
    /// Messages built from the last drained batch, not yet sent.
    ready: VecDeque<pb::RelayResponse>,
    /// The queue ended (and was drained).
    done: bool,
    /// Every sender of results is gone (the command loop and the reads it started).
    results_done: bool,
}

impl Stream for Outbound {
    type Item = Result<pb::RelayResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(msg) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(msg)));
            }
            if !self.results_done {
                match self.results.poll_recv(cx) {
                    Poll::Ready(Some(Ok(msg))) => return Poll::Ready(Some(Ok(msg))),
                    Poll::Ready(Some(Err(status))) => {
                        // The stream ends with it.
                        self.done = true;
                        self.results_done = true;
                        self.queue.close();
                        return Poll::Ready(Some(Err(status)));
                    }
                    Poll::Ready(None) => self.results_done = true,
                    Poll::Pending => {}
                }
            }
            if self.done {
                // A clean end once the answers still being read are out.
                return if self.results_done {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
            match self.queue.poll_drain(cx, DRAIN) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    if self.queue.ended_by_shutdown() {
                        self.results_done = true;
                        return Poll::Ready(Some(Err(ApiError::Engine(
                            crate::engine::EngineError::ShuttingDown,
                        )
                        .into())));
                    }
                }
                Poll::Ready(Some(batch)) => {
                    let messages = batch_messages(batch);
                    self.ready.extend(messages);
                }
            }
        }
    }
}

/// Turns drained events into messages: runs of deliveries become one RelayDelivery each, one
/// group per distinct view with every session that gets it (in the order of their first
/// occurrence, so each session's updates keep their order); anything else ends a run.
fn batch_messages(batch: Vec<(u64, Event)>) -> Vec<pb::RelayResponse> {
    let mut out = Vec::new();
    let mut groups: Vec<(PresenceView, Vec<u64>)> = Vec::new();
    let mut index: HashMap<PresenceView, usize> = HashMap::new();
    let mut bytes = 0usize;
    let flush = |groups: &mut Vec<(PresenceView, Vec<u64>)>,
                 index: &mut HashMap<PresenceView, usize>,
                 bytes: &mut usize,
                 out: &mut Vec<pb::RelayResponse>| {
        if groups.is_empty() {
            return;
        }
        let delivery = pb::RelayDelivery {
            groups: groups
                .drain(..)
                .map(|(view, session_ids)| pb::RelayGroup {
                    presence: Some(presence_to_proto(&view)),
                    session_ids,
                })
                .collect(),
        };
        index.clear();
        *bytes = 0;
        out.push(pb::RelayResponse {
            kind: Some(Out::Delivery(delivery)),
        });
    };
    for (session, event) in batch {
        let kind = match event {
            Event::Presence(update) => {
                let view = update.view();
                match index.get(view) {
                    Some(&i) => groups[i].1.push(session),
                    None => {
                        bytes += 64;
                        index.insert(view.clone(), groups.len());
                        groups.push((view.clone(), vec![session]));
                    }
                }
                bytes += 10;
                if bytes >= DELIVERY_BYTES {
                    flush(&mut groups, &mut index, &mut bytes, &mut out);
                }
                continue;
            }
            Event::Welcome(w) => {
                flush(&mut groups, &mut index, &mut bytes, &mut out);
                for page in welcome_pages(&w) {
                    out.push(pb::RelayResponse {
                        kind: Some(Out::Welcome(pb::RelayWelcome {
                            session_id: session,
                            welcome: Some(page),
                        })),
                    });
                }
                continue;
            }
            Event::Resync(views) => {
                flush(&mut groups, &mut index, &mut bytes, &mut out);
                for page in resync_pages(&views) {
                    out.push(pb::RelayResponse {
                        kind: Some(Out::Resync(pb::RelayResync {
                            session_id: session,
                            resync: Some(page),
                        })),
                    });
                }
                continue;
            }
            Event::Pong(nonce) => Out::Pong(pb::Pong { nonce }),
            Event::End(reason) => {
                let (code, message) = code_and_message(ApiError::from(*reason));
                Out::Ended(pb::RelaySessionEnded {
                    session_id: session,
                    code,
                    message,
                })
            }
        };
        flush(&mut groups, &mut index, &mut bytes, &mut out);
        out.push(pb::RelayResponse { kind: Some(kind) });
    }
    flush(&mut groups, &mut index, &mut bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;

    fn view(user: u64, version: u64, status: Status) -> PresenceView {
        PresenceView {
            status,
            version,
            ..PresenceView::unknown(UserId::parse(user).unwrap())
        }
    }

    #[test]
    fn identical_views_are_grouped_and_each_session_keeps_its_order() {
        let batch = vec![
            (1, Event::presence(view(9, 5, Status::Busy))),
            (2, Event::presence(view(9, 5, Status::Busy))),
            (3, Event::presence(view(9, 5, Status::Offline))),
            (1, Event::presence(view(9, 6, Status::Away))),
            (4, Event::Pong(7)),
            (2, Event::presence(view(9, 6, Status::Away))),
        ];
        let out = batch_messages(batch);
        assert_eq!(out.len(), 3, "a delivery, the pong, a delivery: {out:?}");
        let Some(Out::Delivery(first)) = &out[0].kind else {
            panic!("a delivery first")
        };
        let groups: Vec<(u64, Vec<u64>)> = first
            .groups
            .iter()
            .map(|g| (g.presence.as_ref().unwrap().version, g.session_ids.clone()))
            .collect();
        assert_eq!(groups, vec![(5, vec![1, 2]), (5, vec![3]), (6, vec![1])]);
        assert!(matches!(out[1].kind, Some(Out::Pong(_))));
    }
}
