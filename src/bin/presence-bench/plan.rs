//! Open-loop timetables, and the churn plan that lets every receiver find, from a delivery alone,
//! which change it is and when that change was scheduled.
//!
//! Change `i` of a churn run is scheduled at `t0 + i / R` and made by the churner at position
//! `i % M` of a shuffled order of the M churners; it is that user's `k = i / M`-th change. A
//! user's version grows by one with every change of its effective status, and in a churn run
//! only the user's own changes move it, so the change a receiver sees as `(user, version)` is
//! `k = version - base - 1`, where `base` is the version the user's welcome reported right after
//! it connected. Nothing is shared between the driver and the receivers but this read-only plan
//! (and a per-user count of changes sent, read at the end): no map of send times, no lock.
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use presence::pb;

/// A fixed timetable: event `i` is due at `t0 + i / rate`, for `total` events.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub t0: Instant,
    /// Events per second.
    pub rate: u64,
    pub total: u64,
}

impl Schedule {
    pub fn new(t0: Instant, rate: u64, duration: Duration) -> Schedule {
        let rate = rate.max(1);
        Schedule {
            t0,
            rate,
            total: (rate as f64 * duration.as_secs_f64()).round() as u64,
        }
    }

    /// When event `i` is due.
    pub fn at(&self, i: u64) -> Instant {
        // In u64 (a receiver computes this per delivery; u128 division is a library call):
        // rate * duration <= 3.6e9 events, so i * 1e9 fits.
        let nanos = match i.checked_mul(1_000_000_000) {
            Some(n) => n / self.rate,
            None => (i as u128 * 1_000_000_000 / self.rate as u128) as u64,
        };
        self.t0 + Duration::from_nanos(nanos)
    }

    /// How many events are due at `now` (all those scheduled at or before it).
    fn due(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.t0).as_nanos();
        ((elapsed * self.rate as u128 / 1_000_000_000) as u64 + 1).min(self.total)
    }

    /// Calls `fire(i, scheduled, now)` for every event, in order, as each falls due: a 1 ms
    /// tick fires every event due by then, so a late tick catches up instead of shifting the
    /// timetable (open loop: nothing waits for a reply).
    pub async fn run(&self, mut fire: impl FnMut(u64, Instant, Instant)) {
        tokio::time::sleep_until(self.t0.into()).await;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut i = 0;
        while i < self.total {
            tick.tick().await;
            let now = Instant::now();
            let due = self.due(now);
            while i < due {
                fire(i, self.at(i), now);
                i += 1;
            }
        }
    }
}

/// The statuses a churner cycles through: each differs from the one before, so every change is
/// a real change of effective status (and of version).
const CYCLE: [pb::Status; 3] = [pb::Status::Online, pb::Status::Away, pb::Status::Busy];

/// Position in [`CYCLE`] of a status a user starts from; OFFLINE (invisible) starts the cycle at
/// ONLINE, which is then its first change.
pub fn cycle_index(status: i32) -> u8 {
    match pb::Status::try_from(status) {
        Ok(pb::Status::Online) => 0,
        Ok(pb::Status::Away) => 1,
        _ => 2,
    }
}

const NOT_A_CHURNER: u32 = u32::MAX;

/// Who changes status when, and what each receiver should therefore see.
pub struct Plan {
    pub schedule: Schedule,
    /// Churners in the order the timetable visits them.
    order: Vec<u64>,
    /// By user id. One struct per user rather than a vector per field: a receiver looks up a
    /// random user per delivery, and this way it costs one cache miss, not four.
    users: Vec<PerUser>,
}

#[derive(Default)]
struct PerUser {
    /// The version the user's welcome reported.
    base: u64,
    /// Changes handed to the user's device. Written by the driver only.
    sent: AtomicU32,
    /// Position in `order`, or NOT_A_CHURNER.
    position: u32,
    /// The status the user's welcome reported, as a cycle index.
    base_status: u8,
}

/// A churn change, as identified from a delivery.
pub struct Change {
    pub scheduled: Instant,
    pub status: i32,
    /// The user's version before its first change.
    pub base: u64,
}

