//! Validated domain types shared by every layer. Proto messages are turned into these at the
//! gRPC edge, before anything is stored or spawned, so the engine and the stores never see an
//! unchecked id, an unknown enum value or an unchecked text.
use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;

mod custom;
pub use custom::{CustomStatus, MAX_CUSTOM_TEXT, MAX_EMOJI_BYTES};

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

/// The largest user id: both stores keep ids as signed 64-bit integers (SQLite has no unsigned
/// one), so anything above `i64::MAX` is refused at the edge instead of failing in a store.
pub const MAX_USER_ID: u64 = i64::MAX as u64;

/// A user id: a positive integer no larger than [`MAX_USER_ID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(NonZeroU64);

impl UserId {
    pub fn parse(raw: u64) -> Result<Self, InvalidInput> {
        if raw > MAX_USER_ID {
            return Err(InvalidInput(format!(
                "user id must be at most {MAX_USER_ID}, got {raw}"
            )));
        }
        NonZeroU64::new(raw)
            .map(UserId)
            .ok_or_else(|| InvalidInput("user id must be a positive integer, got 0".into()))
    }

    /// Parses the canonical decimal form only (as in token subjects and metadata): no sign, no
    /// leading zero, no spaces, so one user has exactly one spelling.
    pub fn parse_str(raw: &str) -> Result<Self, InvalidInput> {
        let canonical = !raw.is_empty()
            && raw.len() <= 20
            && raw.bytes().all(|b| b.is_ascii_digit())
            && !raw.starts_with('0');
        let refused = || {
            InvalidInput(format!(
                "user id must be a positive integer in decimal without sign, spaces or leading zeros, got {:?}",
                printable(raw, 40)
            ))
        };
        if !canonical {
            return Err(refused());
        }
        let n: u64 = raw.parse().map_err(|_| refused())?;
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

/// `text` cut to `max` characters with every control or format character escaped, for logs
/// and error messages that quote what a client sent.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || custom::is_format_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
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

/// A user's privacy settings. Default: contacts only, as the seed behaved, and an approximate
/// last_seen for those denied the exact one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Privacy {
    pub online: Visibility,
    pub last_seen: Visibility,
    /// Whether viewers denied the exact last_seen (but allowed the online status) get a coarse
    /// one ("recently", "within a week"…).
    pub approximate_last_seen: bool,
}

impl Default for Privacy {
    fn default() -> Self {
        Privacy {
            online: Visibility::Contacts,
            last_seen: Visibility::Contacts,
            approximate_last_seen: true,
        }
    }
}

/// Where a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Platform {
    #[default]
    Unspecified,
    Desktop,
    Mobile,
    Web,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::Unspecified,
        Platform::Desktop,
        Platform::Mobile,
        Platform::Web,
    ];

    /// Index in per-platform counters.
    pub fn index(self) -> usize {
        match self {
            Platform::Unspecified => 0,
            Platform::Desktop => 1,
            Platform::Mobile => 2,
            Platform::Web => 3,
        }
    }
}

/// The known platforms a user has a live device on (a device that did not say is not listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PlatformSet(u8);

impl PlatformSet {
    pub const EMPTY: PlatformSet = PlatformSet(0);

    pub fn with(self, p: Platform) -> PlatformSet {
        match p {
            Platform::Unspecified => self,
            known => PlatformSet(self.0 | 1 << known.index()),
        }
    }

    pub fn contains(self, p: Platform) -> bool {
        p != Platform::Unspecified && self.0 & (1 << p.index()) != 0
    }

    /// Distinct, ascending (desktop, mobile, web).
    pub fn iter(self) -> impl Iterator<Item = Platform> {
        Platform::ALL.into_iter().filter(move |p| self.contains(*p))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> PlatformSet {
        PlatformSet(bits & 0b1110)
    }
}

/// Whether the person is using a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activity {
    #[default]
    Active,
    /// Connected, not in use.
    Idle,
    /// Backgrounded: idle, and passive (no live updates until it comes back).
    Background,
}

impl Activity {
    pub fn is_active(self) -> bool {
        self == Activity::Active
    }

    pub fn is_passive(self) -> bool {
        self == Activity::Background
    }
}

/// A coarse last_seen, computed when read (never stored, never pushed as time passes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LastSeenApprox {
    /// Up to 3 days ago.
    Recently,
    WithinWeek,
    WithinMonth,
    LongAgo,
}

