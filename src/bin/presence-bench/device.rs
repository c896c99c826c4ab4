//! Simulated devices: one Authenticate stream per online user, each read by its own task that
//! checks every presence_updated it gets (order, and for churn changes, latency, status and
//! gaps), and obeys commands from the drivers (change status, flap).
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Streaming};

use presence::pb::{self, client_message, server_message};

use crate::client::{Auth, Pool};
use crate::plan::Plan;
use crate::recorder::{Hist, Recorder, Tally};

/// How long one attempt to open a stream may take before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a device keeps retrying an UNAVAILABLE server before giving up.
const RETRY_LIMIT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The nonce of the ping that ends a steady device: the server answers a ping in order with
/// the updates queued before it, so its pong means the device has seen all of them.
const CLOSE_NONCE: u64 = u64::MAX;

/// What the drivers ask of a device.
#[derive(Debug)]
pub enum Cmd {
    /// Send update_status on the stream (what devices do; the RPC would work too).
    Status(pb::Status),
    /// Disconnect, then reconnect at once.
    Flap,
}

/// Everything the devices of a run share.
pub struct Shared {
    pub pool: Pool,
    pub auth: Auth,
    pub recorder: Arc<Recorder>,
    /// By user id: the user's own state from its first welcome.
    own: Vec<Own>,
    /// Set once the churn timetable is known; receivers read it to identify changes.
    pub plan: OnceLock<Plan>,
}

#[derive(Default)]
struct Own {
    connected: AtomicBool,
    version: AtomicU64,
    status: AtomicI32,
    /// The request stream of a steady device (one that never flaps): the driver sends its
    /// status changes there directly.
    requests: OnceLock<mpsc::UnboundedSender<pb::ClientMessage>>,
}

