//! Validated domain types shared by every layer. Proto messages are turned into these at the
//! gRPC edge, before anything is stored or spawned, so the engine and the stores never see an
//! unchecked id or an unknown enum value.
use std::fmt;
use std::num::NonZeroU64;

/// Milliseconds since the Unix epoch, UTC. The one time unit stored and compared everywhere.
pub type Millis = i64;

/// Now, in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Why a value from a client was refused. The text names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// A user id: a positive integer. Zero is never a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(NonZeroU64);

impl UserId {
    pub fn parse(raw: u64) -> Result<Self, InvalidInput> {
        NonZeroU64::new(raw)
            .map(UserId)
            .ok_or_else(|| InvalidInput("user id must be a positive integer, got 0".into()))
    }

    /// Parses a decimal string, as found in metadata and token subjects.
    pub fn parse_str(raw: &str) -> Result<Self, InvalidInput> {
        let n: u64 = raw.trim().parse().map_err(|_| {
            InvalidInput(format!("user id must be a positive integer, got {raw:?}"))
        })?;
        Self::parse(n)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A status a user can choose, and the effective status others see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Status {
    #[default]
    Online,
    Away,
    Busy,
    Offline,
}

impl Status {
    /// The seed's strings, also used as the stored column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Offline => "offline",
        }
    }

    pub fn parse_str(raw: &str) -> Result<Self, InvalidInput> {
        match raw {
            "online" => Ok(Status::Online),
            "away" => Ok(Status::Away),
            "busy" => Ok(Status::Busy),
            "offline" => Ok(Status::Offline),
            other => Err(InvalidInput(format!(
                "status must be one of online, away, busy, offline; got {other:?}"
            ))),
        }
    }
}

/// Who may see one piece of a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Visibility {
    Everyone,
    #[default]
    Contacts,
    Nobody,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        }
    }

    pub fn parse_str(raw: &str) -> Result<Self, InvalidInput> {
        match raw {
            "everyone" => Ok(Visibility::Everyone),
            "contacts" => Ok(Visibility::Contacts),
            "nobody" => Ok(Visibility::Nobody),
            other => Err(InvalidInput(format!(
                "visibility must be one of everyone, contacts, nobody; got {other:?}"
            ))),
        }
    }

    /// Whether someone with this relation passes this setting.
    pub fn allows(self, is_contact: bool) -> bool {
        match self {
            Visibility::Everyone => true,
            Visibility::Contacts => is_contact,
            Visibility::Nobody => false,
        }
    }
}

/// A user's privacy settings. Default: contacts only, as the seed behaved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Privacy {
    pub online: Visibility,
    pub last_seen: Visibility,
}

/// One user's presence as one particular viewer may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceView {
    pub user_id: UserId,
    pub status: Status,
    pub last_seen: Option<Millis>,
    pub version: u64,
    /// Only for service viewers: whether the user has a live device, even while invisible.
    pub connected: Option<bool>,
}

impl PresenceView {
    /// What anyone sees of a user they may see nothing of, or who was never seen.
    pub fn unknown(user_id: UserId) -> Self {
        PresenceView {
            user_id,
            status: Status::Offline,
            last_seen: None,
            version: 0,
            connected: None,
        }
    }
}

/// Who is looking. Users see through privacy filters; services see everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    User(UserId),
    Service,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_not_a_user() {
        assert!(UserId::parse(0).is_err(), "0 must be refused as a user id");
        assert_eq!(UserId::parse(7).unwrap().get(), 7);
    }

    #[test]
    fn user_ids_from_text_must_be_positive_integers() {
        assert!(UserId::parse_str("-1").is_err());
        assert!(UserId::parse_str("abc").is_err());
        assert!(UserId::parse_str("0").is_err());
        assert_eq!(UserId::parse_str("42").unwrap().get(), 42);
    }

    #[test]
    fn seed_status_strings_round_trip() {
        for s in [Status::Online, Status::Away, Status::Busy, Status::Offline] {
            assert_eq!(Status::parse_str(s.as_str()).unwrap(), s);
        }
        assert!(Status::parse_str("sleeping").is_err());
    }
}
