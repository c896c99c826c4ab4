//! Proto ⇄ domain. Unknown enum values, STATUS_UNSPECIFIED and id 0 are refused here with a
//! message that names the field.
use crate::domain::{InvalidInput, Millis, PresenceView, Privacy, Status, UserId, Visibility};
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

pub fn privacy_from_proto(p: Option<pb::PrivacySettings>) -> Result<Privacy, InvalidInput> {
    let p = p.ok_or_else(|| InvalidInput("settings is required".into()))?;
    Ok(Privacy {
        online: visibility_from_proto(p.online, "settings.online")?,
        last_seen: visibility_from_proto(p.last_seen, "settings.last_seen")?,
    })
}

pub fn privacy_to_proto(p: Privacy) -> pb::PrivacySettings {
    pb::PrivacySettings {
        online: visibility_to_proto(p.online) as i32,
        last_seen: visibility_to_proto(p.last_seen) as i32,
    }
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
        .map(|(i, &id)| {
            UserId::parse(id).map_err(|_| {
                InvalidInput(format!("{field}[{i}] must be a positive user id, got 0"))
            })
        })
        .collect()
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
            let a = UserId::parse(p.user_id).map_err(|_| {
                InvalidInput(format!("pairs[{i}].user_id must be a positive user id"))
            })?;
            let b = UserId::parse(p.contact_id).map_err(|_| {
                InvalidInput(format!("pairs[{i}].contact_id must be a positive user id"))
            })?;
            if a == b {
                return Err(InvalidInput(format!(
                    "pairs[{i}]: a user cannot be their own contact ({a})"
                )));
            }
            Ok((a, b))
        })
        .collect()
}

fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn presence_to_proto(v: &PresenceView) -> pb::UserPresence {
    pb::UserPresence {
        user_id: v.user_id.get(),
        status: status_to_proto(v.status) as i32,
        last_seen: v.last_seen.map(timestamp),
        version: v.version,
        connected: v.connected,
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
    fn self_pairs_and_oversize_requests_are_refused() {
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
    }
}
