//! What a user chooses: their status, their privacy settings, their custom status (and its
//! expiry, cleared by the server once, on whichever node gets there first).
use std::sync::Arc;

use crate::domain::{CustomStatus, Millis, PresenceView, Privacy, Status, UserId, now_millis};
use crate::rules::Op;

use super::registry::OWN;
use super::timers::Timer;
use super::{Engine, EngineError, Result};

/// How far ahead the sweep of stored custom statuses schedules expiries, and how often it runs.
const CUSTOM_SWEEP_AHEAD: Millis = 60_000;
const CUSTOM_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Engine {
    /// Applies a user's own change (loading the user) and returns their own view after it.
    async fn choose(&self, user: UserId, op: Op) -> Result<PresenceView> {
        for _ in 0..4 {
            self.ensure_loaded(&[user]).await?;
            if !self.shard(user).users.contains_key(&user) {
                continue;
            }
            self.change(user, op.clone()).await;
            if let Some(v) = self.own_view(user) {
                return Ok(v);
            }
        }
        Err(EngineError::Unstable(user))
    }

    /// Sets the user's chosen status and returns the user's own view.
    pub async fn update_status(&self, user: UserId, status: Status) -> Result<PresenceView> {
        self.choose(user, Op::Status(status)).await
    }

    /// Changes the user's privacy settings; every watcher that gains or loses access is told at
    /// once.
    pub async fn set_privacy(&self, user: UserId, privacy: Privacy) -> Result<Privacy> {
        self.choose(user, Op::Privacy(privacy)).await?;
        Ok(privacy)
    }

    /// Sets (None: clears) the user's custom status; returns the user's own view.
    pub async fn set_custom_status(
        &self,
        user: UserId,
        custom: Option<CustomStatus>,
    ) -> Result<PresenceView> {
        let expires_at = custom.as_ref().and_then(|c| c.expires_at);
        let view = self.choose(user, Op::Custom(custom.map(Arc::new))).await?;
        if let Some(at) = expires_at {
            self.schedule_custom_expiry(user, at);
        }
        Ok(view)
    }

    pub(super) fn own_view(&self, user: UserId) -> Option<PresenceView> {
        let shard = self.shard(user);
        shard
            .users
            .get(&user)
            .map(|e| e.view(user, OWN, now_millis()))
    }

    /// The user's privacy settings.
    pub async fn privacy(&self, user: UserId) -> Result<Privacy> {
        if let Some(e) = self.shard(user).users.get(&user) {
            return Ok(e.presence().privacy);
        }
        let loaded = self.read_presence(&[user]).await?;
        Ok(loaded.get(&user).map(|p| p.privacy).unwrap_or_default())
    }

    pub(super) fn schedule_custom_expiry(&self, user: UserId, at: Millis) {
        self.schedule(at, Timer::Custom { user, at });
    }

    /// A custom status reached its expiry: cleared (if it is still that one) and pushed.
    pub(super) async fn expire_custom(&self, user: UserId, at: Millis) {
        if self.ensure_loaded(&[user]).await.is_err() {
            // The store is down: the sweep finds it again once it is back.
            return;
        }
        let current = self
            .shard(user)
            .users
            .get(&user)
            .and_then(|e| e.presence().custom.as_ref()?.expires_at);
        // Only if it is still that one: a newer status (or a clear) made this timer moot, and on
        // a cluster the backplane checks again, so exactly one node clears it.
        if current == Some(at) {
            self.change(user, Op::ExpireCustom { expires_at: at }).await;
        }
    }

    /// Finds stored custom statuses about to expire (including those that expired while no
    /// node ran) and schedules their expiry; in memory, setting one schedules it directly.
    pub(super) async fn run_custom_sweep(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(CUSTOM_SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let until = now_millis() + CUSTOM_SWEEP_AHEAD;
            match self.shared.store.custom_expiring(until, 10_000).await {
                Ok(due) => {
                    for (user, at) in due {
                        self.schedule_custom_expiry(user, at);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "custom status sweep failed; the next one retries")
                }
            }
        }
    }
}
