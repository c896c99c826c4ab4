//! Simulated devices: one Authenticate stream per online user, each read by its own task that
//! checks every presence_updated it gets (order, and for churn changes, latency, status and
//! gaps), and obeys commands from the drivers (change status, flap).
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Streaming};

use presence::pb::{self, client_message};

use crate::client::{Auth, Pool};
use crate::h2raw::{RawPool, RawRequests};
use crate::plan::Plan;
use crate::recorder::{Hist, Recorder, Tally};
use crate::wire::{self, DeviceCodec, Incoming};

/// How long one attempt to open a stream may take before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a device keeps retrying an UNAVAILABLE server before giving up.
const RETRY_LIMIT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The nonce of the ping that ends a steady device: the server answers a ping in order with
/// the updates queued before it, so its pong means the device has seen all of them.
const CLOSE_NONCE: u64 = u64::MAX;
/// The nonce of the ping sent right after `set_activity` BACKGROUND: the server handles a
/// device's messages in order, so its pong means the device is passive from then on.
pub const PASSIVE_NONCE: u64 = u64::MAX - 1;
/// The Authenticate method, called with the bench's own codec (see [`wire`]).
const AUTHENTICATE: &str = "/presence.v1.Presence/Authenticate";

/// What the drivers ask of a device.
#[derive(Debug)]
pub enum Cmd {
    /// Send update_status on the stream (what devices do; the RPC would work too).
    Status(pb::Status),
    /// Disconnect, then reconnect at once.
    Flap,
}

/// Where a steady device's messages go: its tonic request stream, or its raw stream.
#[derive(Clone)]
enum Requests {
    Tonic(mpsc::UnboundedSender<pb::ClientMessage>),
    Raw(RawRequests),
}

impl Requests {
    fn send(&self, msg: pb::ClientMessage) -> bool {
        match self {
            Requests::Tonic(tx) => tx.send(msg).is_ok(),
            Requests::Raw(r) => r.send(&msg),
        }
    }
}

/// Everything the devices of a run share.
pub struct Shared {
    pub pool: Pool,
    /// Set when steady devices speak HTTP/2 by hand ([`crate::h2raw`], the default).
    pub raw: Option<RawPool>,
    pub auth: Auth,
    pub recorder: Arc<Recorder>,
    /// By user id: the user's own state from its first welcome.
    own: Vec<Own>,
    /// Set once the churn timetable is known; receivers read it to identify changes.
    pub plan: OnceLock<Plan>,
    /// What wake times are measured from (see [`Own::wake_at`]).
    epoch: Instant,
    /// When the latest resync completed, in nanoseconds after `epoch` (a wave's end).
    last_resync_ns: AtomicU64,
}

#[derive(Default)]
struct Own {
    connected: AtomicBool,
    version: AtomicU64,
    status: AtomicI32,
    /// The request stream of a steady device (one that never flaps): the driver sends its
    /// status changes there directly.
    requests: OnceLock<Requests>,
    /// When the driver asked this device to wake (nanoseconds after `Shared::epoch`, plus one;
    /// 0: never): its resync's latency counts from there.
    wake_at: AtomicU64,
}

