//! A store that delegates to a real one, and fails the presence-row operations (load, upsert,
//! checkpoint) with a connection error while the test says the database is down. Contact reads
//! and the nodes' lifecycle records still pass through: the outage tests are about the write-behind and
//! the in-memory truth, not about the contact graph.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use presence::domain::{Millis, UserId};
use presence::store::{NodeRecord, PresenceRow, Result, Store, StoreError};

pub struct FaultyStore {
    inner: Arc<dyn Store>,
    /// While true, presence-row operations fail.
    down: AtomicBool,
    /// Operations refused so far, to prove the server did try the database during the outage.
    refused: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            down: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        })
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            // What sqlx reports when the server does not answer: a transient error.
            return Err(StoreError::unavailable(
                "the database is down (FaultyStore)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn migrate(&self) -> Result<()> {
        self.inner.migrate().await
    }

    async fn register_node(&self, node: &str, now: Millis) -> Result<u64> {
        self.inner.register_node(node, now).await
    }

    async fn heartbeat(&self, node: &str, now: Millis) -> Result<u64> {
        self.inner.heartbeat(node, now).await
    }

    async fn stop_node(&self, node: &str, now: Millis) -> Result<()> {
        self.inner.stop_node(node, now).await
    }

    async fn open_nodes(&self) -> Result<Vec<NodeRecord>> {
        self.inner.open_nodes().await
    }

    async fn claim_recovery(
        &self,
        dead: &str,
        claimer: &str,
        take_over: Option<&str>,
    ) -> Result<bool> {
        self.inner.claim_recovery(dead, claimer, take_over).await
    }

    async fn left_online_by(
        &self,
        node: &str,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        self.inner.left_online_by(node, after, limit).await
    }

    async fn recover_rows(&self, node: &str, users: &[UserId]) -> Result<()> {
        self.inner.recover_rows(node, users).await
    }

    async fn finish_recovery(&self, dead: &str, now: Millis) -> Result<()> {
        self.inner.finish_recovery(dead, now).await
    }

    async fn bump_epoch(&self) -> Result<u64> {
        self.inner.bump_epoch().await
    }

    async fn custom_expiring(&self, before: Millis, limit: u32) -> Result<Vec<(UserId, Millis)>> {
        self.check()?;
        self.inner.custom_expiring(before, limit).await
    }

    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>> {
        self.check()?;
        self.inner.load_presence(users).await
    }

    async fn upsert_presence_batch(&self, rows: &[PresenceRow], node: &str) -> Result<()> {
        self.check()?;
        self.inner.upsert_presence_batch(rows, node).await
    }

    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()> {
        self.check()?;
        self.inner.checkpoint_online(users, at).await
    }

    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>> {
        self.inner.contacts_of_many(users).await
    }

    async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        self.inner.add_contacts(pairs).await
    }

    async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        self.inner.remove_contacts(pairs).await
    }

    async fn list_contacts(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        self.inner.list_contacts(user, after, limit).await
    }
}
