//! Abuse limits: per-user rate limits (token buckets, via governor), a per-device limit on
//! activity changes, and a per-connection cap on streams still waiting for their hello. A call
//! over a limit is refused with RESOURCE_EXHAUSTED naming the setting, before anything changes.
//! Services calling for themselves are not limited; a service acting for a user counts as that
//! user.
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::UserId;

use super::ApiError;

/// The configured per-minute allowances.
#[derive(Debug, Clone, Copy)]
pub struct RateSettings {
    pub status_changes_per_min: u32,
    pub presence_ids_per_min: u32,
    pub activity_changes_per_min: u32,
}

pub struct RateLimits {
    settings: RateSettings,
    status: DefaultKeyedRateLimiter<UserId>,
    ids: DefaultKeyedRateLimiter<UserId>,
    /// Keyed by device (subscriber id).
    activity: DefaultKeyedRateLimiter<u64>,
}

fn refused(limit: &'static str) {
    metrics::counter!("presence_rate_limited_total", "limit" => limit).increment(1);
}

impl RateLimits {
    pub fn new(settings: RateSettings) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).expect("max(1) is non-zero"));
        RateLimits {
            settings,
            status: RateLimiter::keyed(quota(settings.status_changes_per_min)),
            ids: RateLimiter::keyed(quota(settings.presence_ids_per_min)),
            activity: RateLimiter::keyed(quota(settings.activity_changes_per_min)),
        }
    }

    pub fn status_change(&self, user: UserId) -> Result<(), ApiError> {
        self.status.check_key(&user).map_err(|_| {
            refused("status");
            ApiError::RateLimited(format!(
                "rate limit: at most {} status changes per minute per user (PRESENCE_RATE_STATUS_PER_MIN)",
                self.settings.status_changes_per_min
            ))
        })
    }

    /// Ids read by GetPresence and listed in WatchContacts: one budget per user.
    pub fn presence_ids(&self, user: UserId, n: usize) -> Result<(), ApiError> {
        let Some(n) = NonZeroU32::new(n.min(u32::MAX as usize) as u32) else {
            return Ok(());
        };
        match self.ids.check_key_n(&user, n) {
            Ok(Ok(())) => Ok(()),
            _ => {
                refused("ids");
                Err(ApiError::RateLimited(format!(
                    "rate limit: at most {} GetPresence and WatchContacts ids per minute per user (PRESENCE_RATE_IDS_PER_MIN)",
                    self.settings.presence_ids_per_min
                )))
            }
        }
    }

    /// An activity change of one device.
    pub fn activity_change(&self, device: u64) -> Result<(), ApiError> {
        self.activity.check_key(&device).map_err(|_| {
            refused("activity");
            ApiError::RateLimited(format!(
                "rate limit: at most {} activity changes per minute per device (PRESENCE_RATE_ACTIVITY_PER_MIN); this one is ignored",
                self.settings.activity_changes_per_min
            ))
        })
    }

    /// Forgets keys whose buckets are full again, so memory follows active users only.
    pub fn shrink(&self) {
        self.status.retain_recent();
        self.ids.retain_recent();
        self.activity.retain_recent();
    }
}

/// Streams opened on one connection and still waiting for their hello: each holds a task and
/// buffers until it says who it is, so a connection may only have so many at once.
pub struct HelloGate {
    max: u32,
    pending: Mutex<HashMap<u64, u32>>,
}

/// One stream waiting for its hello; dropping it frees its place.
pub struct HelloTicket {
    gate: Arc<HelloGate>,
    connection: u64,
}

impl HelloGate {
    pub fn new(max: u32) -> Arc<HelloGate> {
        Arc::new(HelloGate {
            max: max.max(1),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more stream of `connection` to wait for its hello.
    pub fn enter(self: &Arc<Self>, connection: u64) -> Result<HelloTicket, ApiError> {
        let mut pending = self.pending.lock().expect("hello gate lock poisoned");
        let n = pending.entry(connection).or_default();
        if *n >= self.max {
            refused("hello");
            return Err(ApiError::RateLimited(format!(
                "this connection already has {} streams waiting for their hello (PRESENCE_MAX_HELLO_PENDING_PER_CONN)",
                self.max
            )));
        }
        *n += 1;
        Ok(HelloTicket {
            gate: self.clone(),
            connection,
        })
    }
}

impl Drop for HelloTicket {
    fn drop(&mut self) {
        let mut pending = self.gate.pending.lock().expect("hello gate lock poisoned");
        if let Some(n) = pending.get_mut(&self.connection) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.connection);
            }
        }
    }
}