impl Shared {
    pub fn new(pool: Pool, auth: Auth, recorder: Arc<Recorder>, max_user: u64) -> Shared {
        Shared {
            pool,
            auth,
            recorder,
            own: (0..=max_user).map(|_| Own::default()).collect(),
            plan: OnceLock::new(),
        }
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

/// A stream that got its welcome.
struct Opened {
    requests: mpsc::UnboundedSender<pb::ClientMessage>,
    responses: Streaming<pb::ServerMessage>,
    welcome: pb::Welcome,
    took: Duration,
}

/// Opens `user`'s Authenticate stream and waits for its welcome. UNAVAILABLE (the server
/// shedding a reconnect wave, asking to retry) is retried with jittered exponential backoff, as
/// a device would, for up to RETRY_LIMIT; the time to welcome counts from the first attempt.
async fn open(shared: &Shared, user: u64) -> anyhow::Result<Opened> {
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = tokio::time::timeout(OPEN_TIMEOUT, attempt(shared, user, started)).await;
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

async fn attempt(shared: &Shared, user: u64, started: Instant) -> anyhow::Result<Opened> {
    let (requests, rx) = mpsc::unbounded_channel();
    requests
        .send(pb::ClientMessage {
            kind: Some(client_message::Kind::Hello(pb::Hello {
                device: "bench".into(),
                ..Default::default()
            })),
        })
        .expect("the receiver is alive: it is right here");
    let mut req = Request::new(UnboundedReceiverStream::new(rx));
    shared.auth.as_user(&mut req, user)?;
    let mut responses = shared
        .pool
        .presence(user)
        .authenticate(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let first = responses.message().await.map_err(status_error)?;
    match first.and_then(|m| m.kind) {
        Some(server_message::Kind::Welcome(welcome)) => Ok(Opened {
            requests,
            responses,
            welcome,
            took: started.elapsed(),
        }),
        Some(other) => Err(anyhow!("expected a welcome first, got {other:?}")),
        None => Err(anyhow!("the stream ended before its welcome")),
    }
}

/// Keeps the status (for the retry decision) with a readable message.
fn status_error(s: tonic::Status) -> anyhow::Error {
    let text = format!("{}: {}", s.code(), s.message());
    anyhow::Error::new(s).context(text)
}

/// One device's receiving side.
struct Device {
    user: u64,
    /// Whether this device's receipts of churn changes are accounted (latency, gaps, losses).
    /// Flapping devices are not: their welcomes restart what they should see.
    tracked: bool,
    shared: Arc<Shared>,
    view: View,
}

/// What one stream has seen: a field of its own so that recording (which borrows `shared`)
/// can update it without cloning the `Arc` per message.
struct View {
    user: u64,
    tracked: bool,
    /// Contact id -> last version seen, for each contact in the welcome. A hash map, not a
    /// sorted vector: a device hears from its contacts a few times a second, so its state is
    /// cold and each cache line a lookup touches is a miss (a binary search touched about six,
    /// and was 13% of the bench's CPU under churn; a lookup here touches about two).
    contacts: IdMap,
    own_last: u64,
}

#[allow(clippy::large_enum_variant)] // One short-lived value per message: not worth a box.
enum Step {
    Message(Result<Option<pb::ServerMessage>, tonic::Status>),
    Command(Option<Cmd>),
}

impl Device {
    fn new(user: u64, tracked: bool, shared: Arc<Shared>, welcome: &pb::Welcome) -> Device {
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
    async fn run_steady(&mut self, mut responses: Streaming<pb::ServerMessage>) {
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

    fn failed(&self, why: impl std::fmt::Display) {
        self.shared.recorder.with(|t| t.counters.stream_errors += 1);
        self.shared
            .recorder
            .error(format!("user {}: {why}", self.user));
    }

    /// Checks one message; returns true for the pong that closes a steady device.
    fn on_message(&mut self, m: pb::ServerMessage) -> bool {
        let p = match m.kind {
            Some(server_message::Kind::PresenceUpdated(p)) => p,
            Some(server_message::Kind::Pong(pong)) => return pong.nonce == CLOSE_NONCE,
            _ => return false,
        };
        let now = Instant::now();
        let plan = self.shared.plan.get();
        let view = &mut self.view;
        let problem = self
            .shared
            .recorder
            .with(|t| view.on_presence(&p, now, plan, t));
        if let Some(what) = problem {
            self.shared.recorder.error(what);
        }
        false
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

/// Hashes a user id by one multiplication: ids are small integers, and std's SipHash cost more
/// than the lookup it serves.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap = HashMap<u64, u64, BuildHasherDefault<IdHasher>>;

impl View {
    /// What a welcome lists is what this stream has seen so far.
    fn new(user: u64, tracked: bool, welcome: &pb::Welcome) -> View {
        View {
            user,
            tracked,
            contacts: welcome
                .contacts
                .iter()
                .map(|p| (p.user_id, p.version))
                .collect(),
            own_last: welcome.self_.as_ref().map_or(0, |p| p.version),
        }
    }

    /// Checks and counts one presence_updated; returns what was wrong with it, if anything,
    /// for the report's error list.
    fn on_presence(
        &mut self,
        p: &pb::UserPresence,
        now: Instant,
        plan: Option<&Plan>,
        t: &mut Tally,
    ) -> Option<String> {
        let (me, u, v) = (self.user, p.user_id, p.version);
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
        let Some(seen) = self.contacts.get_mut(&u) else {
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
        if !self.tracked {
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

    /// Counts, for a tracked receiver, the churn changes whose final version never arrived.
    fn finish(&self, shared: &Shared) {
        let Some(plan) = shared.plan.get().filter(|_| self.tracked) else {
            return;
        };
        let lost: u64 = self
            .contacts
            .iter()
            .filter_map(|(&u, &last)| {
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
            self.tasks.push(tokio::spawn(async move {
                // The permit is held until the outcome is recorded: `connect` returns once all
                // permits are back, and then reads the counts.
                match open(&shared, user).await {
                    Ok(o) => {
                        let me = &shared.own[user as usize];
                        let own = o.welcome.self_.as_ref();
                        me.version
                            .store(own.map_or(0, |p| p.version), Ordering::Release);
                        me.status
                            .store(own.map_or(0, |p| p.status), Ordering::Release);
                        if tracked {
                            let _ = me.requests.set(o.requests.clone());
                        }
                        me.connected.store(true, Ordering::Release);
                        shared.recorder.with(|t| {
                            t.counters.connects += 1;
                            t.record(Hist::Welcome, o.took);
                        });
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
            return tx.send(status_message(status)).is_ok();
        }
        self.commands
            .get(user as usize)
            .and_then(Option::as_ref)
            .is_some_and(|tx| tx.send(cmd).is_ok())
    }

    fn steady(&self, user: u64) -> Option<&mpsc::UnboundedSender<pb::ClientMessage>> {
        self.shared.own.get(user as usize)?.requests.get()
    }

    /// Ends every device (each first accounts for what it never received), and waits for them.
    /// A steady device ends on the pong of a closing ping, which comes after every update the
    /// server queued for it before.
    pub async fn close(mut self) {
        self.commands.clear();
        for own in &self.shared.own {
            if let Some(tx) = own.requests.get() {
                let _ = tx.send(pb::ClientMessage {
                    kind: Some(client_message::Kind::Ping(pb::Ping { nonce: CLOSE_NONCE })),
                });
            }
        }
        let all = futures::future::join_all(self.tasks.drain(..));
        if tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .is_err()
        {
            eprintln!("warning: some device tasks did not end within 30 s");
        }
    }
}
