//! The engine's side of cluster mode: every change goes through one Redis transition (see
//! [`super::cluster`]) and comes back as a shared state that this node applies to its entries
//! and fans out to its local watchers; changes made on other nodes arrive on the subscription.
//! A node whose transition fails (Redis down) falls back to local rules for that user, and
//! restores everything when Redis answers again.
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;

use crate::domain::{UserId, now_millis};

use super::cluster::{Message, Op, SharedState};
use super::{Engine, Entry};

impl Engine {
    pub(super) fn is_cluster(&self) -> bool {
        self.shared.cluster.is_some()
    }

    /// Applies a shared state to the user's entry, if it is in memory and not older, and fans
    /// out what changed. `own`: this node ran the transition, so it writes the row.
    pub(super) fn apply_shared(&self, s: &SharedState, own: bool) {
        let mut guard = self.shard(s.user);
        let shard = &mut *guard;
        let Some(entry) = shard.users.get_mut(&s.user) else {
            return;
        };
        if s.version < entry.version {
            return;
        }
        let before = entry.state(s.user);
        let before_row = entry.row(s.user, 0);
        entry.chosen = s.chosen;
        entry.last_seen = s.last_seen;
        entry.last_offline = s.last_offline;
        entry.version = s.version;
        entry.offline_version = s.offline_version;
        entry.privacy = s.privacy;
        entry.cluster_view = Some((s.effective, s.connected));
        let after = entry.state(s.user);
        if after.version > before.version {
            if own {
                self.shared.counters.changes.fetch_add(1, Ordering::Relaxed);
            }
            self.fan_out(entry, &before, &after);
            for v in &entry.viewers {
                v.set_own_last_seen(entry.privacy.last_seen);
            }
        }
        if own && entry.row(s.user, 0) != before_row {
            self.mark_dirty_locked(shard, s.user);
        }
    }

