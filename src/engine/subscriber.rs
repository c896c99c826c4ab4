//! A subscriber is one receiver of presence updates: a device's Authenticate stream or a
//! WatchContacts stream. Fan-out pushes into its queue without ever waiting; the gRPC response
//! stream drains it. No task and no channel sit in between: the response stream polls the queue
//! directly, so a delivery costs one short lock and, at most, one wake-up.
//!
//! The queue is bounded: when it reaches its capacity it is compacted to the newest presence per
//! user (presence is state, so the final state still arrives), and it can then only grow with
//! the number of distinct users the subscriber watches, never with the rate of changes.
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use tokio::sync::Notify;

use crate::domain::{PresenceView, UserId, Visibility};

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
    Presence(PresenceView),
    Pong(u64),
    End(EndReason),
}

/// One receiver of presence updates.
pub struct Subscriber {
    /// Unique in this process; the connection id of a device.
    pub(crate) id: u64,
    /// The viewer's own last_seen setting, read by fan-out for reciprocity without taking the
    /// viewer's shard lock (fan-out already holds another shard's lock).
    own_last_seen: AtomicU8,
    /// Set once the stream is over; fan-out prunes closed subscribers lazily.
    closed: AtomicBool,
    /// Wakes the device's inbound task when the engine ends the stream.
    ended: Notify,
    queue: Mutex<Queue>,
    /// Where wake-ups of presence deliveries are deferred to, when batching is on.
    batcher: Option<Arc<WakeBatcher>>,
    /// The transport connection the stream travels on (0: unknown), so that a batch wakes the
    /// streams of one connection together; see [`WakeBatcher`].
    wake_group: AtomicU64,
    /// The users whose watcher lists hold this subscriber, so that closing removes it from
    /// exactly those. Guarded together with the closed check, see [`Subscriber::track`].
    watching: Mutex<Vec<UserId>>,
}

/// The pending events of one subscriber.
///
/// A `std::sync::Mutex` is right here: it is held for a push or a pop, never across `.await`.
struct Queue {
    items: VecDeque<Event>,
    /// Set when the stream is waiting for an event.
    waker: Option<Waker>,
    /// Compaction runs when `items` reaches this length; it moves up after a compaction that
    /// could not shrink the queue enough, so a large but legitimate backlog is not re-scanned on
    /// every push.
    compact_at: usize,
    /// The configured capacity, the floor of `compact_at`.
    capacity: usize,
    /// An `End` was queued: nothing more is accepted.
    ended: bool,
}

impl Subscriber {
    pub(crate) fn new(
        id: u64,
        own_last_seen: Visibility,
        capacity: usize,
        batcher: Option<Arc<WakeBatcher>>,
    ) -> Self {
        let capacity = capacity.max(1);
        Subscriber {
            id,
            own_last_seen: AtomicU8::new(encode_visibility(own_last_seen)),
            closed: AtomicBool::new(false),
            ended: Notify::new(),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                waker: None,
                compact_at: capacity,
                capacity,
                ended: false,
            }),
            watching: Mutex::new(Vec::new()),
            batcher,
            wake_group: AtomicU64::new(0),
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

    /// Queues an event without waiting. Returns how many queued presences a compaction replaced
    /// (0 normally), for the `coalesced` counter.
    pub(crate) fn push(&self, event: Event) -> usize {
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        if q.ended {
            return 0;
        }
        let mut coalesced = 0;
        if q.items.len() >= q.compact_at {
            coalesced = compact(&mut q.items);
            q.compact_at = q.capacity.max(q.items.len() * 2);
        }
        if matches!(event, Event::End(_)) {
            q.ended = true;
        }
        let deferrable = matches!(event, Event::Presence(_));
        q.items.push_back(event);
        if let Some(w) = q.waker.take() {
            match &self.batcher {
                Some(b) if deferrable => b.defer(self.wake_group.load(Ordering::Relaxed), w),
                _ => w.wake(),
            }
        }
        coalesced
    }

    /// Ends the stream: queues `End` (delivered after what is already queued) and wakes the
    /// device's inbound task.
    pub fn end(&self, reason: EndReason) {
        self.push(Event::End(reason));
        self.ended.notify_waiters();
        self.ended.notify_one();
    }

    /// Answers a ping, in order with the updates already queued.
    pub fn pong(&self, nonce: u64) {
        self.push(Event::Pong(nonce));
    }

