//! Proto ⇄ domain. Unknown enum values, UNSPECIFIED where a value is required, ids out of
//! range and bad texts are refused here with a message that names the field.
use std::sync::Arc;

use crate::domain::{
    Activity, CustomStatus, InvalidInput, LastSeenApprox, MAX_USER_ID, Millis, Platform,
    PresenceView, Privacy, Status, UserId, Visibility,
};
use crate::pb;

pub fn status_from_proto(raw: i32, field: &str) -> Result<Status, InvalidInput> {
    match pb::Status::try_from(raw) {
        Ok(pb::Status::Online) => Ok(Status::Online),
        Ok(pb::Status::Away) => Ok(Status::Away),
        Ok(pb::Status::Busy) => Ok(Status::Busy),
        Ok(pb::Status::Offline) => Ok(Status::Offline),
        Ok(pb::Status::Unspecified) => Err(InvalidInput(format!(
            "{field} must be STATUS_ONLINE, STATUS_AWAY, STATUS_BUSY or STATUS_OFFLINE, got STATUS_UNSPECIFIED"
        ))),
        Err(_) => Err(InvalidInput(format!("{field}: unknown status value {raw}"))),
    }
}

pub fn status_to_proto(s: Status) -> pb::Status {
    match s {
        Status::Online => pb::Status::Online,
        Status::Away => pb::Status::Away,
        Status::Busy => pb::Status::Busy,
        Status::Offline => pb::Status::Offline,
    }
}

/// A device's platform; UNSPECIFIED is allowed (a client that does not say).
pub fn platform_from_proto(raw: i32, field: &str) -> Result<Platform, InvalidInput> {
    match pb::Platform::try_from(raw) {
        Ok(pb::Platform::Unspecified) => Ok(Platform::Unspecified),
        Ok(pb::Platform::Desktop) => Ok(Platform::Desktop),
        Ok(pb::Platform::Mobile) => Ok(Platform::Mobile),
        Ok(pb::Platform::Web) => Ok(Platform::Web),
        Err(_) => Err(InvalidInput(format!(
            "{field}: unknown platform value {raw}"
        ))),
    }
}

fn platform_to_proto(p: Platform) -> pb::Platform {
    match p {
        Platform::Unspecified => pb::Platform::Unspecified,
        Platform::Desktop => pb::Platform::Desktop,
        Platform::Mobile => pb::Platform::Mobile,
        Platform::Web => pb::Platform::Web,
    }
}

pub fn activity_from_proto(raw: i32, field: &str) -> Result<Activity, InvalidInput> {
    match pb::Activity::try_from(raw) {
        Ok(pb::Activity::Active) => Ok(Activity::Active),
        Ok(pb::Activity::Idle) => Ok(Activity::Idle),
        Ok(pb::Activity::Background) => Ok(Activity::Background),
        Ok(pb::Activity::Unspecified) => Err(InvalidInput(format!(
            "{field} must be ACTIVITY_ACTIVE, ACTIVITY_IDLE or ACTIVITY_BACKGROUND, got ACTIVITY_UNSPECIFIED"
        ))),
        Err(_) => Err(InvalidInput(format!(
            "{field}: unknown activity value {raw}"
        ))),
    }
}

fn visibility_from_proto(raw: i32, field: &str) -> Result<Visibility, InvalidInput> {
    match pb::Visibility::try_from(raw) {
        Ok(pb::Visibility::Everyone) => Ok(Visibility::Everyone),
        Ok(pb::Visibility::Contacts) => Ok(Visibility::Contacts),
        Ok(pb::Visibility::Nobody) => Ok(Visibility::Nobody),
        Ok(pb::Visibility::Unspecified) => Err(InvalidInput(format!(
            "{field} must be VISIBILITY_EVERYONE, VISIBILITY_CONTACTS or VISIBILITY_NOBODY, got VISIBILITY_UNSPECIFIED"
        ))),
        Err(_) => Err(InvalidInput(format!(
            "{field}: unknown visibility value {raw}"
        ))),
    }
}

fn visibility_to_proto(v: Visibility) -> pb::Visibility {
    match v {
        Visibility::Everyone => pb::Visibility::Everyone,
        Visibility::Contacts => pb::Visibility::Contacts,
        Visibility::Nobody => pb::Visibility::Nobody,
    }
}

/// New privacy settings; an unset `approximate_last_seen` keeps the `current` one.
pub fn privacy_from_proto(
    p: Option<pb::PrivacySettings>,
    current: Privacy,
) -> Result<Privacy, InvalidInput> {
    let p = p.ok_or_else(|| InvalidInput("settings is required".into()))?;
    Ok(Privacy {
        online: visibility_from_proto(p.online, "settings.online")?,
        last_seen: visibility_from_proto(p.last_seen, "settings.last_seen")?,
        approximate_last_seen: p
            .approximate_last_seen
            .unwrap_or(current.approximate_last_seen),
    })
}

pub fn privacy_to_proto(p: Privacy) -> pb::PrivacySettings {
    pb::PrivacySettings {
        online: visibility_to_proto(p.online) as i32,
        last_seen: visibility_to_proto(p.last_seen) as i32,
        approximate_last_seen: Some(p.approximate_last_seen),
    }
}

fn user_id(raw: u64, field: &str) -> Result<UserId, InvalidInput> {
    UserId::parse(raw).map_err(|_| {
        InvalidInput(format!(
            "{field} must be a positive user id of at most {MAX_USER_ID}, got {raw}"
        ))
    })
}

