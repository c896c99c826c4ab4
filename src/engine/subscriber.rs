//! A subscriber is one receiver of presence updates: a device (an Authenticate stream or a relay
//! session) or a WatchContacts stream. Fan-out pushes into its queue without ever waiting; the
//! gRPC response stream drains it directly (no task and no channel in between), so a delivery
//! costs one short lock and, at most, one wake-up. A relay session's queue forwards to its relay
//! stream's shared queue once the session's welcome is out (see [`RelayQueue`]).
//!
//! Every queue is bounded: when it reaches its capacity it is compacted to the newest presence
//! per user (presence is state, so the final state still arrives), and then grows only with the
//! number of distinct users the receiver watches, never with the rate of changes. At most one
//! pong waits at a time: a client that pings without reading gets its newest pong only.
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::Stream;

use crate::domain::{Activity, Platform, PresenceView, UserId, Visibility};

use super::Welcome;
use super::pending::{Pending, compact};
use super::update::Update;
use super::view::{Relation, ViewerContext};

/// Why a subscriber's stream was ended by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The server is shutting down: clients should reconnect elsewhere.
    Shutdown,
    /// The credential the stream was opened with expired.
    Expired,
    /// The client sent something invalid on the stream; the text says what.
    InvalidInput(String),
    /// The client exceeded a limit on the stream; the text names it.
    LimitExceeded(String),
}

/// What a subscriber's stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A live update, shared with the other receivers that see it alike.
    Presence(Arc<Update>),
    /// What changed while a device was in the background: newest views, one per user.
    /// Boxed, as `End` and `Welcome`: rare, and the queue's inline slot holds 16 bytes.
    Resync(Box<Vec<PresenceView>>),
    Pong(u64),
    /// A relay session's welcome (a direct stream sends its welcome itself).
    Welcome(Box<Welcome>),
    End(Box<EndReason>),
}

impl Event {
    /// A live update of its own (not shared with other receivers).
    pub fn presence(view: PresenceView) -> Event {
        Event::Presence(Update::new(view))
    }
}

/// The device behind a subscriber, when it is one.
pub(crate) struct DeviceInfo {
    pub platform: Platform,
    /// Encoded [`Activity`].
    activity: AtomicU8,
}

/// One receiver of presence updates.
///
/// Laid out for fan-out (`repr(C)`, in this order): first what every delivery reads and almost
/// nothing writes, so both cores keep it cached; then the queue, which the fan-out and the
/// stream both write, alone in its cache line; then what a delivery never touches.
#[repr(C)]
pub struct Subscriber {
    /// Unique in this process; the connection id of a device.
    pub(crate) id: u64,
    /// The viewer's own last_seen setting, read by fan-out for reciprocity without taking the
    /// viewer's shard lock (fan-out already holds another shard's lock).
    own_last_seen: AtomicU8,
    /// Set once the stream is over; fan-out prunes closed subscribers lazily.
    closed: AtomicBool,
    /// A backgrounded device: fan-out records the users whose presence changed in `missed`
    /// instead of pushing.
    passive: AtomicBool,
    /// Counts the passive periods (1 for the first): a watch remembers the period it last
    /// recorded a miss in, so fan-out records each user once per period instead of on every
    /// change (the set insert was 7-9 % of server CPU with 80 % of devices passive).
    passive_period: AtomicU32,
    /// The queue's bound: at this length it is compacted (see [`Pending`]).
    capacity: usize,
    /// Where wake-ups of presence deliveries are deferred to, when batching is on.
    batcher: Option<Arc<WakeBatcher>>,
    /// The transport connection the stream travels on (0: unknown), so that a batch wakes the
    /// streams of one connection together; see [`WakeBatcher`].
    wake_group: AtomicU64,
    pub(crate) device: Option<DeviceInfo>,
    queue: CacheLine<Mutex<Queue>>,
    rare: Mutex<Option<Box<Rare>>>,
    /// The users whose watcher lists hold this subscriber, so that closing removes it from
    /// exactly those. Guarded together with the closed check, see [`Subscriber::track`].
    watching: Mutex<Vec<UserId>>,
}

/// What only some receivers need, allocated when first needed: most devices never go to the
/// background and never lose a contact.
#[derive(Default)]
struct Rare {
    /// The users whose presence changed while the device was passive.
    missed: HashSet<UserId>,
    /// The versions this receiver last got of users it stopped watching (a contact removed):
    /// watching them again starts above these.
    floors: HashMap<UserId, u64>,
}

