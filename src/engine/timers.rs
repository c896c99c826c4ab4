//! Timers: graces running out and custom statuses expiring, in one task with one ordered queue
//! (a spawned sleep per pending grace would cost a task for each of thousands of flapping
//! devices). Firing is idempotent: a timer whose grace or status has since changed does nothing.
use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::domain::{Millis, UserId, now_millis};

use super::Engine;

/// What runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Timer {
    Grace { user: UserId, token: u64 },
    Custom { user: UserId, at: Millis },
}

/// The pending timers, soonest first.
#[derive(Default)]
pub(super) struct Timers {
    queue: Mutex<Queue>,
    /// Wakes the task when a timer sooner than the one it sleeps for arrives.
    changed: Notify,
}

#[derive(Default)]
struct Queue {
    due: BTreeSet<(Millis, Timer)>,
    /// What is queued, so the same timer is not queued twice.
    pending: HashSet<Timer>,
}

impl Engine {
    /// Runs `timer` at `at` (at once if that is past).
    pub(super) fn schedule(&self, at: Millis, timer: Timer) {
        let timers = &self.shared.timers;
        let mut q = timers.queue.lock().expect("timers lock poisoned");
        if !q.pending.insert(timer) {
            return;
        }
        let sooner = q.due.first().is_none_or(|(first, _)| at < *first);
        q.due.insert((at, timer));
        drop(q);
        if sooner {
            timers.changed.notify_one();
        }
    }

    /// Every pending grace, to end them now (shutdown).
    pub(super) fn take_graces(&self) -> Vec<(UserId, u64)> {
        let mut q = self
            .shared
            .timers
            .queue
            .lock()
            .expect("timers lock poisoned");
        let graces: Vec<(Millis, Timer)> = q
            .due
            .iter()
            .filter(|(_, t)| matches!(t, Timer::Grace { .. }))
            .copied()
            .collect();
        graces
            .into_iter()
            .filter_map(|(at, t)| {
                q.due.remove(&(at, t));
                q.pending.remove(&t);
                match t {
                    Timer::Grace { user, token } => Some((user, token)),
                    Timer::Custom { .. } => None,
                }
            })
            .collect()
    }

    /// Fires timers as they come due, until stopped.
    pub(super) async fn run_timers(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let timers = &self.shared.timers;
        loop {
            let next = {
                let mut q = timers.queue.lock().expect("timers lock poisoned");
                let now = now_millis();
                match q.due.first().copied() {
                    Some((at, timer)) if at <= now => {
                        q.due.remove(&(at, timer));
                        q.pending.remove(&timer);
                        Ok(timer)
                    }
                    Some((at, _)) => Err(Duration::from_millis((at - now) as u64)),
                    None => Err(Duration::from_secs(3600)),
                }
            };
            // Each fired on its own task: in cluster mode firing is a round trip to the backplane,
            // and a wave of graces running out together must not queue behind one another.
            match next {
                Ok(Timer::Grace { user, token }) => {
                    let engine = self.clone();
                    tokio::spawn(async move { engine.expire_grace(user, token).await });
                }
                Ok(Timer::Custom { user, at }) => {
                    let engine = self.clone();
                    tokio::spawn(async move { engine.expire_custom(user, at).await });
                }
                Err(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = timers.changed.notified() => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }
}