impl Shared {
    pub fn new(
        pool: Pool,
        raw: Option<RawPool>,
        auth: Auth,
        recorder: Arc<Recorder>,
        max_user: u64,
    ) -> Shared {
        Shared {
            pool,
            raw,
            auth,
            recorder,
            own: (0..=max_user).map(|_| Own::default()).collect(),
            plan: OnceLock::new(),
            epoch: Instant::now(),
            last_resync_ns: AtomicU64::new(0),
        }
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Records that `user`'s device is asked to wake now.
    pub fn mark_wake(&self, user: u64, at: Instant) {
        if let Some(o) = self.own.get(user as usize) {
            o.wake_at.store(self.since_epoch(at) + 1, Ordering::Release);
        }
    }

    /// When the latest resync completed (None before the first).
    pub fn last_resync(&self) -> Option<Instant> {
        match self.last_resync_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    /// Records `user`'s first welcome: its own state, its requests (a steady device), the
    /// connect and its time.
    fn opened(
        &self,
        user: u64,
        own: Option<&pb::UserPresence>,
        requests: impl Into<Option<Requests>>,
        took: Duration,
    ) {
        let me = &self.own[user as usize];
        me.version
            .store(own.map_or(0, |p| p.version), Ordering::Release);
        me.status
            .store(own.map_or(0, |p| p.status), Ordering::Release);
        if let Some(r) = requests.into() {
            let _ = me.requests.set(r);
        }
        me.connected.store(true, Ordering::Release);
        self.recorder.with(|t| {
            t.counters.connects += 1;
            t.record(Hist::Welcome, took);
        });
    }

    /// Whether `user`'s first connection got its welcome.
    pub fn connected(&self, user: u64) -> bool {
        self.own
            .get(user as usize)
            .is_some_and(|o| o.connected.load(Ordering::Acquire))
    }

    /// `user`'s (version, status) from its first welcome.
    pub fn own_state(&self, user: u64) -> (u64, i32) {
        let o = &self.own[user as usize];
        (
            o.version.load(Ordering::Acquire),
            o.status.load(Ordering::Acquire),
        )
    }
}

/// A stream that got its welcome (every page of it).
struct Opened {
    requests: mpsc::UnboundedSender<pb::ClientMessage>,
    responses: Streaming<Incoming>,
    welcome: pb::Welcome,
    took: Duration,
}

/// Opens `user`'s Authenticate stream and waits for its welcome. UNAVAILABLE (the server
/// shedding a reconnect wave, asking to retry) is retried with jittered exponential backoff, as
/// a device would, for up to RETRY_LIMIT; the time to welcome counts from the first attempt.
async fn open(shared: &Shared, user: u64) -> anyhow::Result<Opened> {
    retrying(shared, user, |started| attempt(shared, user, started)).await
}

/// Runs `attempt` until it succeeds, retrying UNAVAILABLE as [`open`] says.
async fn retrying<T, F, Fut>(shared: &Shared, user: u64, attempt: F) -> anyhow::Result<T>
where
    F: Fn(Instant) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = tokio::time::timeout(OPEN_TIMEOUT, attempt(started)).await;
        let err = match attempt {
            Ok(Ok(opened)) => return Ok(opened),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("no welcome within {OPEN_TIMEOUT:?}"),
        };
        let retry = err
            .downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == tonic::Code::Unavailable);
        if !retry || started.elapsed() + backoff > RETRY_LIMIT {
            return Err(err.context(format!("Authenticate as user {user}")));
        }
        shared.recorder.with(|t| t.counters.open_retries += 1);
        tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>())).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Opens a steady device on a raw connection: once its welcome is in, the device lives in
/// that connection's task, which checks each message as it reads it.
async fn open_raw(
    shared: &Arc<Shared>,
    raw: &RawPool,
    user: u64,
) -> anyhow::Result<crate::h2raw::Opened> {
    let metadata = shared.auth.user_headers(user)?;
    retrying(shared, user, |started| {
        let shared = shared.clone();
        let metadata = metadata.clone();
        async move {
            let make: crate::h2raw::MakeDevice = {
                let shared = shared.clone();
                Box::new(move |welcome: &pb::Welcome| Device::new(user, true, shared, welcome))
            };
            raw.open(user, metadata, &hello_message(), make, started)
                .await
                .map_err(status_error)
        }
    })
    .await
}

fn hello_message() -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::Hello(pb::Hello {
            device: "bench".into(),
            ..Default::default()
        })),
    }
}

async fn attempt(shared: &Shared, user: u64, started: Instant) -> anyhow::Result<Opened> {
    let (requests, rx) = mpsc::unbounded_channel();
    requests
        .send(hello_message())
        .expect("the receiver is alive: it is right here");
    let mut req = Request::new(UnboundedReceiverStream::new(rx));
    shared.auth.as_user(&mut req, user)?;
    let mut grpc = tonic::client::Grpc::new(shared.pool.for_user(user));
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the connection is not ready: {e}")))
        .map_err(status_error)?;
    let mut responses = grpc
        .streaming(
            req,
            http::uri::PathAndQuery::from_static(AUTHENTICATE),
            DeviceCodec,
        )
        .await
        .map_err(status_error)?
        .into_inner();
    // A long contact list comes in pages, each with the same self; the last one is marked.
    let mut welcome: Option<pb::Welcome> = None;
    loop {
        match responses.message().await.map_err(status_error)? {
            Some(Incoming::Welcome(page)) => {
                let last = page.last_page;
                match &mut welcome {
                    None => welcome = Some(*page),
                    Some(w) => w.contacts.extend(page.contacts),
                }
                if last {
                    break;
                }
            }
            Some(other) if welcome.is_none() => {
                return Err(anyhow!("expected a welcome first, got {other:?}"));
            }
            Some(other) => return Err(anyhow!("expected the welcome's next page, got {other:?}")),
            None => return Err(anyhow!("the stream ended before its welcome")),
        }
    }
    Ok(Opened {
        requests,
        responses,
        welcome: welcome.expect("the loop ends on a last page"),
        took: started.elapsed(),
    })
}

