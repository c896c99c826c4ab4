//! The pending events of one receiver: a bounded FIFO laid out for fan-out.
//!
//! Fan-out pushes on one core and the receiver's stream pops on the other, so every delivery
//! moves the queue's memory between cores; a cache miss costs more than the rest of a push or a
//! pop. A receiver almost always has zero or one event pending, so the oldest one lives inline,
//! in the cache line of the queue's lock (see `Subscriber`), and only a second pending event
//! spills into a `VecDeque` beside it. perf, 300k deliveries/s: the lock and the separately
//! allocated element were the two misses that made the pop 8.7 % of the server's cycles.
//!
//! Bounded like every queue of the engine: at `compact_at` events it is compacted to the newest
//! presence per user (presence is state, so the final state still arrives), and at most one
//! pong waits (a client that pings without reading gets its newest pong only).
use std::collections::{HashMap, VecDeque};

use super::subscriber::Event;

/// The pending events, oldest first.
pub(super) struct Pending {
    head: Option<Event>,
    /// The events after `head`; allocated on the first second pending event, then kept.
    spill: Option<Box<Spill>>,
    len: u32,
    /// An `End` was queued: nothing more is accepted. Kept here, in the lock's cache line.
    pub ended: bool,
    /// The device's reader was woken (a message arrived); see `Subscriber::wake_reader`.
    pub reader_woken: bool,
}

struct Spill {
    rest: VecDeque<Event>,
    /// Compaction runs at this length; it moves up after a compaction that could not shrink
    /// the queue enough, so a large but legitimate backlog is not re-scanned on every push.
    compact_at: usize,
}