impl Plan {
    /// `churners` must be shuffled already; `base` gives each user's (version, status) as its
    /// welcome reported them; `max_user` bounds the user ids.
    pub fn new(
        schedule: Schedule,
        churners: Vec<u64>,
        max_user: u64,
        base: impl Fn(u64) -> (u64, i32),
    ) -> Plan {
        let mut users: Vec<PerUser> = (0..=max_user)
            .map(|_| PerUser {
                position: NOT_A_CHURNER,
                ..PerUser::default()
            })
            .collect();
        for (p, &u) in churners.iter().enumerate() {
            let (version, status) = base(u);
            let e = &mut users[u as usize];
            e.position = p as u32;
            e.base = version;
            e.base_status = cycle_index(status);
        }
        Plan {
            schedule,
            order: churners,
            users,
        }
    }

    pub fn churners(&self) -> &[u64] {
        &self.order
    }

    /// The user and status of change `i`, counting it as sent.
    pub fn take(&self, i: u64) -> (u64, pb::Status) {
        let m = self.order.len() as u64;
        let user = self.order[(i % m) as usize];
        let k = i / m;
        self.users[user as usize]
            .sent
            .fetch_add(1, Ordering::Relaxed);
        (user, self.status_of(user, k))
    }

    fn status_of(&self, user: u64, k: u64) -> pb::Status {
        let start = self.users[user as usize].base_status as u64;
        CYCLE[((start + k + 1) % CYCLE.len() as u64) as usize]
    }

    fn churner(&self, user: u64) -> Option<&PerUser> {
        self.users
            .get(user as usize)
            .filter(|e| e.position != NOT_A_CHURNER)
    }

    /// The churn change a delivery of `(user, version)` carries, if it is one.
    pub fn change(&self, user: u64, version: u64) -> Option<Change> {
        let e = self.churner(user)?;
        let base = e.base;
        // Above the changes sent, the version moved for another reason (the user's device
        // leaving at the end of the run).
        if version <= base || version > base + e.sent.load(Ordering::Relaxed) as u64 {
            return None;
        }
        let k = version - base - 1;
        Some(Change {
            scheduled: self
                .schedule
                .at(k * self.order.len() as u64 + e.position as u64),
            status: self.status_of(user, k) as i32,
            base,
        })
    }

    /// For a churner: (base version, version after every change sent so far).
    pub fn versions(&self, user: u64) -> Option<(u64, u64)> {
        let e = self.churner(user)?;
        Some((e.base, e.base + e.sent.load(Ordering::Relaxed) as u64))
    }

    /// Changes sent of `user`.
    pub fn sent(&self, user: u64) -> u64 {
        self.users
            .get(user as usize)
            .map_or(0, |e| e.sent.load(Ordering::Relaxed) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_maps_back_to_the_change_that_caused_it() {
        let t0 = Instant::now();
        let schedule = Schedule::new(t0, 1000, Duration::from_secs(1));
        let plan = Plan::new(schedule, vec![3, 1, 2], 3, |u| (10 * u, 1));
        let mut sent = Vec::new();
        for i in 0..7 {
            sent.push(plan.take(i));
        }
        // Change 4 is user 1's (position 1) second change: version base + 2.
        assert_eq!(sent[4].0, 1);
        let c = plan.change(1, 12).expect("a churn version");
        assert_eq!(c.scheduled, schedule.at(4), "scheduled time of change 4");
        assert_eq!(c.status, sent[4].1 as i32, "the status change 4 set");
        assert!(
            plan.change(1, 10).is_none(),
            "the base version is no change"
        );
        assert_eq!(
            plan.versions(3),
            Some((30, 33)),
            "user 3 got changes 0, 3, 6"
        );
    }

    #[test]
    fn statuses_always_change() {
        let plan = Plan::new(
            Schedule::new(Instant::now(), 1, Duration::from_secs(1)),
            vec![1],
            1,
            |_| (0, pb::Status::Away as i32),
        );
        let mut prev = pb::Status::Away;
        for k in 0..10 {
            let s = plan.status_of(1, k);
            assert_ne!(s, prev, "change {k} repeats its status");
            prev = s;
        }
    }

    #[test]
    fn the_timetable_counts_events_due() {
        let s = Schedule::new(Instant::now(), 100, Duration::from_secs(2));
        assert_eq!(s.total, 200);
        assert_eq!(s.due(s.t0), 1, "event 0 is due at t0");
        assert_eq!(s.due(s.t0 + Duration::from_millis(15)), 2);
        assert_eq!(
            s.due(s.t0 + Duration::from_secs(9)),
            200,
            "never past total"
        );
    }
}