/// Keeps the status (for the retry decision) with a readable message.
fn status_error(s: tonic::Status) -> anyhow::Error {
    let text = format!("{}: {}", s.code(), s.message());
    anyhow::Error::new(s).context(text)
}

/// One device's receiving side.
pub struct Device {
    user: u64,
    /// Whether this device's receipts of churn changes are accounted (latency, gaps, losses).
    /// Flapping devices are not: their welcomes restart what they should see.
    tracked: bool,
    shared: Arc<Shared>,
    view: View,
}

/// Where a device stands with respect to the background (issue 15's passive devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Never backgrounded.
    Active,
    /// The server confirmed the background (the pong of [`PASSIVE_NONCE`]): no
    /// presence_updated may arrive until it is woken.
    Passive,
    /// Woken: its resync arrived; live updates again, no longer accounted as a churn receiver.
    Woken,
}

/// What one stream has seen: a field of its own so that recording (which borrows `shared`)
/// can update it without cloning the `Arc` per message.
struct View {
    user: u64,
    tracked: bool,
    mode: Mode,
    /// Contact id -> last version seen, for each contact in the welcome.
    contacts: Versions,
    own_last: u64,
    /// The users of the resync being received (its pages so far): at most one entry each.
    resync: Vec<u64>,
}

#[allow(clippy::large_enum_variant)] // One short-lived value per message: not worth a box.
enum Step {
    Message(Result<Option<Incoming>, tonic::Status>),
    Command(Option<Cmd>),
}

impl Device {
    pub fn new(user: u64, tracked: bool, shared: Arc<Shared>, welcome: &pb::Welcome) -> Device {
        Device {
            user,
            tracked,
            shared,
            view: View::new(user, tracked, welcome),
        }
    }

    /// Reads the device's stream until it ends or the bench closes it, then accounts for what
    /// never arrived. A device without a command queue is steady: it never flaps, and the
    /// driver sends its statuses on its request stream itself.
    async fn run(mut self, first: Opened, commands: Option<mpsc::UnboundedReceiver<Cmd>>) {
        match commands {
            Some(commands) => self.run_commanded(first, commands).await,
            None => self.run_steady(first.responses).await,
        }
        self.view.finish(&self.shared);
    }

    /// Only the responses are read: a second queue polled after every message cost a cache
    /// miss per delivery. The pong of the closing ping ends it.
    async fn run_steady(&mut self, mut responses: Streaming<Incoming>) {
        loop {
            match responses.message().await {
                Ok(Some(m)) => {
                    if self.on_message(m) {
                        return;
                    }
                }
                Ok(None) => return self.failed("the server ended the stream"),
                Err(s) => {
                    return self.failed(format_args!("stream error {}: {}", s.code(), s.message()));
                }
            }
        }
    }