    /// Resolves once [`Subscriber::end`] or the engine's close was called.
    pub async fn ended(&self) {
        self.ended.notified().await
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
        w.push(user);
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
        q.ended = true;
        if let Some(waker) = q.waker.take() {
            waker.wake();
        }
        drop(q);
        // The device's inbound task waits on this too: a stream that is gone must not leave
        // its reader behind (a client that half-closed and then went away did).
        self.ended.notify_waiters();
        self.ended.notify_one();
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

    fn poll_next_event(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut q = self.queue.lock().expect("subscriber queue lock poisoned");
        match q.items.pop_front() {
            Some(e) => Poll::Ready(Some(e)),
            None if q.ended => Poll::Ready(None),
            None => {
                q.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
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

/// Keeps only the newest presence per user (in the order of their newest), and every pong and
/// end in place. Returns how many events were dropped.
fn compact(items: &mut VecDeque<Event>) -> usize {
    let before = items.len();
    let mut newest: HashMap<UserId, usize> = HashMap::with_capacity(before);
    for (i, e) in items.iter().enumerate() {
        if let Event::Presence(p) = e {
            newest.insert(p.user_id, i);
        }
    }
    let mut i = 0;
    items.retain(|e| {
        let keep = match e {
            Event::Presence(p) => newest.get(&p.user_id) == Some(&i),
            _ => true,
        };
        i += 1;
        keep
    });
    before - items.len()
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

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.sub.poll_next_event(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;
    use futures::StreamExt;

    fn presence(user: u64, version: u64) -> Event {
        Event::Presence(PresenceView {
            user_id: UserId::parse(user).unwrap(),
            status: Status::Online,
            last_seen: None,
            version,
            connected: None,
        })
    }

    #[test]
    fn a_full_queue_keeps_only_the_newest_presence_per_user() {
        let sub = Subscriber::new(1, Visibility::Everyone, 4, None);
        for v in 1..=1000 {
            sub.push(presence(1 + v % 2, v));
        }
        assert!(
            sub.queued() <= 4,
            "queue must stay bounded, has {}",
            sub.queued()
        );
        let mut q = sub.queue.lock().unwrap();
        let versions: Vec<u64> = q
            .items
            .drain(..)
            .map(|e| match e {
                Event::Presence(p) => p.version,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(
            versions.contains(&1000) && versions.contains(&999),
            "newest kept: {versions:?}"
        );
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "order kept: {versions:?}"
        );
    }

    #[test]
    fn compaction_keeps_pongs_and_order() {
        let mut items: VecDeque<Event> = [
            presence(1, 1),
            Event::Pong(5),
            presence(2, 2),
            presence(1, 3),
        ]
        .into();
        assert_eq!(compact(&mut items), 1);
        assert_eq!(
            items,
            VecDeque::from([Event::Pong(5), presence(2, 2), presence(1, 3)])
        );
    }

    #[tokio::test]
    async fn closing_wakes_whoever_waits_for_the_end() {
        let sub = Arc::new(Subscriber::new(1, Visibility::Everyone, 8, None));
        let waiter = {
            let sub = sub.clone();
            tokio::spawn(async move { sub.ended().await })
        };
        tokio::task::yield_now().await;
        sub.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("a closed subscriber must release the device's reader")
            .unwrap();
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_end_event() {
        let sub = Arc::new(Subscriber::new(1, Visibility::Everyone, 8, None));
        let mut stream = EventStream::new(sub.clone(), Box::new(|| {}));
        sub.push(presence(3, 1));
        sub.end(EndReason::Shutdown);
        sub.push(presence(3, 2));
        assert_eq!(stream.next().await, Some(presence(3, 1)));
        assert_eq!(stream.next().await, Some(Event::End(EndReason::Shutdown)));
        assert_eq!(stream.next().await, None, "nothing after End");
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

    #[tokio::test]
    async fn a_presence_wake_up_is_deferred_to_the_batch_with_its_group() {
        let batcher = WakeBatcher::start(std::time::Duration::from_secs(3600));
        let sub = Arc::new(Subscriber::new(
            1,
            Visibility::Everyone,
            8,
            Some(batcher.clone()),
        ));
        sub.set_wake_group(42);
        let log = Arc::new(Mutex::new(Vec::new()));
        let waker = futures::task::waker(Arc::new(Woken {
            id: 1,
            log: log.clone(),
        }));
        let mut cx = Context::from_waker(&waker);
        assert!(
            sub.poll_next_event(&mut cx).is_pending(),
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
}
