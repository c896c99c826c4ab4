//! The write-behind flusher: the one task that writes presence rows. Changes are coalesced per
//! user in memory (an entry is marked dirty once, however often it changes) and written every
//! flush interval as sorted multi-row upserts. A failed write is retried with backoff and
//! nothing is dropped: the rows stay dirty in memory, which is the truth. The same task
//! checkpoints online users ("still online at T") and evicts idle entries.
use std::time::Duration;

use tokio::sync::watch;

use std::sync::atomic::Ordering;

use crate::domain::{UserId, now_millis};
use crate::store::{MAX_ROWS_PER_STATEMENT, PresenceRow};

use super::Engine;
use super::registry::mark_dirty;

/// Longest wait between retries of a failing flush.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Whether the flush wrote everything it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flushed {
    All,
    /// A statement failed: the rows not written are dirty again and wait for the next try.
    Failed,
}

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
            Flushed::All => Duration::ZERO,
            Flushed::Failed => next_backoff(backoff),
        };
    }
    // Final flush: retried until it succeeds; the caller bounds shutdown with a deadline.
    let mut backoff = Duration::ZERO;
    loop {
        match engine.flush().await {
            Flushed::All => break,
            Flushed::Failed => {
                backoff = next_backoff(backoff).min(Duration::from_secs(2));
                tokio::time::sleep(backoff).await;
            }
        }
    }
    match engine
        .shared
        .store
        .stop_node(&engine.shared.node, now_millis())
        .await
    {
        Ok(()) => tracing::info!("all presence changes flushed; clean stop recorded"),
        Err(e) => tracing::error!(error = %e, "could not record the clean stop"),
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
    /// Writes every dirty row (and the rows of users changed here but not held in memory). On
    /// failure the rows not written are marked dirty again (their in-memory state is at least
    /// as new as what failed). In cluster mode, users written offline are then released from
    /// the backplane (the store has them).
    pub(super) async fn flush(&self) -> Flushed {
        let mut rows = self.take_dirty_rows();
        let loose: Vec<PresenceRow> = self
            .shared
            .loose_rows
            .lock()
            .expect("loose rows lock poisoned")
            .drain()
            .map(|(_, row)| row)
            .collect();
        rows.extend(loose);
        // One row per user (a user can be both dirty and loose when it was loaded meanwhile):
        // the newest. A statement must not write one key twice.
        rows.sort_unstable_by(|a, b| a.user_id.cmp(&b.user_id).then(b.version.cmp(&a.version)));
        rows.dedup_by_key(|r| r.user_id);
        if rows.is_empty() {
            if !self.store_ok() {
                // Nothing to write, so probe: health must recover when the database does.
                let probe = UserId::parse(1).expect("1 is a valid user id");
                let ok = self.shared.store.load_presence(&[probe]).await.is_ok();
                self.shared.store_ok.store(ok, Ordering::Relaxed);
            }
            self.evict_idle();
            return Flushed::All;
        }
        let started = std::time::Instant::now();
        let c = &self.shared.counters;
        for (i, chunk) in rows.chunks(MAX_ROWS_PER_STATEMENT).enumerate() {
            if let Err(e) = self
                .shared
                .store
                .upsert_presence_batch(chunk, &self.shared.node)
                .await
            {
                c.db_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.store_ok.store(false, Ordering::Relaxed);
                let unwritten = &rows[i * MAX_ROWS_PER_STATEMENT..];
                tracing::warn!(
                    error = %e,
                    transient = e.is_transient(),
                    rows = unwritten.len(),
                    "presence flush failed; will retry"
                );
                self.redirty(unwritten);
                return Flushed::Failed;
            }
            c.db_statements.fetch_add(1, Ordering::Relaxed);
            self.shared.store_ok.store(true, Ordering::Relaxed);
            c.db_rows.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        tracing::debug!(rows = rows.len(), elapsed = ?started.elapsed(), "presence flushed");
        metrics::histogram!("presence_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("presence_flush_rows").record(rows.len() as f64);
        if let Some(bp) = &self.shared.backplane {
            // Rows this node owed are written: a reaper need not visit those it holds no
            // device of, and offline users may leave the backplane (the store has them).
            let settled: Vec<UserId> = rows
                .iter()
                .map(|r| r.user_id)
                .filter(|&u| {
                    self.shard(u)
                        .users
                        .get(&u)
                        .is_none_or(|e| e.local().total == 0)
                })
                .collect();
            let offline: Vec<(UserId, u64)> = rows
                .iter()
                .filter(|r| !r.is_online)
                .map(|r| (r.user_id, r.version))
                .collect();
            // Released before they leave this node's set: a node killed between the two
            // leaves users a reaper visits (and finds gone), never a hash nobody will visit.
            for chunk in offline.chunks(MAX_ROWS_PER_STATEMENT) {
                if let Err(e) = bp.release(chunk).await {
                    tracing::debug!(error = %e, "could not release offline users from the backplane; their state expires there");
                    break;
                }
            }
            for chunk in settled.chunks(MAX_ROWS_PER_STATEMENT) {
                if let Err(e) = bp.settled(chunk).await {
                    tracing::debug!(error = %e, "could not tell the backplane which rows are written; a reaper writes them again");
                    break;
                }
            }
        }
        self.evict_idle();
        Flushed::All
    }

    fn take_dirty_rows(&self) -> Vec<PresenceRow> {
        let mut rows = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().expect("shard lock poisoned");
            let dirty = std::mem::take(&mut shard.dirty);
            for u in dirty {
                if let Some(e) = shard.users.get_mut(&u) {
                    e.dirty = false;
                    rows.push(e.row(u, self.epoch()));
                }
            }
        }
        self.shared
            .counters
            .dirty_users
            .fetch_sub(rows.len() as u64, Ordering::Relaxed);
        rows
    }

    /// Marks rows that failed to be written dirty again; rows of users no longer in memory
    /// wait with the loose rows.
    fn redirty(&self, rows: &[PresenceRow]) {
        for row in rows {
            let u = row.user_id;
            let mut guard = self.shard(u);
            let shard = &mut *guard;
            if shard.users.contains_key(&u) {
                mark_dirty(shard, u, &self.shared.counters.dirty_users);
            } else {
                drop(guard);
                self.shared
                    .loose_rows
                    .lock()
                    .expect("loose rows lock poisoned")
                    .entry(u)
                    .or_insert_with(|| row.clone());
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
                if e.local().total > 0 || e.presence().grace.is_some() {
                    // Kept in memory too, so a later upsert of the row carries it.
                    e.set_checkpoint(now);
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
}