impl Pending {
    pub const fn new() -> Pending {
        Pending {
            head: None,
            spill: None,
            len: 0,
            ended: false,
            reader_woken: false,
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn pop_front(&mut self) -> Option<Event> {
        let event = self.head.take()?;
        self.len -= 1;
        if self.len > 0 {
            self.head = self.spill.as_mut().and_then(|s| s.rest.pop_front());
        }
        Some(event)
    }

    /// The newest pending event.
    pub fn back(&self) -> Option<&Event> {
        match &self.spill {
            Some(s) if !s.rest.is_empty() => s.rest.back(),
            _ => self.head.as_ref(),
        }
    }

    /// Queues `event` behind the others, keeping the queue bounded by `capacity`. Returns how
    /// many queued presences a compaction replaced (0 normally), for the `coalesced` counter.
    pub fn push(&mut self, event: Event, capacity: usize) -> usize {
        if self.head.is_none() {
            self.head = Some(event);
            self.len = 1;
            return 0;
        }
        let is_pong = matches!(event, Event::Pong(_));
        let spill = self.spill.get_or_insert_with(|| {
            Box::new(Spill {
                rest: VecDeque::new(),
                compact_at: capacity.max(1),
            })
        });
        if !is_pong && (self.len as usize) < spill.compact_at {
            spill.rest.push_back(event);
            self.len += 1;
            return 0;
        }
        // The rare paths work on the whole queue at once.
        let mut all = self.take_all();
        if is_pong && let Some(i) = all.iter().rposition(|e| matches!(e, Event::Pong(_))) {
            all.remove(i);
        }
        let compact_at = self.spill.as_ref().map_or(capacity, |s| s.compact_at);
        let mut coalesced = 0;
        let mut next_compact_at = compact_at;
        if all.len() >= compact_at {
            coalesced = compact(&mut all, |e| match e {
                Event::Presence(p) => Some(p.view().user_id.get()),
                _ => None,
            });
            next_compact_at = capacity.max(1).max(all.len() * 2);
        }
        all.push_back(event);
        self.refill(all);
        if let Some(s) = &mut self.spill {
            s.compact_at = next_compact_at;
        }
        coalesced
    }

    /// Takes every pending event, oldest first, leaving the queue empty.
    pub fn take_all(&mut self) -> VecDeque<Event> {
        let mut all = match &mut self.spill {
            Some(s) => std::mem::take(&mut s.rest),
            None => VecDeque::new(),
        };
        if let Some(head) = self.head.take() {
            all.push_front(head);
        }
        self.len = 0;
        all
    }

    fn refill(&mut self, mut all: VecDeque<Event>) {
        self.len = all.len() as u32;
        self.head = all.pop_front();
        if let Some(s) = &mut self.spill {
            s.rest = all;
        } else if !all.is_empty() {
            self.spill = Some(Box::new(Spill {
                compact_at: all.len().max(1),
                rest: all,
            }));
        }
    }

    /// The pending events, oldest first (tests and stats).
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<Event> {
        let rest = self.spill.iter().flat_map(|s| s.rest.iter());
        self.head.iter().chain(rest).cloned().collect()
    }
}

/// Keeps only the newest presence per key (in the order of their newest), and every other
/// event in place. Returns how many events were dropped.
pub(super) fn compact<T>(items: &mut VecDeque<T>, key: impl Fn(&T) -> Option<u64>) -> usize {
    let before = items.len();
    let mut newest: HashMap<u64, usize> = HashMap::with_capacity(before);
    for (i, e) in items.iter().enumerate() {
        if let Some(k) = key(e) {
            newest.insert(k, i);
        }
    }
    let mut i = 0;
    items.retain(|e| {
        let keep = match key(e) {
            Some(k) => newest.get(&k) == Some(&i),
            None => true,
        };
        i += 1;
        keep
    });
    before - items.len()
}

#[cfg(test)]
mod tests {
    use super::super::subscriber::test_presence as presence;
    use super::*;

    fn versions(p: &Pending) -> Vec<u64> {
        p.to_vec()
            .iter()
            .map(|e| match e {
                Event::Presence(u) => u.view().version,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn events_come_out_in_the_order_they_went_in() {
        let mut p = Pending::new();
        for v in 1..=5 {
            p.push(presence(v, v), 100);
        }
        assert_eq!(p.len(), 5);
        assert_eq!(versions(&p), vec![1, 2, 3, 4, 5]);
        let mut out = Vec::new();
        while let Some(Event::Presence(u)) = p.pop_front() {
            out.push(u.view().version);
        }
        assert_eq!(out, vec![1, 2, 3, 4, 5]);
        assert_eq!(p.len(), 0);
        p.push(presence(9, 6), 100);
        assert_eq!(versions(&p), vec![6], "usable again after emptying");
    }

    #[test]
    fn a_full_queue_keeps_only_the_newest_presence_per_user() {
        let mut p = Pending::new();
        for v in 1..=1000 {
            p.push(presence(1 + v % 2, v), 4);
        }
        assert!(p.len() <= 4, "queue must stay bounded, has {}", p.len());
        let v = versions(&p);
        assert!(v.contains(&1000) && v.contains(&999), "newest kept: {v:?}");
        assert!(v.windows(2).all(|w| w[0] < w[1]), "order kept: {v:?}");
    }

    #[test]
    fn at_most_one_pong_waits_and_it_is_the_newest() {
        let mut p = Pending::new();
        p.push(presence(1, 1), 8);
        for nonce in 0..100_000 {
            p.push(Event::Pong(nonce), 8);
        }
        p.push(presence(2, 1), 8);
        assert_eq!(
            p.to_vec(),
            vec![presence(1, 1), Event::Pong(99_999), presence(2, 1)],
            "a flood of pings leaves one pong, after the updates queued before it"
        );
        let mut q = Pending::new();
        q.push(Event::Pong(1), 8);
        q.push(Event::Pong(2), 8);
        assert_eq!(
            q.to_vec(),
            vec![Event::Pong(2)],
            "also when the pong is the head"
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
        let key = |e: &Event| match e {
            Event::Presence(p) => Some(p.view().user_id.get()),
            _ => None,
        };
        assert_eq!(compact(&mut items, key), 1);
        assert_eq!(
            items,
            VecDeque::from([Event::Pong(5), presence(2, 2), presence(1, 3)])
        );
    }

    #[test]
    fn the_back_is_the_newest_event() {
        let mut p = Pending::new();
        assert!(p.back().is_none());
        p.push(presence(1, 1), 8);
        assert_eq!(p.back(), Some(&presence(1, 1)));
        p.push(Event::Pong(3), 8);
        assert_eq!(p.back(), Some(&Event::Pong(3)));
        p.pop_front();
        assert_eq!(p.back(), Some(&Event::Pong(3)));
    }
}
