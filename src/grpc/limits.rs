//! Per-user rate limits (token buckets, via governor). A call over its limit is refused with
//! RESOURCE_EXHAUSTED naming the limit, before anything changes or is fanned out. Services
//! calling for themselves are not limited; a service acting for a user counts as that user.
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::UserId;

use super::ApiError;

/// The configured per-minute allowances.
#[derive(Debug, Clone, Copy)]
pub struct RateSettings {
    pub status_changes_per_min: u32,
    pub presence_ids_per_min: u32,
}

pub struct RateLimits {
    settings: RateSettings,
    status: DefaultKeyedRateLimiter<UserId>,
    ids: DefaultKeyedRateLimiter<UserId>,
}

impl RateLimits {
    pub fn new(settings: RateSettings) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).expect("max(1) is non-zero"));
        RateLimits {
            settings,
            status: RateLimiter::keyed(quota(settings.status_changes_per_min)),
            ids: RateLimiter::keyed(quota(settings.presence_ids_per_min)),
        }
    }

    pub fn status_change(&self, user: UserId) -> Result<(), ApiError> {
        self.status.check_key(&user).map_err(|_| {
            metrics::counter!("presence_rate_limited_total", "limit" => "status").increment(1);
            ApiError::RateLimited(format!(
                "rate limit: at most {} status changes per minute per user (PRESENCE_RATE_STATUS_PER_MIN)",
                self.settings.status_changes_per_min
            ))
        })
    }

    pub fn presence_ids(&self, user: UserId, n: usize) -> Result<(), ApiError> {
        let Some(n) = NonZeroU32::new(n.min(u32::MAX as usize) as u32) else {
            return Ok(());
        };
        match self.ids.check_key_n(&user, n) {
            Ok(Ok(())) => Ok(()),
            _ => {
                metrics::counter!("presence_rate_limited_total", "limit" => "ids").increment(1);
                Err(ApiError::RateLimited(format!(
                    "rate limit: at most {} GetPresence ids per minute per user (PRESENCE_RATE_IDS_PER_MIN)",
                    self.settings.presence_ids_per_min
                )))
            }
        }
    }

    /// Forgets users whose buckets are full again, so memory follows active users only.
    pub fn shrink(&self) {
        self.status.retain_recent();
        self.ids.retain_recent();
    }
}