/// A value alone in its cache line(s).
#[repr(align(64))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The pending events of one subscriber, with the lock in one cache line (56 bytes and the
/// mutex's own).
///
/// A `std::sync::Mutex` is right here: it is held for a push or a pop, never across `.await`.
struct Queue {
    /// Set when the stream is waiting for an event.
    waker: Option<Waker>,
    items: Pending,
    /// Set once a relay session's welcome is out: every event goes to the relay stream.
    relay: Option<Arc<RelayLink>>,
}

/// Where a relay session's events go once its welcome is out.
struct RelayLink {
    queue: Arc<RelayQueue>,
    session: u64,
}

impl Subscriber {
    pub(crate) fn new(
        id: u64,
        capacity: usize,
        batcher: Option<Arc<WakeBatcher>>,
        device: Option<Platform>,
    ) -> Self {
        let capacity = capacity.max(1);
        Subscriber {
            id,
            own_last_seen: AtomicU8::new(encode_visibility(Visibility::default())),
            closed: AtomicBool::new(false),
            passive: AtomicBool::new(false),
            passive_period: AtomicU32::new(0),
            capacity,
            batcher,
            wake_group: AtomicU64::new(0),
            device: device.map(|platform| DeviceInfo {
                platform,
                activity: AtomicU8::new(encode_activity(Activity::Active)),
            }),
            queue: CacheLine(Mutex::new(Queue {
                waker: None,
                items: Pending::new(),
                relay: None,
            })),
            rare: Mutex::new(None),
            watching: Mutex::new(Vec::new()),
        }
    }