pub fn user_ids(raw: &[u64], field: &str, max: usize) -> Result<Vec<UserId>, InvalidInput> {
    if raw.len() > max {
        return Err(InvalidInput(format!(
            "{field} has {} ids; at most {max} are allowed per request",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, &id)| user_id(id, &format!("{field}[{i}]")))
        .collect()
}

pub fn one_user_id(raw: u64, field: &str) -> Result<UserId, InvalidInput> {
    user_id(raw, field)
}

pub fn pairs(raw: &[pb::ContactPair], max: usize) -> Result<Vec<(UserId, UserId)>, InvalidInput> {
    if raw.len() > max {
        return Err(InvalidInput(format!(
            "pairs has {} entries; at most {max} are allowed per request",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, p)| {
            let a = user_id(p.user_id, &format!("pairs[{i}].user_id"))?;
            let b = user_id(p.contact_id, &format!("pairs[{i}].contact_id"))?;
            if a == b {
                return Err(InvalidInput(format!(
                    "pairs[{i}]: a user cannot be their own contact ({a})"
                )));
            }
            Ok((a, b))
        })
        .collect()
}

/// A timestamp from a client, in milliseconds.
fn millis_from_proto(ts: &prost_types::Timestamp, field: &str) -> Result<Millis, InvalidInput> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(InvalidInput(format!(
            "{field}.nanos must be in 0..1000000000, got {}",
            ts.nanos
        )));
    }
    ts.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(ts.nanos / 1_000_000)))
        .ok_or_else(|| InvalidInput(format!("{field} is out of range")))
}

/// A custom status as the client sent it, validated at `now` (None: clear it).
pub fn custom_from_proto(
    raw: Option<pb::CustomStatus>,
    field: &str,
    now: Millis,
) -> Result<Option<CustomStatus>, InvalidInput> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let expires_at = raw
        .expires_at
        .as_ref()
        .map(|t| millis_from_proto(t, &format!("{field}.expires_at")))
        .transpose()?;
    CustomStatus::parse(field, raw.text, raw.emoji, expires_at, now)
}

fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn approx_to_proto(a: LastSeenApprox) -> pb::LastSeenApprox {
    match a {
        LastSeenApprox::Recently => pb::LastSeenApprox::Recently,
        LastSeenApprox::WithinWeek => pb::LastSeenApprox::WithinWeek,
        LastSeenApprox::WithinMonth => pb::LastSeenApprox::WithinMonth,
        LastSeenApprox::LongAgo => pb::LastSeenApprox::LongAgo,
    }
}

pub fn custom_to_proto(c: &Arc<CustomStatus>) -> pb::CustomStatus {
    pb::CustomStatus {
        text: c.text.clone(),
        emoji: c.emoji.clone(),
        expires_at: c.expires_at.map(timestamp),
    }
}

pub fn presence_to_proto(v: &PresenceView) -> pb::UserPresence {
    pb::UserPresence {
        user_id: v.user_id.get(),
        status: status_to_proto(v.status) as i32,
        last_seen: v.last_seen.map(timestamp),
        version: v.version,
        connected: v.connected,
        platforms: v
            .platforms
            .iter()
            .map(|p| platform_to_proto(p) as i32)
            .collect(),
        idle_since: v.idle_since.map(timestamp),
        custom_status: v.custom.as_ref().map(custom_to_proto),
        last_seen_approx: v
            .last_seen_approx
            .map_or(pb::LastSeenApprox::Unspecified, approx_to_proto)
            as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_and_unknown_statuses_are_refused_by_name() {
        let e = status_from_proto(0, "status").unwrap_err();
        assert!(e.0.contains("STATUS_UNSPECIFIED"), "{e}");
        let e = status_from_proto(99, "status").unwrap_err();
        assert!(e.0.contains("99"), "{e}");
        assert_eq!(status_from_proto(3, "status").unwrap(), Status::Busy);
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        let t = timestamp(1_731_249_000_123);
        assert_eq!((t.seconds, t.nanos), (1_731_249_000, 123_000_000));
    }

    #[test]
    fn self_pairs_oversize_requests_and_ids_out_of_range_are_refused() {
        let p = |a, b| pb::ContactPair {
            user_id: a,
            contact_id: b,
        };
        assert!(pairs(&[p(1, 1)], 10).unwrap_err().0.contains("own contact"));
        assert!(
            pairs(&[p(1, 2), p(2, 3)], 1)
                .unwrap_err()
                .0
                .contains("at most 1")
        );
        assert!(
            user_ids(&[1, 0], "user_ids", 10)
                .unwrap_err()
                .0
                .contains("user_ids[1]")
        );
        let e = user_ids(&[1 << 63], "user_ids", 10).unwrap_err();
        assert!(
            e.0.contains("user_ids[0]") && e.0.contains("at most"),
            "{e}"
        );
    }

    #[test]
    fn an_unset_approximate_setting_keeps_the_current_one() {
        let current = Privacy {
            approximate_last_seen: false,
            ..Privacy::default()
        };
        let p = privacy_from_proto(
            Some(pb::PrivacySettings {
                online: 1,
                last_seen: 1,
                approximate_last_seen: None,
            }),
            current,
        )
        .unwrap();
        assert!(!p.approximate_last_seen);
    }
}
