//! The engine's side of cluster mode. Every change goes through one backplane transition and
//! comes back as the user's new presence, which this node applies to its entry and fans out to
//! its own receivers; changes made on other nodes arrive on the subscription. When the backplane
//! fails, the change is decided with this node's rules (the same [`crate::rules`]) and marked
//! unsynced; when it answers again, every unsynced entry and every local device is reconciled
//! there, and every node converges.
//!
//! Liveness: this node renews its lease; a node whose lease runs out is claimed by a survivor,
//! which drops that node's devices user by user, in batches, writing their rows. A claim is a
//! durable record: a claimer that dies halfway is claimed in turn, and its claims finished by
//! another node.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use crate::cluster::{Claim, Message, Transition};
use crate::domain::{UserId, now_millis};
use crate::rules::{Op, Presence};

use super::Engine;

/// Users per pipelined batch of transitions (reaping, restoring).
const BATCH: usize = 500;

impl Engine {
    /// Applies `op` to the user (who should be in memory): through the backplane in cluster
    /// mode, falling back to this node's rules when it fails; in memory on a single node.
    pub(super) async fn change(&self, user: UserId, op: Op) {
        let now = now_millis();
        let Some(bp) = self.shared.backplane.clone() else {
            self.apply_local(user, &op, now);
            return;
        };
        // A copy changed here while the backplane failed goes first: its changes are older
        // than `op`, which must not be overwritten by them when they are reconciled later.
        let Some((seed, pending)) = self.shard(user).users.get(&user).map(|e| {
            let pending = e.unsynced.then(|| self.reconciliation(user, e));
            (self.seed_of(e, &op), pending)
        }) else {
            return;
        };
        let transition = Transition {
            user,
            op: op.clone(),
            seed,
            at: now,
        };
        let batch: Vec<Transition> = pending.into_iter().chain([transition]).collect();
        match bp.transition(batch).await {
            Ok(results) => {
                for (presence, outcome) in results.into_iter().flatten() {
                    if !self.apply_shared(user, presence.clone(), Some(outcome.changed))
                        && outcome.changed
                    {
                        self.write_loose(user, &presence);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%user, error = %e, "backplane transition failed; applying with this node's rules");
                self.apply_local(user, &op, now);
            }
        }
    }

    /// What this node knows of a user, for the backplane to start from if it has nothing: the
    /// entry, with this node's own devices in it (after the backplane lost its state, a change
    /// made before this node restores its devices must not show the user without them) unless
    /// `op` reports them itself (then the change it makes is the news).
    fn seed_of(&self, entry: &super::registry::Entry, op: &Op) -> Presence {
        let mut seed = entry.presence().clone();
        let node = &self.shared.node;
        seed.nodes.retain(|n| n.node == *node);
        if matches!(op, Op::Devices { .. }) {
            seed.nodes.clear();
        } else if seed.nodes.is_empty() && entry.local().total > 0 {
            seed.nodes.push(crate::rules::NodeDevices {
                node: node.clone(),
                seq: 0,
                devices: entry.local(),
            });
        }
        seed
    }

    /// This node writes the user's row at its next flush: from the entry if it is in memory,
    /// else from `presence`.
    fn owe_row(&self, user: UserId, presence: &Presence) {
        {
            let mut guard = self.shard(user);
            let shard = &mut *guard;
            if shard.users.contains_key(&user) {
                super::registry::mark_dirty(shard, user, &self.shared.counters.dirty_users);
                return;
            }
        }
        self.write_loose(user, presence);
    }

    /// A change this node made for a user it does not hold in memory: its row is written all
    /// the same.
    fn write_loose(&self, user: UserId, presence: &Presence) {
        let entry = super::registry::Entry::new(presence.clone());
        let row = entry.row(user, self.epoch());
        self.shared
            .loose_rows
            .lock()
            .expect("loose rows lock poisoned")
            .insert(user, row);
    }

    /// Applies changes made on other nodes, and contact changes, as they are published.
    pub(super) async fn run_subscription(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("run only in cluster mode");
        let mut first = true;
        loop {
            if self.is_shutting_down() {
                return;
            }
            let stream = match bp.subscribe().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "subscription failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            if !first {
                // Changes published while we were not listening: read the current states.
                self.resync_all().await;
            }
            first = false;
            tokio::pin!(stream);
            loop {
                let msg = tokio::select! {
                    msg = stream.next() => msg,
                    _ = stop.changed() => return,
                };
                let Some(msg) = msg else { break };
                match msg {
                    Message::Presence(user, presence) => {
                        self.apply_shared(user, *presence, None);
                    }
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
            tracing::warn!("the backplane subscription ended; resubscribing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Keeps this node's lease; reconciles after an outage or a lost lease; reaps dead nodes.
    pub(super) async fn run_lease(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("run only in cluster mode");
        let ttl = self.shared.config.node_ttl;
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reaping: Arc<Mutex<HashSet<Arc<str>>>> = Arc::default();
        // This node's devices must be restored once no other node is dropping them.
        let mut restore_pending = false;
        // Since when renewals succeed without a break: other nodes' leases are judged only
        // after a whole TTL of it, so that after an outage of the backplane (every lease
        // expired) the nodes have time to renew before anyone declares them dead.
        let mut healthy_since: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if self.is_shutting_down() {
                return;
            }
            match bp.renew().await {
                Ok(renewal) => {
                    healthy_since.get_or_insert_with(std::time::Instant::now);
                    if renewal.lost {
                        tracing::warn!(
                            "this node was declared dead or the backplane lost its state; restoring its devices"
                        );
                        restore_pending = true;
                    }
                    if restore_pending && renewal.claimed {
                        tracing::info!(
                            "another node is still dropping this node's devices; restoring them once it is done"
                        );
                    } else if restore_pending {
                        restore_pending = false;
                        self.restore_all().await;
                        self.resync_all().await;
                        {
                            // Users whose state the backplane lost entirely, with devices only on
                            // nodes that are gone: once every live node had time to restore
                            // its own, whatever is still missing is decided from here.
                            let engine = self.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(ttl).await;
                                engine.settle_missing().await;
                            });
                        }
                    } else if self.has_unsynced() {
                        self.restore_all().await;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "lease renewal failed");
                    healthy_since = None;
                    continue;
                }
            }
            if healthy_since.is_none_or(|t| t.elapsed() < ttl) {
                continue;
            }
            match bp.claim().await {
                Ok(claims) => {
                    for claim in claims {
                        if !reaping
                            .lock()
                            .expect("reaping lock poisoned")
                            .insert(claim.node.clone())
                        {
                            continue;
                        }
                        let engine = self.clone();
                        let reaping = reaping.clone();
                        tokio::spawn(async move {
                            let node = claim.node.clone();
                            engine.reap(claim).await;
                            reaping.lock().expect("reaping lock poisoned").remove(&node);
                        });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "could not check other nodes' leases"),
            }
        }
    }

    /// Drops a dead node's devices, in batches, user by user; resumable (a batch done twice
    /// changes nothing the second time).
    async fn reap(&self, claim: Claim) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("reaping only in cluster mode");
        let started = std::time::Instant::now();
        let mut reaped = 0usize;
        loop {
            let batch_size = self.shared.config.reap_batch.max(1);
            let users = match bp.claimed_users(&claim.node, batch_size).await {
                Ok(users) => users,
                Err(e) => {
                    tracing::warn!(node = %claim.node, error = %e, "reaping paused; the next lease tick resumes it");
                    return;
                }
            };
            if users.is_empty() {
                let _ = bp.finish_claim(&claim.node).await;
                tracing::warn!(node = %claim.node, users = reaped, elapsed = ?started.elapsed(),
                    "a node's lease expired: its devices are gone and its users who had no other device are offline");
                return;
            }
            let batch = users
                .iter()
                .map(|&user| Transition {
                    user,
                    op: Op::DropNode {
                        node: claim.node.clone(),
                        at: claim.last_renewal,
                    },
                    // Only used if the backplane had no state, and then dropping does nothing.
                    seed: Presence::default(),
                    at: now_millis(),
                })
                .collect();
            match bp.transition(batch).await {
                Ok(results) => {
                    // Every visited user's row is written, changed here or not: the dead node
                    // may have died before writing its own last change.
                    for (&user, result) in users.iter().zip(results) {
                        if let Some((presence, outcome)) = result {
                            self.apply_shared(user, presence.clone(), Some(outcome.changed));
                            self.owe_row(user, &presence);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %claim.node, error = %e, "reaping paused; the next lease tick resumes it");
                    return;
                }
            }
            if bp.finish_users(&claim.node, &users).await.is_err() {
                return;
            }
            reaped += users.len();
        }
    }

    fn has_unsynced(&self) -> bool {
        self.shared.shards.iter().any(|s| {
            s.lock()
                .expect("shard lock poisoned")
                .users
                .values()
                .any(|e| e.unsynced)
        })
    }

    /// Reports this node's devices again and reconciles every change it decided alone, in
    /// batches: after an outage, or after it was declared dead while paused. Users this node
    /// holds devices of go first (the backplane may start them from this node's copy). A user
    /// changed here without a device here is reconciled only when the backplane has them, or
    /// when this node's copy shows no device anywhere: otherwise starting them from this copy
    /// would drop devices other nodes are about to restore (they stay unsynced until then).
    async fn restore_all(&self) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("restore only in cluster mode");
        let mut holding = Vec::new();
        let mut changed_here = Vec::new();
        for shard in self.shared.shards.iter() {
            let shard = shard.lock().expect("shard lock poisoned");
            for (&user, e) in shard.users.iter() {
                if e.local().total > 0 {
                    holding.push(self.reconciliation(user, e));
                } else if e.unsynced {
                    changed_here.push(self.reconciliation(user, e));
                }
            }
        }
        let mut total = self.reconcile(holding).await;
        if !changed_here.is_empty() {
            let users: Vec<UserId> = changed_here.iter().map(|t| t.user).collect();
            let known: HashSet<UserId> = match bp.load(&users).await {
                Ok(states) => states.into_iter().map(|(u, _)| u).collect(),
                Err(_) => return,
            };
            let ready: Vec<Transition> = changed_here
                .into_iter()
                .filter(|t| known.contains(&t.user) || t.seed.live().total == 0)
                .collect();
            total += self.reconcile(ready).await;
        }
        if total > 0 {
            tracing::info!(
                users = total,
                "this node's devices and changes are reconciled with the backplane"
            );
        }
    }

    /// The reconciliation of one user: this node's copy, with its own devices as they are.
    fn reconciliation(&self, user: UserId, e: &super::registry::Entry) -> Transition {
        let mut own = e.presence().clone();
        if let Op::Devices { seq, devices, .. } = self.device_report(e, None) {
            own.nodes.retain(|n| n.node != self.shared.node);
            own.nodes.push(crate::rules::NodeDevices {
                node: self.shared.node.clone(),
                seq,
                devices,
            });
            own.nodes.sort_by(|a, b| a.node.cmp(&b.node));
        }
        Transition {
            user,
            op: Op::Reconcile(Box::new(own.clone())),
            seed: own,
            at: now_millis(),
        }
    }

    /// Runs reconciliations in batches and applies their results; returns how many ran.
    async fn reconcile(&self, batch: Vec<Transition>) -> usize {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("reconcile only in cluster mode");
        let mut done = 0;
        for chunk in batch.chunks(BATCH) {
            let users: Vec<UserId> = chunk.iter().map(|t| t.user).collect();
            match bp.transition(chunk.to_vec()).await {
                Ok(results) => {
                    for ((user, result), sent) in users.into_iter().zip(results).zip(chunk) {
                        if let Some((presence, outcome)) = result {
                            self.apply_shared(user, presence, Some(outcome.changed));
                        }
                        self.correct_if_stale(user, sent).await;
                    }
                    done += chunk.len();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not restore this node's state; the next renewal retries");
                    break;
                }
            }
        }
        done
    }

    /// A reconciliation carries a snapshot of this node's devices; if they changed while it ran
    /// (a device left), the snapshot may have landed after the newer report, or re-created a
    /// state the backplane had already released: the current devices are reported again.
    async fn correct_if_stale(&self, user: UserId, sent: &Transition) {
        let Op::Reconcile(copy) = &sent.op else {
            return;
        };
        let sent_devices = copy.node(&self.shared.node).map(|n| n.devices);
        let now = self.shard(user).users.get(&user).map(|e| e.local());
        if let Some(local) = now
            && sent_devices.is_some_and(|d| d != local)
        {
            let op = {
                let shard = self.shard(user);
                let Some(e) = shard.users.get(&user) else {
                    return;
                };
                self.device_report(e, None)
            };
            self.change(user, op).await;
        }
    }

    /// Reads the shared presence of every user in memory and applies what is newer.
    async fn resync_all(&self) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("resync only in cluster mode");
        for chunk in self.users_in_memory().chunks(BATCH) {
            // The first command after an outage may still fail (the connection reports its last
            // reconnect error once): retry a little before giving up on this chunk.
            for attempt in 0..10 {
                match bp.load(chunk).await {
                    Ok(states) => {
                        for (user, presence) in states {
                            self.apply_shared(user, presence, None);
                        }
                        break;
                    }
                    Err(e) if attempt == 9 => {
                        tracing::warn!(error = %e, "could not resync; the next renewal retries");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }

    /// After the backplane lost its state: users it still has no state for, although this
    /// node's copy shows devices on other nodes, had them only on nodes that did not come back.
    /// Their devices there are dropped here and the result reconciled, so every node agrees.
    async fn settle_missing(&self) {
        let bp = self
            .shared
            .backplane
            .clone()
            .expect("settle only in cluster mode");
        for chunk in self.users_in_memory().chunks(BATCH) {
            let Ok(known) = bp.load(chunk).await else {
                return;
            };
            let known: HashSet<UserId> = known.into_iter().map(|(u, _)| u).collect();
            for &user in chunk.iter().filter(|u| !known.contains(u)) {
                let others: Vec<Arc<str>> = self
                    .shard(user)
                    .users
                    .get(&user)
                    .map(|e| {
                        e.presence()
                            .nodes
                            .iter()
                            .filter(|n| n.node != self.shared.node && n.devices.total > 0)
                            .map(|n| n.node.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                if others.is_empty() {
                    continue;
                }
                let now = now_millis();
                for node in others {
                    self.apply_local(user, &Op::DropNode { node, at: now }, now);
                }
            }
        }
        self.restore_all().await;
    }

    fn users_in_memory(&self) -> Vec<UserId> {
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
        users
    }

    /// Clean stop in cluster mode: this node's devices leave the shared state, its lease is
    /// released.
    pub(super) async fn leave_cluster(&self) {
        let Some(bp) = self.shared.backplane.clone() else {
            return;
        };
        let mut batch = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().expect("shard lock poisoned");
            for (&user, e) in shard.users.iter_mut() {
                if e.local().total > 0
                    || e.presence()
                        .node(&self.shared.node)
                        .is_some_and(|n| n.devices.total > 0)
                {
                    *e.local_mut() = Default::default();
                    batch.push(Transition {
                        user,
                        op: self.device_report(e, None),
                        seed: e.presence().clone(),
                        at: now_millis(),
                    });
                }
            }
        }
        for chunk in batch.chunks(BATCH) {
            let users: Vec<UserId> = chunk.iter().map(|t| t.user).collect();
            if let Ok(results) = bp.transition(chunk.to_vec()).await {
                for (user, result) in users.into_iter().zip(results) {
                    if let Some((presence, outcome)) = result {
                        self.apply_shared(user, presence, Some(outcome.changed));
                    }
                }
            }
        }
        bp.deregister().await;
    }

    /// Publishes contact changes so other nodes update their caches and watches.
    pub(super) async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) {
        if let Some(bp) = &self.shared.backplane
            && let Err(e) = bp.publish_contacts(added, pairs).await
        {
            tracing::warn!(error = %e, "could not publish contact changes to other nodes");
        }
    }
}