    /// Names the transport connection this subscriber's stream is sent on: any value that is
    /// the same for the streams of one connection and differs between connections.
    pub fn set_wake_group(&self, group: u64) {
        self.wake_group.store(group, Ordering::Relaxed);
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn context(&self, relation: Relation) -> ViewerContext {
        match relation {
            Relation::Own => ViewerContext::OWN,
            Relation::Service => ViewerContext::SERVICE,
            _ => ViewerContext {
                relation,
                own_last_seen: decode_visibility(self.own_last_seen.load(Ordering::Relaxed)),
            },
        }
    }

    pub(crate) fn set_own_last_seen(&self, v: Visibility) {
        self.own_last_seen
            .store(encode_visibility(v), Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn activity(&self) -> Activity {
        self.device.as_ref().map_or(Activity::Active, |d| {
            decode_activity(d.activity.load(Ordering::Relaxed))
        })
    }

    /// Records the device's new activity; returns the previous one.
    pub(crate) fn swap_activity(&self, activity: Activity) -> Activity {
        match &self.device {
            Some(d) => {
                decode_activity(d.activity.swap(encode_activity(activity), Ordering::AcqRel))
            }
            None => Activity::Active,
        }
    }

    pub(crate) fn is_passive(&self) -> bool {
        self.passive.load(Ordering::Acquire)
    }

    /// Going passive starts a new passive period (before the flag is seen, so fan-out never
    /// pairs the flag with the previous period).
    pub(crate) fn set_passive(&self, passive: bool) {
        if passive {
            self.passive_period.fetch_add(1, Ordering::AcqRel);
        }
        let _queue = self.queue.lock().expect("subscriber queue lock poisoned");
        self.passive.store(passive, Ordering::Release);
    }

    /// Fan-out to a passive subscriber through a watch: remember that `user` changed, unless
    /// this watch already did in the current passive period (`mark`, kept in the watch; reset
    /// to 0 when the user is taken out of the missed set). Periods start at 1 and the activity
    /// rate limit (60/min by default) keeps a u32 from wrapping for thousands of years.
    pub(crate) fn miss_once(&self, user: UserId, mark: &mut u32) {
        let period = self.passive_period.load(Ordering::Acquire);
        if *mark != period {
            self.miss(user);
            *mark = period;
        }
    }

    /// Fan-out to a passive subscriber: remember that `user` changed.
    pub(crate) fn miss(&self, user: UserId) {
        self.rare().get_or_insert_default().missed.insert(user);
    }

    /// Takes one user out of the missed set; false when it was not there.
    pub(crate) fn take_missed(&self, user: UserId) -> bool {
        self.rare().as_mut().is_some_and(|r| r.missed.remove(&user))
    }

    /// The users missed so far (the set is left as is).
    pub(crate) fn missed(&self) -> Vec<UserId> {
        self.rare()
            .as_ref()
            .map_or_else(Vec::new, |r| r.missed.iter().copied().collect())
    }

    /// Remembers the version this receiver last got of a user it stops watching.
    pub(crate) fn set_floor(&self, user: UserId, version: u64) {
        self.rare()
            .get_or_insert_default()
            .floors
            .insert(user, version);
    }

    /// The version a new watch of `user` must start above (0: none), forgotten once read.
    pub(crate) fn take_floor(&self, user: UserId) -> u64 {
        self.rare()
            .as_mut()
            .and_then(|r| r.floors.remove(&user))
            .unwrap_or(0)
    }

    fn rare(&self) -> std::sync::MutexGuard<'_, Option<Box<Rare>>> {
        self.rare.lock().expect("subscriber lock poisoned")
    }

    /// Queues an event without waiting. Returns how many queued presences a compaction replaced
    /// (0 normally), for the `coalesced` counter.
    pub(crate) fn push(&self, event: Event) -> usize {
        let q = self.queue.lock().expect("subscriber queue lock poisoned");
        self.push_locked(q, event)
    }

    /// A live presence update: queued unless the device is passive (then None, nothing
    /// queued). The flag is read under the queue lock, which `set_passive` takes too, so an
    /// update is never queued behind what the device was sent after going passive (the pong
    /// answering a ping sent after its set_activity; the bench saw it in 2 of 6 runs of
    /// `passive --passive 80 --rate 1000` when fan-out read the flag before taking the lock).
    pub(crate) fn push_live(&self, event: Event) -> Option<usize> {
        let q = self.queue.lock().expect("subscriber queue lock poisoned");
        if self.passive.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.push_locked(q, event))
    }

    fn push_locked(&self, mut q: std::sync::MutexGuard<'_, Queue>, event: Event) -> usize {
        if q.items.ended {
            return 0;
        }
        if matches!(event, Event::End(_)) {
            q.items.ended = true;
        }
        if let Some(link) = &q.relay {
            return link.queue.push(link.session, event);
        }
        let coalesced = q.items.push(event, self.capacity);
        let deferrable = matches!(q.items.back(), Some(Event::Presence(_)));
        if let Some(w) = q.waker.take() {
            match &self.batcher {
                Some(b) if deferrable => b.defer(self.wake_group.load(Ordering::Relaxed), w),
                _ => w.wake(),
            }
        }
        coalesced
    }

    /// A relay session's welcome is out: from now on every event goes to `relay`, after what
    /// this session queued meanwhile.
    pub(crate) fn forward_to(&self, relay: Arc<RelayQueue>, session: u64) {
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        for event in q.items.take_all() {
            relay.push(session, event);
        }
        q.relay = Some(Arc::new(RelayLink {
            queue: relay,
            session,
        }));
    }

    /// Ends the stream: queues `End`, delivered after what is already queued.
    pub fn end(&self, reason: EndReason) {
        self.push(Event::End(Box::new(reason)));
    }

    /// Answers a ping, in order with the updates already queued; an older pong still waiting
    /// is replaced.
    pub fn pong(&self, nonce: u64) {
        self.push(Event::Pong(nonce));
    }

    /// Records that `user`'s watcher list now holds this subscriber. Returns false, recording
    /// nothing, when the subscriber is already closed: the caller must then not register it.
    /// Called with the watched user's shard lock held, so a concurrent close either sees the
    /// user here or the registration sees `closed`.
    pub(crate) fn track(&self, user: UserId) -> bool {
        let mut w = self.watching.lock().expect("watching lock poisoned");
        if self.is_closed() {
            return false;
        }
        super::registry::push_tight(&mut w, user);
        true
    }

    pub(crate) fn untrack(&self, user: UserId) {
        let mut w = self.watching.lock().expect("watching lock poisoned");
        if let Some(i) = w.iter().position(|u| *u == user) {
            w.swap_remove(i);
        }
    }

    /// Marks the subscriber closed and returns the users it must be removed from.
    pub(crate) fn close(&self) -> Vec<UserId> {
        let mut w = self.watching.lock().expect("watching lock poisoned");
        self.closed.store(true, Ordering::Release);
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        q.items.ended = true;
        if let Some(waker) = q.waker.take() {
            waker.wake();
        }
        drop(q);
        if let Some(r) = self.rare().as_mut() {
            r.missed.clear();
        }
        std::mem::take(&mut *w)
    }

    /// Pending events, for tests and stats.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .expect("subscriber queue lock poisoned")
            .items
            .len()
    }