impl LastSeenApprox {
    const DAY: Millis = 24 * 3600 * 1000;

    /// The bucket of `last_seen` as seen at `now`: up to 3 days ago is RECENTLY, up to 7
    /// WITHIN_WEEK, up to 30 WITHIN_MONTH, beyond LONG_AGO (each bound included in the bucket
    /// below it).
    pub fn of(last_seen: Millis, now: Millis) -> LastSeenApprox {
        let age = now.saturating_sub(last_seen);
        if age <= 3 * Self::DAY {
            LastSeenApprox::Recently
        } else if age <= 7 * Self::DAY {
            LastSeenApprox::WithinWeek
        } else if age <= 30 * Self::DAY {
            LastSeenApprox::WithinMonth
        } else {
            LastSeenApprox::LongAgo
        }
    }
}

/// One user's presence as one particular viewer may see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PresenceView {
    pub user_id: UserId,
    pub status: Status,
    pub last_seen: Option<Millis>,
    pub version: u64,
    /// Only for service viewers: whether the user has a live device, even while invisible.
    pub connected: Option<bool>,
    /// Known platforms with a live device; empty when hidden.
    pub platforms: PlatformSet,
    /// Set while the user is auto-away, for viewers who may see the online status.
    pub idle_since: Option<Millis>,
    pub custom: Option<Arc<CustomStatus>>,
    /// Instead of last_seen, for viewers allowed the online status but not the exact time.
    pub last_seen_approx: Option<LastSeenApprox>,
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
            platforms: PlatformSet::EMPTY,
            idle_since: None,
            custom: None,
            last_seen_approx: None,
        }
    }

    /// Whether two views show the same thing (the version aside).
    pub fn same_content(&self, other: &PresenceView) -> bool {
        self.status == other.status
            && self.last_seen == other.last_seen
            && self.platforms == other.platforms
            && self.idle_since == other.idle_since
            && self.custom == other.custom
            && self.last_seen_approx == other.last_seen_approx
            && self.connected == other.connected
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
    fn ids_above_the_stores_range_are_refused() {
        assert!(UserId::parse(MAX_USER_ID).is_ok());
        let e = UserId::parse(MAX_USER_ID + 1).unwrap_err();
        assert!(e.0.contains("at most"), "{e}");
        assert!(UserId::parse(u64::MAX).is_err());
    }

    #[test]
    fn user_ids_from_text_must_be_canonical_positive_integers() {
        for bad in [
            "-1",
            "abc",
            "0",
            "01",
            "+1",
            " 1 ",
            "1 ",
            "",
            "1e3",
            "99999999999999999999",
        ] {
            assert!(UserId::parse_str(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(UserId::parse_str("42").unwrap().get(), 42);
    }

    #[test]
    fn seed_status_strings_round_trip() {
        for s in [Status::Online, Status::Away, Status::Busy, Status::Offline] {
            assert_eq!(Status::parse_str(s.as_str()).unwrap(), s);
        }
        assert!(Status::parse_str("sleeping").is_err());
    }

    #[test]
    fn approximate_buckets_include_their_upper_bound() {
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        let at = |age| LastSeenApprox::of(now - age, now);
        assert_eq!(at(0), LastSeenApprox::Recently);
        assert_eq!(at(3 * day), LastSeenApprox::Recently);
        assert_eq!(at(3 * day + 1), LastSeenApprox::WithinWeek);
        assert_eq!(at(7 * day), LastSeenApprox::WithinWeek);
        assert_eq!(at(7 * day + 1), LastSeenApprox::WithinMonth);
        assert_eq!(at(30 * day), LastSeenApprox::WithinMonth);
        assert_eq!(at(30 * day + 1), LastSeenApprox::LongAgo);
    }

    #[test]
    fn platform_sets_list_known_platforms_ascending() {
        let set = PlatformSet::EMPTY
            .with(Platform::Web)
            .with(Platform::Unspecified)
            .with(Platform::Desktop);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![Platform::Desktop, Platform::Web]
        );
    }

    #[test]
    fn printable_escapes_control_and_bidi_characters() {
        assert_eq!(printable("a\nb", 10), "a\\u{a}b");
        assert_eq!(printable("x\u{202e}y", 10), "x\\u{202e}y");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
