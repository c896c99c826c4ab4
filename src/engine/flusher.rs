//! The write-behind flusher: the one task that writes presence rows. Changes are coalesced per
//! user in memory (an entry is marked dirty once, however often it changes) and written every
//! flush interval as sorted multi-row upserts. A failed write is retried with backoff and
//! nothing is dropped: the rows stay dirty in memory, which is the truth. The same task
//! checkpoints online users ("still online at T") and evicts idle entries.
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::{UserId, now_millis};
use crate::store::{MAX_ROWS_PER_STATEMENT, PresenceRow};

use super::Engine;
use std::sync::atomic::Ordering;

/// Longest wait between retries of a failing flush.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(super) async fn run(engine: Engine, mut stop: watch::Receiver<bool>) {
    let config = engine.shared.config.clone();
    let mut flush_tick = tokio::time::interval(config.flush_interval);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoint_tick = tokio::time::interval(config.checkpoint_interval);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint_tick.tick().await;
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            _ = flush_tick.tick() => {}
            _ = checkpoint_tick.tick() => engine.checkpoint().await,
            _ = stop.changed() => break,
        }
        if !backoff.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
        }
        backoff = match engine.flush().await {
            Ok(()) => Duration::ZERO,
            Err(()) => next_backoff(backoff),
        };
    }
    // Final flush: retried until it succeeds; the caller bounds shutdown with a deadline.
    let mut backoff = Duration::ZERO;
    loop {
        match engine.flush().await {
            Ok(()) => break,
            Err(()) => {
                backoff = next_backoff(backoff).min(Duration::from_secs(2));
                tokio::time::sleep(backoff).await;
            }
        }
    }
    match engine.shared.store.mark_clean_shutdown().await {
        Ok(()) => tracing::info!("all presence changes flushed; clean shutdown recorded"),
        Err(e) => tracing::error!(error = %e, "could not record the clean shutdown"),
    }
}

fn next_backoff(current: Duration) -> Duration {
    let base = if current.is_zero() {
        Duration::from_millis(100)
    } else {
        (current * 2).min(MAX_BACKOFF)
    };
    // Jitter, so that nodes retrying against one recovering database do not stampede it.
    base.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

impl Engine {
    /// Writes every dirty row. On failure the rows not written are marked dirty again (their
    /// in-memory state is at least as new as what failed) and Err is returned.
    pub(super) async fn flush(&self) -> Result<(), ()> {
        let mut rows = self.take_dirty_rows();
        if rows.is_empty() {
            if !self.store_ok() {
                // Nothing to write, so probe: health must recover when the database does.
                let probe = UserId::parse(1).expect("1 is a valid user id");
                let ok = self.shared.store.load_presence(&[probe]).await.is_ok();
                self.shared.store_ok.store(ok, Ordering::Relaxed);
            }
            self.evict_idle();
            return Ok(());
        }
        rows.sort_unstable_by_key(|r| r.user_id);
        let started = std::time::Instant::now();
        let c = &self.shared.counters;
        for (i, chunk) in rows.chunks(MAX_ROWS_PER_STATEMENT).enumerate() {
            if let Err(e) = self.shared.store.upsert_presence_batch(chunk).await {
                c.db_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.store_ok.store(false, Ordering::Relaxed);
                let unwritten = &rows[i * MAX_ROWS_PER_STATEMENT..];
                tracing::warn!(
                    error = %e,
                    transient = e.is_transient(),
                    rows = unwritten.len(),
                    "presence flush failed; will retry"
                );
                self.mark_dirty(unwritten.iter().map(|r| r.user_id));
                return Err(());
            }
            c.db_statements.fetch_add(1, Ordering::Relaxed);
            self.shared.store_ok.store(true, Ordering::Relaxed);
            c.db_rows.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        tracing::debug!(rows = rows.len(), elapsed = ?started.elapsed(), "presence flushed");
        metrics::histogram!("presence_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("presence_flush_rows").record(rows.len() as f64);
        self.evict_idle();
        Ok(())
    }

    fn take_dirty_rows(&self) -> Vec<PresenceRow> {
        let mut rows = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().expect("shard lock poisoned");
            let dirty = std::mem::take(&mut shard.dirty);
            for u in dirty {
                if let Some(e) = shard.users.get_mut(&u) {
                    e.dirty = false;
                    rows.push(e.row(u, self.shared.epoch));
                }
            }
        }
        self.shared
            .counters
            .dirty_users
            .fetch_sub(rows.len() as u64, Ordering::Relaxed);
        rows
    }

    fn mark_dirty(&self, users: impl Iterator<Item = UserId>) {
        for u in users {
            let mut shard = self.shard(u);
            if let Some(e) = shard.users.get_mut(&u)
                && !e.dirty
            {
                e.dirty = true;
                shard.dirty.push(u);
                self.shared
                    .counters
                    .dirty_users
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records every user with a live device as "still online now", in one statement per 500
    /// users, so that after a crash their last_seen is this moment rather than the restart time.
    /// Runs in the flusher task, which stays the only writer.
    async fn checkpoint(&self) {
        let now = now_millis();
        let mut online = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().expect("shard lock poisoned");
            for (u, e) in shard.users.iter_mut() {
                if e.devices > 0 || e.pending_offline.is_some() {
                    // Kept in memory too, so a later upsert of the row carries it.
                    e.checkpoint_at = Some(now);
                    online.push(*u);
                }
            }
        }
        online.sort_unstable();
        for chunk in online.chunks(MAX_ROWS_PER_STATEMENT) {
            let c = &self.shared.counters;
            match self.shared.store.checkpoint_online(chunk, now).await {
                Ok(()) => {
                    c.db_statements.fetch_add(1, Ordering::Relaxed);
                    self.shared.store_ok.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    c.db_errors.fetch_add(1, Ordering::Relaxed);
                    self.shared.store_ok.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "checkpoint of online users failed; the next one retries");
                    return;
                }
            }
        }
    }

    /// Drops entries nobody needs any more (no device, no watcher, nothing unwritten).
    fn evict_idle(&self) {
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().expect("shard lock poisoned");
            let idle = std::mem::take(&mut shard.idle);
            let mut evicted = false;
            for u in idle {
                match shard.users.get(&u) {
                    Some(e) if e.is_idle() => {
                        shard.users.remove(&u);
                        evicted = true;
                    }
                    // Idle but for an unwritten change: look again after the next flush.
                    Some(e) if e.dirty => shard.idle.push(u),
                    _ => {}
                }
            }
            if evicted {
                shard.evictions += 1;
            }
        }
    }

    /// Flushes now, for tests and the shutdown path. Err when the store refused.
    pub async fn flush_now(&self) -> Result<(), ()> {
        self.flush().await
    }
}