    /// A device's stream also reads what the device sends, on the same task: its reader's
    /// wake-ups land here, so that one look at the queue (whose cache line a poll loads
    /// anyway) tells the stream both whether an event waits and whether the reader has work.
    pub fn wake_reader(&self) {
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        q.items.reader_woken = true;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    /// The next event, and how many are still queued behind it. `reader` is set (and the mark
    /// cleared) when [`Subscriber::wake_reader`] was called since the last look.
    fn poll_next_event(
        &self,
        cx: &mut Context<'_>,
        reader: &mut bool,
    ) -> Poll<Option<(Event, usize)>> {
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        *reader = std::mem::take(&mut q.items.reader_woken);
        match q.items.pop_front() {
            Some(e) => Poll::Ready(Some((e, q.items.len()))),
            None if q.items.ended => Poll::Ready(None),
            None => {
                match &mut q.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// The shared queue of one relay stream: the events of all its sessions, tagged with the
/// session, drained by the relay stream which groups identical deliveries (see
/// `grpc::relay`). Bounded like a subscriber's queue: compaction keeps the newest presence per
/// session and user, and at most one pong waits.
pub struct RelayQueue {
    inner: Mutex<RelayInner>,
    batcher: Option<Arc<WakeBatcher>>,
}

struct RelayInner {
    items: VecDeque<(u64, Event)>,
    waker: Option<Waker>,
    compact_at: usize,
    capacity: usize,
    ended: bool,
    /// Ended by the server's shutdown (not by the proxy closing its side).
    shutdown: bool,
}

impl RelayQueue {
    pub(crate) fn new(capacity: usize, batcher: Option<Arc<WakeBatcher>>) -> Arc<RelayQueue> {
        let capacity = capacity.max(16);
        Arc::new(RelayQueue {
            inner: Mutex::new(RelayInner {
                items: VecDeque::new(),
                waker: None,
                compact_at: capacity,
                capacity,
                ended: false,
                shutdown: false,
            }),
            batcher,
        })
    }

    /// Queues one session's event; returns how many presences a compaction replaced.
    pub(crate) fn push(&self, session: u64, event: Event) -> usize {
        let mut q = self.inner.lock().expect("relay queue lock poisoned");
        if q.ended {
            return 0;
        }
        let mut coalesced = 0;
        if let Event::Pong(_) = event
            && let Some(i) = q
                .items
                .iter()
                .rposition(|(_, e)| matches!(e, Event::Pong(_)))
        {
            q.items.remove(i);
        }
        if q.items.len() >= q.compact_at {
            // Keyed by session and user: a session's newest presence of each user survives.
            coalesced = compact(&mut q.items, |(s, e)| match e {
                Event::Presence(p) => Some(p.view().user_id.get() ^ s.rotate_left(32)),
                _ => None,
            });
            q.compact_at = q.capacity.max(q.items.len() * 2);
        }
        let deferrable = matches!(event, Event::Presence(_));
        q.items.push_back((session, event));
        if let Some(w) = q.waker.take() {
            match &self.batcher {
                Some(b) if deferrable => b.defer(0, w),
                _ => w.wake(),
            }
        }
        coalesced
    }

    /// Takes up to `max` queued events, or registers the waker when there are none. None once
    /// the queue was closed and drained.
    pub fn poll_drain(&self, cx: &mut Context<'_>, max: usize) -> Poll<Option<Vec<(u64, Event)>>> {
        let mut q = self.inner.lock().expect("relay queue lock poisoned");
        if q.items.is_empty() {
            if q.ended {
                return Poll::Ready(None);
            }
            q.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = q.items.len().min(max);
        Poll::Ready(Some(q.items.drain(..n).collect()))
    }

    /// Ends the stream after what is queued: the proxy closed its side.
    pub fn close(&self) {
        self.end(false);
    }

    /// Ends the stream because the server shuts down.
    pub(crate) fn close_for_shutdown(&self) {
        self.end(true);
    }

    fn end(&self, shutdown: bool) {
        let mut q = self.inner.lock().expect("relay queue lock poisoned");
        q.ended = true;
        q.shutdown |= shutdown;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    /// Whether the server's shutdown ended it.
    pub fn ended_by_shutdown(&self) -> bool {
        self.inner
            .lock()
            .expect("relay queue lock poisoned")
            .shutdown
    }

    pub fn queued(&self) -> usize {
        self.inner
            .lock()
            .expect("relay queue lock poisoned")
            .items
            .len()
    }
}

/// Defers the wake-ups of receivers and releases them together every tick.
///
/// A change fans out to receivers spread over many HTTP/2 connections; woken one by one, each
/// delivery makes its connection write one small frame (one `writev`, one TCP segment: the
/// kernel's send path was a third of the server's CPU under churn). Released together, and in
/// order of their connection, the streams of one connection queue their frames before that
/// connection's task runs, and it writes them in one go. (Released in arrival order, a batch
/// overflowed the scheduler's local queue and connection tasks ran between its streams: 3.8
/// deliveries per `writev` where 7.5 were waiting.) The price is at most one tick of latency.
pub struct WakeBatcher {
    pending: Mutex<Vec<(u64, Waker)>>,
}

impl WakeBatcher {
    /// Starts the ticker; it stops when the returned batcher is dropped everywhere.
    pub fn start(tick: std::time::Duration) -> Arc<WakeBatcher> {
        let batcher = Arc::new(WakeBatcher {
            pending: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&batcher);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut ready = Vec::new();
            loop {
                interval.tick().await;
                let Some(b) = weak.upgrade() else { return };
                std::mem::swap(
                    &mut ready,
                    &mut *b.pending.lock().expect("wake batcher lock poisoned"),
                );
                drop(b);
                ready.sort_unstable_by_key(|(group, _)| *group);
                for (_, w) in ready.drain(..) {
                    w.wake();
                }
            }
        });
        batcher
    }

    fn defer(&self, group: u64, waker: Waker) {
        self.pending
            .lock()
            .expect("wake batcher lock poisoned")
            .push((group, waker));
    }
}

fn encode_visibility(v: Visibility) -> u8 {
    match v {
        Visibility::Everyone => 0,
        Visibility::Contacts => 1,
        Visibility::Nobody => 2,
    }
}

fn decode_visibility(v: u8) -> Visibility {
    match v {
        0 => Visibility::Everyone,
        1 => Visibility::Contacts,
        _ => Visibility::Nobody,
    }
}

fn encode_activity(a: Activity) -> u8 {
    match a {
        Activity::Active => 0,
        Activity::Idle => 1,
        Activity::Background => 2,
    }
}

fn decode_activity(a: u8) -> Activity {
    match a {
        0 => Activity::Active,
        1 => Activity::Idle,
        _ => Activity::Background,
    }
}

/// The events of one subscriber as a stream. Dropping it runs `on_drop` (the engine's cleanup
/// for this subscriber), so a client that goes away is always unregistered.
pub struct EventStream {
    sub: Arc<Subscriber>,
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl EventStream {
    pub(crate) fn new(sub: Arc<Subscriber>, on_drop: Box<dyn FnOnce() + Send + Sync>) -> Self {
        EventStream {
            sub,
            on_drop: Some(on_drop),
        }
    }

    pub fn subscriber(&self) -> &Arc<Subscriber> {
        &self.sub
    }
}

impl EventStream {
    /// The next event and whether more are queued behind it (a caller batching what is ready
    /// need not ask again when nothing is).
    /// `reader`: see [`Subscriber::wake_reader`].
    pub fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut bool,
    ) -> Poll<Option<(Event, bool)>> {
        self.sub
            .poll_next_event(cx, reader)
            .map(|e| e.map(|(event, left)| (event, left > 0)))
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.sub
            .poll_next_event(cx, &mut false)
            .map(|e| e.map(|(event, _)| event))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// An ONLINE update of `user` at `version`, for the engine's unit tests.
#[cfg(test)]
pub(super) fn test_presence(user: u64, version: u64) -> Event {
    Event::presence(PresenceView {
        status: crate::domain::Status::Online,
        version,
        ..PresenceView::unknown(UserId::parse(user).unwrap())
    })
}

#[cfg(test)]
mod tests {
    use super::test_presence as presence;
    use super::*;
    use futures::StreamExt;

    fn sub(capacity: usize) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(1, capacity, None, None))
    }

    #[test]
    fn the_queue_and_its_lock_fit_one_cache_line() {
        assert_eq!(std::mem::size_of::<Event>(), 16, "the inline slot's size");
        assert!(
            std::mem::size_of::<Mutex<Queue>>() <= 64,
            "{} bytes",
            std::mem::size_of::<Mutex<Queue>>()
        );
        let sub = sub(4);
        let base = Arc::as_ptr(&sub) as usize;
        let queue = &*sub.queue as *const Mutex<Queue> as usize;
        assert_eq!(base % 64, 0, "a subscriber starts a cache line");
        assert_eq!(
            queue - base,
            64,
            "the read-mostly fields fill the first, the queue the next"
        );
    }

    #[test]
    fn a_subscribers_queue_stays_within_its_capacity() {
        let sub = sub(4);
        for v in 1..=1000 {
            sub.push(presence(1 + v % 2, v));
        }
        assert!(sub.queued() <= 4, "bounded, has {}", sub.queued());
        // (The queue's own rules are tested in engine::pending.)
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_end_event() {
        let sub = sub(8);
        let mut stream = EventStream::new(sub.clone(), Box::new(|| {}));
        sub.push(presence(3, 1));
        sub.end(EndReason::Shutdown);
        sub.push(presence(3, 2));
        assert_eq!(stream.next().await, Some(presence(3, 1)));
        assert_eq!(
            stream.next().await,
            Some(Event::End(Box::new(EndReason::Shutdown)))
        );
        assert_eq!(stream.next().await, None, "nothing after End");
    }

    fn welcome() -> Box<Welcome> {
        Box::new(Welcome {
            connection_id: "c-1".into(),
            self_view: PresenceView::unknown(UserId::parse(7).unwrap()),
            contacts: Vec::new(),
        })
    }

    #[test]
    fn a_relay_session_forwards_after_what_it_queued_before_its_welcome() {
        let relay = RelayQueue::new(64, None);
        let s = sub(8);
        s.push(presence(1, 1));
        relay.push(7, Event::Welcome(welcome()));
        s.forward_to(relay.clone(), 7);
        s.push(presence(1, 2));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(items)) = relay.poll_drain(&mut cx, 10) else {
            panic!("three events are queued")
        };
        assert_eq!(
            items,
            vec![
                (7, Event::Welcome(welcome())),
                (7, presence(1, 1)),
                (7, presence(1, 2))
            ]
        );
    }

    #[test]
    fn a_full_relay_queue_keeps_each_sessions_newest_presence_per_user() {
        let relay = RelayQueue::new(16, None);
        for v in 1..=1000u64 {
            relay.push(v % 3, presence(1 + v % 2, v));
        }
        assert!(relay.queued() <= 16, "bounded: {}", relay.queued());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(items)) = relay.poll_drain(&mut cx, 100) else {
            panic!("events are queued")
        };
        let newest: Vec<u64> = items
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Presence(p) => Some(p.view().version),
                _ => None,
            })
            .collect();
        assert!(newest.contains(&1000) && newest.contains(&999) && newest.contains(&998));
    }

    #[test]
    fn a_watch_records_a_miss_once_per_passive_period() {
        let sub = Subscriber::new(1, 8, None, None);
        let u = UserId::parse(7).unwrap();
        let mut mark = 0;
        sub.set_passive(true);
        sub.miss_once(u, &mut mark);
        assert_eq!(sub.missed(), vec![u]);
        sub.miss_once(u, &mut mark);
        assert_eq!(sub.missed(), vec![u], "recorded once");
        // Taken out (a resync entry) while still passive: unless the watch's mark is reset
        // with it (take_missed_view does), a later change is not recorded.
        assert!(sub.take_missed(u));
        sub.miss_once(u, &mut mark);
        assert!(sub.missed().is_empty(), "the mark still names this period");
        mark = 0;
        sub.miss_once(u, &mut mark);
        assert_eq!(sub.missed(), vec![u]);
        assert!(sub.take_missed(u));
        // Awake, then passive again: a new period records the user again.
        sub.set_passive(false);
        sub.set_passive(true);
        sub.miss_once(u, &mut mark);
        assert_eq!(sub.missed(), vec![u]);
    }

    #[test]
    fn a_passive_device_gets_no_live_update_and_an_awake_one_does() {
        let sub = Subscriber::new(1, 8, None, None);
        assert_eq!(sub.push_live(presence(2, 1)), Some(0));
        sub.set_passive(true);
        assert_eq!(sub.push_live(presence(2, 2)), None, "passive: not queued");
        sub.set_passive(false);
        assert_eq!(sub.push_live(presence(2, 3)), Some(0));
        let q = sub.queue.lock().unwrap();
        assert_eq!(q.items.to_vec(), vec![presence(2, 1), presence(2, 3)]);
    }

    /// Records, in order, which receiver each wake-up went to.
    struct Woken {
        id: u64,
        log: Arc<Mutex<Vec<u64>>>,
    }

    impl futures::task::ArcWake for Woken {
        fn wake_by_ref(me: &Arc<Self>) {
            me.log.lock().unwrap().push(me.id);
        }
    }

    #[tokio::test]
    async fn a_batch_wakes_the_streams_of_one_connection_together() {
        let batcher = WakeBatcher::start(std::time::Duration::from_millis(1));
        let log = Arc::new(Mutex::new(Vec::new()));
        // Receivers 1..=8 on connections 7, 3, 7, 5, 3, 7, 5, 3, deferred in that order.
        let groups = [7, 3, 7, 5, 3, 7, 5, 3];
        {
            // Deferred under the batcher's lock held once, so the tick cannot split them.
            let mut pending = batcher.pending.lock().unwrap();
            for (i, group) in groups.iter().enumerate() {
                let woken = Arc::new(Woken {
                    id: i as u64 + 1,
                    log: log.clone(),
                });
                pending.push((*group, futures::task::waker(woken)));
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while log.lock().unwrap().len() < groups.len() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the tick wakes every deferred receiver");
        let order = log.lock().unwrap().clone();
        let by_group: Vec<u64> = order.iter().map(|&id| groups[id as usize - 1]).collect();
        assert_eq!(
            by_group,
            vec![3, 3, 3, 5, 5, 7, 7, 7],
            "one connection's receivers are woken one after another (order {order:?})"
        );
    }

    /// Subscriber 1 of connection 42, whose wake-ups wait for a tick that never comes in a
    /// test, and a waker recording into the log.
    #[allow(clippy::type_complexity)]
    fn grouped_subscriber() -> (
        Arc<WakeBatcher>,
        Arc<Subscriber>,
        Arc<Mutex<Vec<u64>>>,
        std::task::Waker,
    ) {
        let batcher = WakeBatcher::start(std::time::Duration::from_secs(3600));
        let sub = Arc::new(Subscriber::new(1, 8, Some(batcher.clone()), None));
        sub.set_wake_group(42);
        let log = Arc::new(Mutex::new(Vec::new()));
        let waker = futures::task::waker(Arc::new(Woken {
            id: 1,
            log: log.clone(),
        }));
        (batcher, sub, log, waker)
    }

    #[tokio::test]
    async fn a_presence_wake_up_is_deferred_to_the_batch_with_its_group() {
        let (batcher, sub, log, waker) = grouped_subscriber();
        let mut cx = Context::from_waker(&waker);
        assert!(
            sub.poll_next_event(&mut cx, &mut false).is_pending(),
            "nothing queued yet"
        );
        sub.push(presence(3, 1));
        assert!(
            log.lock().unwrap().is_empty(),
            "a presence is not woken at once"
        );
        let pending = batcher.pending.lock().unwrap();
        assert_eq!(pending.len(), 1, "its wake-up waits for the tick");
        assert_eq!(pending[0].0, 42, "with the subscriber's connection");
    }

    #[tokio::test]
    async fn a_reader_wake_up_is_not_deferred_and_is_reported_once() {
        let (_batcher, sub, log, waker) = grouped_subscriber();
        let mut cx = Context::from_waker(&waker);
        let mut reader = true;
        assert!(sub.poll_next_event(&mut cx, &mut reader).is_pending());
        assert!(!reader, "the reader was not woken yet");
        sub.wake_reader();
        assert_eq!(
            *log.lock().unwrap(),
            vec![1],
            "a message from the device wakes its task at once, not at the batch tick"
        );
        assert!(sub.poll_next_event(&mut cx, &mut reader).is_pending());
        assert!(reader, "the poll reports the reader's wake-up");
        assert!(sub.poll_next_event(&mut cx, &mut reader).is_pending());
        assert!(!reader, "and only once");
    }
}
