//! Where every device task, driver and worker records what it saw: counters and latency
//! histograms.
//!
//! The bench shares two cores with the server, so a delivery must cost it little. A single
//! `Mutex<Histogram>` would be taken 300,000 times a second from both worker threads; instead
//! the recorder holds one slot per thread (a thread picks its slot once, in a thread-local), so
//! the lock taken per event is uncontended. Readers (the progress line, the final report) sum the
//! slots.
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Slots in a recorder; threads beyond this share slots (still correct, only less private).
const SLOTS: usize = 16;

/// Most error messages kept verbatim; the rest are only counted.
const KEPT_ERRORS: usize = 20;

/// Highest latency a histogram tells apart, in microseconds (one minute); longer ones are
/// recorded as one minute.
const MAX_MICROS: u64 = 60_000_000;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Event counts, summed over every slot.
        #[derive(Debug, Default, Clone, Copy, Serialize)]
        pub struct Counters {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            fn add(&mut self, other: &Counters) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

counters! {
    /// Authenticate streams that got their welcome (first connections).
    connects,
    /// Authenticate streams that failed before their welcome.
    connect_errors,
    /// Reconnections of a flapping device that got their welcome.
    reconnects,
    reconnect_errors,
    /// Flaps asked of devices.
    flaps,
    /// Authenticate attempts refused with UNAVAILABLE and retried after a backoff.
    open_retries,
    /// Status changes handed to device streams.
    changes_sent,
    /// Churn changes received by a tracked contact (each is one matched delivery).
    churn_received,
    /// Churn changes a tracked receiver never got because a newer version of the same user
    /// arrived first: the server coalesced a full queue (by design, counted as `coalesced`).
    superseded,
    /// Churn changes whose final version never reached a tracked receiver.
    lost,
    /// presence_updated of a user with a version not above the last one this stream saw.
    out_of_order,
    /// Churn deliveries whose status is not the one the change set.
    wrong_status,
    /// presence_updated about a user who is neither the stream's user nor in its welcome.
    unexpected,
    /// Churn changes received by an untracked (flapping) device.
    churn_untracked,
    /// presence_updated about contacts that is not a churn change (connects, flaps).
    other_received,
    /// presence_updated about the stream's own user (the echo of its own changes).
    echoes,
    /// Device streams that ended with an error or that the server closed.
    stream_errors,
    /// Commands that found their device's stream already dead.
    dead_commands,
    /// GetPresence calls answered.
    queries,
    /// Ids in the answered GetPresence calls.
    query_ids,
    query_errors,
    /// Open-loop GetPresence calls not made because too many were already in flight.
    query_skipped,
    /// Devices the server confirmed in the background (the pong after set_activity).
    backgrounded,
    /// presence_updated received by a device in the background: the server must skip those.
    passive_received,
    /// Resyncs received whole (their last page), one per woken device.
    resyncs,
    /// Entries in those resyncs.
    resync_entries,
    /// Resync entries not newer than what the device had of that user, or of a stranger.
    resync_stale,
    /// Resync entries repeating a user already in the same resync.
    resync_duplicates,
    /// Resyncs received by a device not in the background, or never asked to wake.
    resync_unexpected,
    /// Woken devices whose whole resync did not arrive within the wave's time limit.
    resyncs_missing,
}

/// The histograms a recorder keeps, all in microseconds.
#[derive(Debug, Clone, Copy)]
pub enum Hist {
    /// Authenticate call to welcome, first connections.
    Welcome,
    /// Authenticate call to welcome, reconnections of flapping devices.
    Reconnect,
    /// Scheduled time of a status change to its delivery at a contact.
    Delivery,
    /// How late the driver handed a change to its device, after its scheduled time.
    SendLag,
    /// GetPresence, from the scheduled (open loop) or actual (closed loop) start to the answer.
    Query,
    /// A woken device: from the driver's set_activity ACTIVE to its resync's last page.
    Wake,
    /// Entries per resync (a count, not a time).
    ResyncSize,
}

const HISTS: usize = 7;

/// One thread's share.
pub struct Tally {
    pub counters: Counters,
    hists: [Histogram<u64>; HISTS],
}

impl Tally {
    fn new() -> Tally {
        Tally {
            counters: Counters::default(),
            hists: std::array::from_fn(|_| new_histogram()),
        }
    }

    /// One histogram record per event: the progress line's one-second view is the difference
    /// of two snapshots (see [`Recorder::take_recent`]), not a second histogram kept per event.
    pub fn record(&mut self, hist: Hist, latency: Duration) {
        self.record_value(hist, (latency.as_micros() as u64).max(1));
    }

    /// Records a value (microseconds, or a count for [`Hist::ResyncSize`]).
    pub fn record_value(&mut self, hist: Hist, value: u64) {
        self.hists[hist as usize].saturating_record(value.min(MAX_MICROS));
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("1 µs to 60 s at 3 digits is a valid range")
}

/// Cache-line aligned so two threads' slots never share a line.
#[repr(align(128))]
struct Slot(Mutex<Tally>);

/// A cheap place to count and time events from any task; see the module comment.
pub struct Recorder {
    slots: Box<[Slot]>,
    errors: Mutex<Vec<String>>,
    /// What [`Recorder::take_recent`] last saw of each histogram.
    seen: Mutex<Vec<Histogram<u64>>>,
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot index, picked on first use.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn my_slot() -> usize {
    SLOT.with(|s| match s.get() {
        Some(i) => i,
        None => {
            let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            s.set(Some(i));
            i
        }
    })
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            slots: (0..SLOTS).map(|_| Slot(Mutex::new(Tally::new()))).collect(),
            errors: Mutex::new(Vec::new()),
            seen: Mutex::new((0..HISTS).map(|_| new_histogram()).collect()),
        }
    }
}

impl Recorder {
    /// Runs `f` on this thread's tally. Never `.await` inside: it holds the slot's lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut Tally) -> R) -> R {
        let mut t = self.slots[my_slot()]
            .0
            .lock()
            .expect("recorder slot poisoned: a panic while recording");
        f(&mut t)
    }

    /// Keeps the first few error messages for the report.
    pub fn error(&self, what: impl std::fmt::Display) {
        let mut e = self.errors.lock().expect("error list poisoned");
        if e.len() < KEPT_ERRORS {
            e.push(what.to_string());
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("error list poisoned").clone()
    }

    /// The counters summed over every slot.
    pub fn counters(&self) -> Counters {
        let mut sum = Counters::default();
        for s in self.slots.iter() {
            sum.add(&s.0.lock().expect("recorder slot poisoned").counters);
        }
        sum
    }

    /// One histogram merged over every slot.
    pub fn histogram(&self, hist: Hist) -> Histogram<u64> {
        let mut sum = new_histogram();
        for s in self.slots.iter() {
            let t = s.0.lock().expect("recorder slot poisoned");
            let h = &t.hists[hist as usize];
            // Slots of threads that never ran are empty, and adding one still walks it.
            if !h.is_empty() {
                sum.add(h)
                    .expect("histograms with the same bounds always merge");
            }
        }
        sum
    }

    /// The distribution recorded since the last call, merged over every slot: the merged
    /// histogram now, less the one the last call saw.
    pub fn take_recent(&self, hist: Hist) -> Quantiles {
        let now = self.histogram(hist);
        let mut seen = self.seen.lock().expect("seen histograms poisoned");
        let mut recent = now.clone();
        // Histograms only grow, so this never fails; if it did, show everything.
        if recent.subtract(&seen[hist as usize]).is_err() {
            recent = now.clone();
        }
        seen[hist as usize] = now;
        Quantiles::of(&recent)
    }

    pub fn quantiles(&self, hist: Hist) -> Quantiles {
        Quantiles::of(&self.histogram(hist))
    }
}

/// A distribution of counts (entries per resync).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Sizes {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Recorder {
    pub fn sizes(&self, hist: Hist) -> Sizes {
        let h = self.histogram(hist);
        if h.is_empty() {
            return Sizes::default();
        }
        Sizes {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Quantiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// "p50 1.2 / p99 8.4 / p999 20.1 / max 31.0 ms"
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "none".into();
        }
        format!(
            "p50 {} / p99 {} / p999 {} / max {} ms",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.p999_ms),
            fmt_ms(self.max_ms)
        )
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_are_summed() {
        let r = std::sync::Arc::new(Recorder::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        r.with(|t| {
                            t.counters.churn_received += 1;
                            t.record(Hist::Delivery, Duration::from_millis(2));
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            r.counters().churn_received,
            4000,
            "every thread's count is kept"
        );
        let q = r.quantiles(Hist::Delivery);
        assert_eq!(q.count, 4000, "every thread's latencies are merged");
        assert!(
            (q.p50_ms - 2.0).abs() < 0.01,
            "2 ms recorded, got {}",
            q.p50_ms
        );
    }
}