    /// Runs `op` for the user through Redis and applies the result. False when not in cluster
    /// mode or Redis failed: the caller then applies the change with local rules.
    pub(super) async fn shared_transition(&self, user: UserId, op: Op) -> bool {
        let Some(cluster) = self.shared.cluster.clone() else {
            return false;
        };
        let seed = {
            let shard = self.shard(user);
            match shard.users.get(&user) {
                Some(e) => (
                    e.row(user, self.shared.epoch),
                    (e.last_offline, e.offline_version),
                    e.devices,
                ),
                None => return false,
            }
        };
        // The local count already includes this event; Redis gets the count from before it.
        let devices_before = match op {
            Op::Connect => seed.2.saturating_sub(1),
            Op::Disconnect { .. } => seed.2 + 1,
            _ => seed.2,
        };
        match cluster
            .transition(user, &op, &seed.0, seed.1, devices_before)
            .await
        {
            Ok(state) => {
                self.apply_shared(&state, true);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, %user, ?op, "redis transition failed; applying locally");
                false
            }
        }
    }

    /// Redis could not take a change: decide the user's presence with this node's rules.
    pub(super) fn fall_back_local(&self, user: UserId) {
        self.mutate(user, now_millis(), |e| e.cluster_view = None);
    }

    /// Shared states for users not in memory (Redis first), split from those Redis lacks.
    pub(super) async fn load_shared(&self, users: &[UserId]) -> (Vec<SharedState>, Vec<UserId>) {
        let Some(cluster) = &self.shared.cluster else {
            return (Vec::new(), users.to_vec());
        };
        match cluster.load(users).await {
            Ok(states) => {
                let found: std::collections::HashSet<UserId> =
                    states.iter().map(|s| s.user).collect();
                let rest = users
                    .iter()
                    .copied()
                    .filter(|u| !found.contains(u))
                    .collect();
                (states, rest)
            }
            Err(_) => (Vec::new(), users.to_vec()),
        }
    }

    /// Entry for a shared state (cluster mode loads).
    pub(super) fn entry_from_shared(s: &SharedState) -> Entry {
        Entry::from_shared(s)
    }

    /// Keeps our lease, restores our devices after an outage or a lost lease, and takes over the
    /// devices of nodes whose lease expired.
    pub(super) async fn run_lease(self) {
        let cluster = self
            .shared
            .cluster
            .clone()
            .expect("run only in cluster mode");
        let period = (cluster.lease_ttl() / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.is_shutting_down() {
                return;
            }
            match cluster.renew().await {
                Ok(true) => {
                    tracing::warn!(
                        "this node was declared dead or lost redis; restoring its devices"
                    );
                    self.restore_all().await;
                    // And catch up on what other nodes published while we could not hear.
                    self.resync().await;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "lease renewal failed");
                    continue;
                }
            }
            match cluster.claim_dead().await {
                Ok(dead) => {
                    for (node, last, users) in dead {
                        tracing::warn!(%node, users = users.len(), "a node's lease expired: its devices are offline");
                        self.ensure_loaded(&users).await.ok();
                        for u in users {
                            let op = Op::DropNode {
                                node: node.clone(),
                                at: last,
                            };
                            self.shared_transition(u, op).await;
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "could not check other nodes' leases"),
            }
        }
    }

    /// Re-registers every local device and local change in Redis (after an outage, or after this
    /// node was declared dead while paused).
    async fn restore_all(&self) {
        let mut users = Vec::new();
        for shard in self.shared.shards.iter() {
            let shard = shard.lock().expect("shard lock poisoned");
            for (u, e) in shard.users.iter() {
                if e.devices > 0 || e.cluster_view.is_none() {
                    users.push((*u, e.devices));
                }
            }
        }
        for (u, devices) in users {
            self.shared_transition(u, Op::Restore { devices }).await;
        }
    }

    /// Applies changes made on other nodes, and contact changes, as they are published.
    pub(super) async fn run_subscription(self) {
        let cluster = self
            .shared
            .cluster
            .clone()
            .expect("run only in cluster mode");
        let mut first = true;
        loop {
            if self.is_shutting_down() {
                return;
            }
            let stream = match cluster.subscribe().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "redis subscription failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if !first {
                // Changes published while we were not listening: read the current states.
                self.resync().await;
            }
            first = false;
            tokio::pin!(stream);
            while let Some(msg) = stream.next().await {
                match msg {
                    Message::Presence(s) => self.apply_shared(&s, false),
                    Message::ContactsAdded(a, b) => {
                        let _ = self.link(a, b).await;
                        let _ = self.link(b, a).await;
                    }
                    Message::ContactsRemoved(a, b) => {
                        self.unlink(a, b);
                        self.unlink(b, a);
                    }
                }
            }
            tracing::warn!("redis subscription ended; resubscribing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads the shared state of every user in memory and applies what is newer.
    async fn resync(&self) {
        let Some(cluster) = &self.shared.cluster else {
            return;
        };
        let mut users = Vec::new();
        for shard in self.shared.shards.iter() {
            users.extend(
                shard
                    .lock()
                    .expect("shard lock poisoned")
                    .users
                    .keys()
                    .copied(),
            );
        }
        for chunk in users.chunks(500) {
            // The first command after an outage may still fail (the connection manager reports
            // its last reconnect error once): retry a little before giving up on this chunk.
            for attempt in 0..10 {
                match cluster.load(chunk).await {
                    Ok(states) => {
                        for s in states {
                            self.apply_shared(&s, false);
                        }
                        break;
                    }
                    Err(e) if attempt == 9 => {
                        tracing::warn!(error = %e, "could not resync from redis; the next renewal retries");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }

    /// Clean stop in cluster mode: our devices leave the shared state, our lease is released.
    pub(super) async fn leave_cluster(&self) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        let mut users = Vec::new();
        for shard in self.shared.shards.iter() {
            let shard = shard.lock().expect("shard lock poisoned");
            users.extend(
                shard
                    .users
                    .iter()
                    .filter(|(_, e)| e.devices > 0 || e.cluster_view.is_some_and(|(_, c)| c))
                    .map(|(u, _)| *u),
            );
        }
        let at = now_millis();
        for u in users {
            self.shared_transition(
                u,
                Op::DropNode {
                    node: cluster.node.clone(),
                    at,
                },
            )
            .await;
        }
        cluster.deregister().await;
    }

    /// Publishes contact changes so other nodes update their caches and watches.
    pub(super) async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) {
        if let Some(cluster) = &self.shared.cluster {
            cluster.publish_contacts(added, pairs).await;
        }
    }

    /// Whether this node runs in cluster mode (REDIS_URL set).
    pub fn is_clustered(&self) -> bool {
        self.shared.cluster.is_some()
    }

    /// Whether Redis answers (always true on a single node).
    pub fn cluster_ok(&self) -> bool {
        self.shared.cluster.as_ref().is_none_or(|c| c.is_up())
    }
}