    async fn run_commanded(&mut self, first: Opened, mut commands: mpsc::UnboundedReceiver<Cmd>) {
        let mut live = Some((first.requests, first.responses));
        loop {
            let step = match &mut live {
                // Messages first: commands are rare, and polling their queue for every message
                // would cost a cache miss each time.
                Some((_, responses)) => tokio::select! {
                    biased;
                    m = responses.message() => Step::Message(m),
                    c = commands.recv() => Step::Command(c),
                },
                None => Step::Command(commands.recv().await),
            };
            match step {
                Step::Message(Ok(Some(m))) => {
                    self.on_message(m);
                }
                Step::Message(Ok(None)) => {
                    self.failed("the server ended the stream");
                    live = None;
                }
                Step::Message(Err(s)) => {
                    self.failed(format_args!("stream error {}: {}", s.code(), s.message()));
                    live = None;
                }
                Step::Command(None) => break,
                Step::Command(Some(Cmd::Status(status))) => {
                    let sent = live
                        .as_ref()
                        .is_some_and(|(tx, _)| tx.send(status_message(status)).is_ok());
                    if !sent {
                        self.shared.recorder.with(|t| t.counters.dead_commands += 1);
                    }
                }
                Step::Command(Some(Cmd::Flap)) => {
                    // Dropping both halves cancels the call: the server sees the device leave.
                    live = None;
                    match open(&self.shared, self.user).await {
                        Ok(o) => {
                            self.view = View::new(self.user, self.tracked, &o.welcome);
                            self.shared.recorder.with(|t| {
                                t.counters.reconnects += 1;
                                t.record(Hist::Reconnect, o.took);
                            });
                            live = Some((o.requests, o.responses));
                        }
                        Err(e) => {
                            self.shared
                                .recorder
                                .with(|t| t.counters.reconnect_errors += 1);
                            self.shared.recorder.error(format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }

    /// Accounts for what never arrived (a raw device's end; a tonic device's is in `run`).
    pub fn finish(&self) {
        self.view.finish(&self.shared);
    }

    pub fn failed(&self, why: impl std::fmt::Display) {
        self.shared.recorder.with(|t| t.counters.stream_errors += 1);
        self.shared
            .recorder
            .error(format!("user {}: {why}", self.user));
    }

    /// Checks one message; returns true for the pong that closes a steady device.
    pub fn on_message(&mut self, m: Incoming) -> bool {
        let p = match m {
            Incoming::Presence(p) => p,
            Incoming::Pong(CLOSE_NONCE) => return true,
            Incoming::Pong(PASSIVE_NONCE) => {
                self.view.mode = Mode::Passive;
                self.shared.recorder.with(|t| t.counters.backgrounded += 1);
                return false;
            }
            Incoming::Resync(r) => {
                self.on_resync(r);
                return false;
            }
            Incoming::Pong(_) | Incoming::Welcome(_) | Incoming::Other => return false,
        };
        let now = Instant::now();
        let plan = self.shared.plan.get();
        let view = &mut self.view;
        let problem = self
            .shared
            .recorder
            .with(|t| view.on_presence(p, now, plan, t));
        if let Some(what) = problem {
            self.shared.recorder.error(what);
        }
        false
    }

    /// One page of a resync: every entry must be newer than what this device had of that user,
    /// and no user may appear twice in one resync. The last page ends the wake: its latency
    /// counts from when the driver asked the device to wake.
    fn on_resync(&mut self, page: wire::Resync) {
        let now = Instant::now();
        let view = &mut self.view;
        let mut problems = Vec::new();
        let shared = &self.shared;
        shared.recorder.with(|t| {
            if view.mode != Mode::Passive {
                t.counters.resync_unexpected += 1;
                problems.push(format!(
                    "user {}: a resync while not in the background",
                    view.user
                ));
            }
            for p in &page.users {
                if let Some(what) = view.on_resync_entry(*p, t) {
                    problems.push(what);
                }
            }
            if !page.last_page {
                return;
            }
            let entries = view.resync.len() as u64;
            view.resync.sort_unstable();
            let repeated = view.resync.windows(2).filter(|w| w[0] == w[1]).count() as u64;
            if repeated > 0 {
                t.counters.resync_duplicates += repeated;
                problems.push(format!(
                    "user {}: a resync of {entries} entries repeats {repeated} users",
                    view.user
                ));
            }
            view.resync = Vec::new();
            view.mode = Mode::Woken;
            t.counters.resyncs += 1;
            t.counters.resync_entries += entries;
            t.record_value(Hist::ResyncSize, entries);
            match shared.own[view.user as usize]
                .wake_at
                .load(Ordering::Acquire)
            {
                0 => t.counters.resync_unexpected += 1,
                at => t.record(
                    Hist::Wake,
                    now.saturating_duration_since(shared.epoch + Duration::from_nanos(at - 1)),
                ),
            }
        });
        shared
            .last_resync_ns
            .fetch_max(shared.since_epoch(now), Ordering::AcqRel);
        for what in problems {
            shared.recorder.error(what);
        }
    }
}

fn status_message(status: pb::Status) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::UpdateStatus(
            pb::UpdateStatusRequest {
                status: status as i32,
            },
        )),
    }
}

fn activity_message(activity: pb::Activity) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::SetActivity(pb::SetActivity {
            activity: activity as i32,
        })),
    }
}

