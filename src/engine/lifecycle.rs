//! This node's record in the store (registered at start, a heartbeat while it runs, a clean
//! stop at the end) and the recovery of nodes that crashed: the users a crashed node left
//! online are set offline at their last checkpoint, and (on a single node) the epoch rises so
//! that versions loaded from rows written before the crash go above anything it may have sent.
//! Only the crashed node's rows are touched; a node that starts or stops cleanly changes nobody
//! else's.
use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::domain::{UserId, now_millis};

use super::{Engine, Result};

/// Users per recovery statement.
const BATCH: u32 = 500;

impl Engine {
    /// Recovers crashed nodes: with `all`, every open record but this node's (a single node is
    /// the only one, so any other record open is a crash: it runs before serving); otherwise
    /// those silent for longer than the node TTL.
    pub(super) async fn recover_crashed_nodes(&self, all: bool) -> Result<()> {
        let store = &self.shared.store;
        let now = now_millis();
        let silent_since = now - self.shared.config.node_ttl.as_millis() as i64;
        let records = store.open_nodes().await?;
        let alive: HashSet<&str> = records
            .iter()
            .filter(|r| r.heartbeat_ms >= silent_since)
            .map(|r| r.node.as_str())
            .collect();
        for record in &records {
            if record.node == *self.shared.node || (!all && record.heartbeat_ms >= silent_since) {
                continue;
            }
            let take_over = match record.recovered_by.as_deref() {
                None => None,
                // Someone alive is recovering it.
                Some(claimer) if alive.contains(claimer) && claimer != &*self.shared.node => {
                    continue;
                }
                Some(claimer) => Some(claimer),
            };
            if store
                .claim_recovery(&record.node, &self.shared.node, take_over)
                .await?
            {
                self.recover_node(&record.node).await?;
            }
        }
        Ok(())
    }

    async fn recover_node(&self, dead: &str) -> Result<()> {
        let store = &self.shared.store;
        let mut after: Option<UserId> = None;
        let mut recovered = 0usize;
        loop {
            let users = store.left_online_by(dead, after, BATCH).await?;
            let Some(&last) = users.last() else { break };
            after = Some(last);
            // In a cluster, users the backplane shows live (a device on another node, or a
            // grace) are online: their rows are not the dead node's to settle.
            let live: HashSet<UserId> = match &self.shared.backplane {
                None => HashSet::new(),
                Some(bp) => bp
                    .load(&users)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, p)| p.live().total > 0 || p.grace.is_some())
                    .map(|(u, _)| u)
                    .collect(),
            };
            let offline: Vec<UserId> = users.into_iter().filter(|u| !live.contains(u)).collect();
            store.recover_rows(dead, &offline).await?;
            recovered += offline.len();
        }
        // A single node's crash loses the changes it had not written: versions loaded from the
        // rows must go above anything it may have sent. In a cluster the backplane holds every
        // change until the node that made it has written it (it is released only then), so
        // versions continue from there and nothing is raised.
        let epoch = if self.is_cluster() {
            self.epoch()
        } else {
            let epoch = store.bump_epoch().await?;
            self.shared.epoch.fetch_max(epoch, Ordering::Relaxed);
            epoch
        };
        store.finish_recovery(dead, now_millis()).await?;
        tracing::warn!(
            node = dead,
            users = recovered,
            epoch,
            "recovered a node that stopped without a clean shutdown: the users it left online are offline at their last checkpoint"
        );
        Ok(())
    }

    /// Tells the store this node is alive (and learns the current epoch); in a cluster, also
    /// recovers nodes whose heartbeat stopped.
    pub(super) async fn run_heartbeat(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let period = (self.shared.config.node_ttl / 3).max(std::time::Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            match self
                .shared
                .store
                .heartbeat(&self.shared.node, now_millis())
                .await
            {
                Ok(epoch) => {
                    self.shared.epoch.fetch_max(epoch, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat not recorded; the next one retries");
                    continue;
                }
            }
            if self.is_cluster()
                && let Err(e) = self.recover_crashed_nodes(false).await
            {
                tracing::warn!(error = %e, "recovering a crashed node failed; the next heartbeat retries");
            }
        }
    }
}
