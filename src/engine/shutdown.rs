//! Shutdown: new streams are refused, every open one is ended (its user goes offline as it is
//! dropped), pending graces end at once, this node's devices leave the cluster, every change
//! is flushed and the clean stop recorded.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::domain::now_millis;

use super::Engine;
use super::subscriber::{EndReason, Subscriber};

impl Engine {
    /// First step of shutdown: refuse new streams and end every open one.
    pub fn begin_shutdown(&self) {
        if self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let subs: Vec<Arc<Subscriber>> = self
            .shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for s in subs {
            s.end(EndReason::Shutdown);
        }
        let relays: Vec<_> = self
            .shared
            .relay_queues
            .lock()
            .expect("relay queues lock poisoned")
            .drain(..)
            .filter_map(|q| q.upgrade())
            .collect();
        for q in relays {
            q.close_for_shutdown();
        }
    }

    /// Last step of shutdown: pending graces end now, devices whose streams are still open are
    /// taken offline, every change is flushed and the clean stop is recorded. Call after the
    /// server stopped.
    pub async fn finish_shutdown(&self) {
        self.begin_shutdown();
        for (user, token) in self.take_graces() {
            self.expire_grace(user, token).await;
        }
        if self.is_cluster() {
            self.leave_cluster().await;
        } else {
            let now = now_millis();
            for i in 0..self.shared.shards.len() {
                let mut guard = self.shared.shards[i].lock().expect("shard lock poisoned");
                let shard = &mut *guard;
                let online: Vec<_> = shard
                    .users
                    .iter()
                    .filter(|(_, e)| e.local().total > 0)
                    .map(|(u, _)| *u)
                    .collect();
                for user in online {
                    let Some(entry) = shard.users.get_mut(&user) else {
                        continue;
                    };
                    *entry.local_mut() = Default::default();
                    let op = self.device_report(entry, None);
                    self.apply_in(shard, user, &op, now);
                }
            }
        }
        let _ = self.shared.stop.send(true);
        let handle = self
            .shared
            .flusher
            .lock()
            .expect("flusher lock poisoned")
            .take();
        if let Some(h) = handle
            && let Err(e) = h.await
        {
            tracing::error!(error = %e, "the write-behind flusher panicked");
        }
    }
}