fn ping_message(nonce: u64) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::Ping(pb::Ping { nonce })),
    }
}

/// Contact id -> last version seen: open addressing with linear probing, one 16-byte slot per
/// entry, at most about half full. A device hears from its contacts a few times a second, so
/// its table is cold when a delivery arrives and each cache line a lookup touches is a miss: a
/// binary search touched about six (13% of the bench's CPU under churn), std's hash map two (its
/// control bytes, then the bucket: 10% of the bench's CPU in a profile at 300k deliveries/s);
/// this one usually one.
struct Versions {
    /// (id + 1, version); 0 marks an empty slot.
    slots: Box<[(u64, u64)]>,
    /// 64 - log2(slots): Fibonacci hashing keeps the top bits, which spreads the consecutive
    /// ids of a ring's neighbours over the table.
    shift: u32,
}

impl Versions {
    fn new(entries: &[(u64, u64)]) -> Versions {
        let len = (entries.len() * 2).next_power_of_two().max(8);
        let mut t = Versions {
            slots: vec![(0, 0); len].into_boxed_slice(),
            shift: 64 - len.trailing_zeros(),
        };
        for &(id, version) in entries {
            match t.get_mut(id) {
                Some(v) => *v = version,
                None => {
                    let i = t.probe(id);
                    t.slots[i] = (id.wrapping_add(1), version);
                }
            }
        }
        t
    }

    /// The slot holding `id`, or the empty one where it would go.
    #[inline]
    fn probe(&self, id: u64) -> usize {
        let key = id.wrapping_add(1);
        let mask = self.slots.len() - 1;
        let mut i = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize;
        loop {
            let k = self.slots[i].0;
            if k == key || k == 0 {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get_mut(&mut self, id: u64) -> Option<&mut u64> {
        let i = self.probe(id);
        let slot = &mut self.slots[i];
        (slot.0 != 0).then_some(&mut slot.1)
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.0 != 0)
            .map(|&(k, v)| (k.wrapping_sub(1), v))
    }
}

impl View {
    /// What a welcome lists is what this stream has seen so far.
    fn new(user: u64, tracked: bool, welcome: &pb::Welcome) -> View {
        View {
            user,
            tracked,
            mode: Mode::Active,
            contacts: Versions::new(
                &welcome
                    .contacts
                    .iter()
                    .map(|p| (p.user_id, p.version))
                    .collect::<Vec<_>>(),
            ),
            own_last: welcome.self_.as_ref().map_or(0, |p| p.version),
            resync: Vec::new(),
        }
    }

    /// Checks and counts one presence_updated; returns what was wrong with it, if anything,
    /// for the report's error list.
    fn on_presence(
        &mut self,
        p: wire::Presence,
        now: Instant,
        plan: Option<&Plan>,
        t: &mut Tally,
    ) -> Option<String> {
        let (me, u, v) = (self.user, p.user, p.version);
        if self.mode == Mode::Passive {
            t.counters.passive_received += 1;
            return Some(format!(
                "user {me}: presence_updated of user {u} (version {v}) while in the background"
            ));
        }
        if u == me {
            t.counters.echoes += 1;
            if v <= self.own_last {
                t.counters.out_of_order += 1;
                return Some(format!(
                    "user {me}: own version {v} after {}",
                    self.own_last
                ));
            }
            self.own_last = v;
            return None;
        }
        let Some(seen) = self.contacts.get_mut(u) else {
            t.counters.unexpected += 1;
            return Some(format!("user {me}: update of user {u}, not a contact"));
        };
        let last = *seen;
        if v <= last {
            t.counters.out_of_order += 1;
            return Some(format!(
                "user {me}: contact {u} version {v} after version {last}"
            ));
        }
        *seen = v;
        let Some(c) = plan.and_then(|plan| plan.change(u, v)) else {
            t.counters.other_received += 1;
            return None;
        };
        if !self.tracked || self.mode != Mode::Active {
            t.counters.churn_untracked += 1;
            return None;
        }
        t.counters.churn_received += 1;
        t.counters.superseded += v - last.max(c.base) - 1;
        t.record(Hist::Delivery, now.saturating_duration_since(c.scheduled));
        if p.status != c.status {
            t.counters.wrong_status += 1;
            return Some(format!(
                "user {me}: contact {u} version {v} (change {} after base {}) has status {} where the change set {}",
                v - c.base,
                c.base,
                p.status,
                c.status
            ));
        }
        None
    }

    /// One resync entry: newer than what this device had of the user (a contact, or itself).
    fn on_resync_entry(&mut self, p: wire::Presence, t: &mut Tally) -> Option<String> {
        let (me, u, v) = (self.user, p.user, p.version);
        self.resync.push(u);
        let last = if u == me {
            &mut self.own_last
        } else if let Some(seen) = self.contacts.get_mut(u) {
            seen
        } else {
            t.counters.resync_stale += 1;
            return Some(format!(
                "user {me}: resync entry of user {u}, not a contact"
            ));
        };
        if v <= *last {
            t.counters.resync_stale += 1;
            return Some(format!(
                "user {me}: resync entry of user {u} at version {v}, not newer than {}",
                *last
            ));
        }
        *last = v;
        None
    }

    /// Counts, for a tracked receiver, the churn changes whose final version never arrived.
    /// A device that went to the background is not one: the server skips it by design (the
    /// skipped deliveries are counted by the server, and its resync is checked instead).
    fn finish(&self, shared: &Shared) {
        let Some(plan) = shared
            .plan
            .get()
            .filter(|_| self.tracked && self.mode == Mode::Active)
        else {
            return;
        };
        let lost: u64 = self
            .contacts
            .iter()
            .filter_map(|(u, last)| {
                let (base, fin) = plan.versions(u)?;
                Some(fin.saturating_sub(last.max(base)))
            })
            .sum();
        if lost > 0 {
            shared.recorder.with(|t| t.counters.lost += lost);
        }
    }
}

/// The devices of a run, addressable by user id.
pub struct Fleet {
    shared: Arc<Shared>,
    /// By user id: the command queue of the user's device task, for devices that may flap
    /// (steady devices have none, see [`Device::run`]).
    commands: Vec<Option<mpsc::UnboundedSender<Cmd>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub fn new(shared: Arc<Shared>, max_user: u64) -> Fleet {
        Fleet {
            shared,
            commands: (0..=max_user).map(|_| None).collect(),
            tasks: Vec::new(),
        }
    }

    /// Connects one device per user, `concurrency` opens at a time, and returns once every open
    /// has succeeded or failed. Each device then lives in its own task until [`Fleet::close`].
    /// Tracked devices are steady (they never flap); the others take commands.
    pub async fn connect(
        &mut self,
        users: impl IntoIterator<Item = u64>,
        tracked: impl Fn(u64) -> bool,
        concurrency: usize,
    ) {
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        for user in users {
            let permit = gate
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let shared = self.shared.clone();
            let tracked = tracked(user);
            let rx = if tracked {
                None
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                self.commands[user as usize] = Some(tx);
                Some(rx)
            };
            if tracked && let Some(raw) = shared.raw.clone() {
                self.tasks.push(tokio::spawn(async move {
                    match open_raw(&shared, &raw, user).await {
                        Ok(o) => {
                            let took = o.took_from.elapsed();
                            shared.opened(
                                user,
                                o.welcome_self.as_ref(),
                                Requests::Raw(o.requests),
                                took,
                            );
                        }
                        Err(e) => {
                            shared.recorder.with(|t| t.counters.connect_errors += 1);
                            shared.recorder.error(format!("{e:#}"));
                        }
                    }
                    drop(permit);
                }));
                continue;
            }
            self.tasks.push(tokio::spawn(async move {
                // The permit is held until the outcome is recorded: `connect` returns once all
                // permits are back, and then reads the counts.
                match open(&shared, user).await {
                    Ok(o) => {
                        let requests = tracked.then(|| Requests::Tonic(o.requests.clone()));
                        shared.opened(user, o.welcome.self_.as_ref(), requests, o.took);
                        drop(permit);
                        let device = Device::new(user, tracked, shared.clone(), &o.welcome);
                        device.run(o, rx).await;
                    }
                    Err(e) => {
                        shared.recorder.with(|t| t.counters.connect_errors += 1);
                        shared.recorder.error(format!("{e:#}"));
                        drop(permit);
                    }
                }
            }));
        }
        // Every open holds a permit until it is done: all permits back means all opens done.
        let _all = gate
            .acquire_many(concurrency.max(1) as u32)
            .await
            .expect("the semaphore is never closed");
    }

    /// Queues a command for `user`'s device (a steady device's status goes straight onto its
    /// stream); false when it has none.
    pub fn send(&self, user: u64, cmd: Cmd) -> bool {
        if let Cmd::Status(status) = cmd
            && let Some(tx) = self.steady(user)
        {
            return tx.send(status_message(status));
        }
        self.commands
            .get(user as usize)
            .and_then(Option::as_ref)
            .is_some_and(|tx| tx.send(cmd).is_ok())
    }

    /// Sends a steady device to the background: `set_activity` BACKGROUND, then a ping whose
    /// pong tells the device it is passive (counted as `backgrounded`). False when it has no
    /// live stream.
    pub fn background(&self, user: u64) -> bool {
        self.steady(user).is_some_and(|tx| {
            tx.send(activity_message(pb::Activity::Background))
                && tx.send(ping_message(PASSIVE_NONCE))
        })
    }

    /// Wakes a steady device (`set_activity` ACTIVE), its resync's latency counted from now.
    pub fn wake(&self, user: u64) -> bool {
        let Some(tx) = self.steady(user) else {
            return false;
        };
        self.shared.mark_wake(user, Instant::now());
        tx.send(activity_message(pb::Activity::Active))
    }

    fn steady(&self, user: u64) -> Option<&Requests> {
        self.shared.own.get(user as usize)?.requests.get()
    }

    /// Ends every device (each first accounts for what it never received), and waits for them.
    /// A steady device ends on the pong of a closing ping, which comes after every update the
    /// server queued for it before.
    pub async fn close(mut self) {
        self.commands.clear();
        for own in &self.shared.own {
            if let Some(tx) = own.requests.get() {
                tx.send(ping_message(CLOSE_NONCE));
            }
        }
        let all = futures::future::join_all(self.tasks.drain(..));
        let raw_done = async {
            if let Some(raw) = &self.shared.raw {
                while raw.live() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), async {
            all.await;
            raw_done.await;
        })
        .await
        .is_err()
        {
            eprintln!("warning: some devices did not end within 30 s");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_table_finds_every_contact_and_nothing_else() {
        // A ring neighbourhood (consecutive ids), the wrap-around, and a repeated id.
        let mut entries: Vec<(u64, u64)> = (975..=1025)
            .filter(|&u| u != 1000)
            .map(|u| (u, u * 10))
            .collect();
        entries.extend([(1, 7), (99_999, 8), (100_000, 9), (975, 42)]);
        let mut t = Versions::new(&entries);
        for u in (975..=1025).filter(|&u| u != 1000 && u != 975) {
            assert_eq!(t.get_mut(u).copied(), Some(u * 10), "contact {u}");
        }
        assert_eq!(
            t.get_mut(975).copied(),
            Some(42),
            "a repeated id keeps the last version"
        );
        assert_eq!(t.get_mut(100_000).copied(), Some(9));
        for stranger in [0, 1000, 974, 1026, 50_000, u64::MAX - 1] {
            assert!(t.get_mut(stranger).is_none(), "{stranger} is no contact");
        }
        *t.get_mut(1).unwrap() = 70;
        let mut all: Vec<_> = t.iter().collect();
        all.sort_unstable();
        assert_eq!(all.len(), 50 + 3);
        assert_eq!(all[0], (1, 70));
        assert!(
            t.slots.len() >= 2 * all.len(),
            "at most half full: {} slots",
            t.slots.len()
        );
        assert!(Versions::new(&[]).get_mut(5).is_none(), "an empty table");
    }
}
