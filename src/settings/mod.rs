//! Every setting of the server, typed, with its default, its flag and its environment variable;
//! layered defaults < TOML file ([`file`]) < environment < flags, and checked as a whole by
//! [`Settings::check`] before anything starts. The README's settings table is checked against
//! this file by a test.
pub mod file;
mod secret;

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

pub use secret::{Secret, SecretUrl};

use crate::auth::{KeyConfig, Verifier};
use crate::engine::EngineConfig;
use crate::grpc::RequestLimits;
use crate::grpc::limits::RateSettings;

/// Settings of `presence serve` (flags override environment variables, which override defaults).
#[derive(Args, Debug, Clone)]
pub struct Settings {
    /// Optional TOML file of settings (keys as the flag names with underscores); environment
    /// variables and flags override it.
    #[arg(long, env = "PRESENCE_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "PRESENCE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Store: sqlite://FILE (created when missing) or mysql://USER:PASS@HOST:PORT/DB.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://presence.db")]
    pub database_url: SecretUrl,

    /// How often changed presence rows are written to the database, in milliseconds.
    #[arg(long, env = "PRESENCE_FLUSH_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub flush_interval_ms: u64,

    /// Most user ids in one GetPresence or WatchContacts request.
    #[arg(long, env = "PRESENCE_MAX_IDS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ids: u64,

    /// HTTP/2 keepalive ping interval, in seconds (dead-peer detection).
    #[arg(long, env = "PRESENCE_KEEPALIVE_INTERVAL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_interval_s: u64,

    /// How long a keepalive ping may go unanswered before the connection is closed, in seconds.
    #[arg(long, env = "PRESENCE_KEEPALIVE_TIMEOUT_S", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_timeout_s: u64,

    /// Hard limit on graceful shutdown, in seconds: open streams are cut after it.
    #[arg(long, env = "PRESENCE_SHUTDOWN_DEADLINE_S", default_value_t = 10)]
    pub shutdown_deadline_s: u64,

    /// How long after a user's last device leaves they are announced offline, in milliseconds
    /// (anti-flap; 0 announces at once). last_seen is still the real disconnect time.
    #[arg(long, env = "PRESENCE_OFFLINE_GRACE_MS", default_value_t = 5000)]
    pub offline_grace_ms: u64,

    /// How often online users' rows are marked "still online at T", in seconds.
    #[arg(long, env = "PRESENCE_CHECKPOINT_INTERVAL_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval_s: u64,

    /// HS256 shared secret for verifying JWTs (at least 32 bytes, not one repeated character).
    /// Unset, together with PRESENCE_JWT_PUBLIC_KEY, means development mode (loopback only).
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// Path of a PEM public key (RSA for RS256, EC P-256 for ES256) for verifying JWTs.
    #[arg(long, env = "PRESENCE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Expected `iss` claim, when set.
    #[arg(long, env = "PRESENCE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Expected `aud` claim, when set.
    #[arg(long, env = "PRESENCE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Longest token lifetime accepted, in seconds: a token expiring later is refused.
    #[arg(long, env = "PRESENCE_JWT_MAX_TTL_S", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub jwt_max_ttl_s: u64,

    /// Status (and privacy) changes allowed per user per minute.
    #[arg(long, env = "PRESENCE_RATE_STATUS_PER_MIN", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_status_per_min: u32,

    /// GetPresence and WatchContacts ids allowed per user per minute.
    #[arg(long, env = "PRESENCE_RATE_IDS_PER_MIN", default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_ids_per_min: u32,

    /// Activity changes (active, idle, background) allowed per device per minute; more are
    /// ignored and counted.
    #[arg(long, env = "PRESENCE_RATE_ACTIVITY_PER_MIN", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_activity_per_min: u32,

    /// Most live devices (Authenticate streams) per user.
    #[arg(long, env = "PRESENCE_MAX_DEVICES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_devices: u32,

    /// Most open WatchContacts streams per user.
    #[arg(long, env = "PRESENCE_MAX_WATCHES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches: u32,

    /// Most concurrent streams per HTTP/2 connection (an edge multiplexes many users on one).
    #[arg(long, env = "PRESENCE_MAX_STREAMS_PER_CONN", default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_conn: u32,

    /// Most contact pairs in one AddContacts or RemoveContacts request.
    #[arg(long, env = "PRESENCE_MAX_PAIRS", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pairs: u64,

    /// Largest accepted gRPC message, in bytes.
    #[arg(long, env = "PRESENCE_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_message_bytes: u64,

    /// How long an Authenticate stream may wait before sending its hello, in seconds.
    #[arg(long, env = "PRESENCE_HELLO_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub hello_timeout_s: u64,

    /// Most Authenticate streams of one connection waiting for their hello at once.
    #[arg(long, env = "PRESENCE_MAX_HELLO_PENDING_PER_CONN", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_hello_pending_per_conn: u32,

    /// Most device sessions on one relay stream (RelayService).
    #[arg(long, env = "PRESENCE_MAX_RELAY_SESSIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_relay_sessions: u64,

    /// Queue length of a relay stream (all its sessions) at which queued updates are coalesced
    /// to the newest per session and user.
    #[arg(long, env = "PRESENCE_RELAY_QUEUE_CAPACITY", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(16..))]
    pub relay_queue_capacity: u64,

    /// Queue length per receiver at which queued updates are coalesced to the newest per user.
    #[arg(long, env = "PRESENCE_QUEUE_CAPACITY", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_capacity: u64,

    /// Most streams being set up at once; beyond it new streams get UNAVAILABLE with a retry hint.
    #[arg(long, env = "PRESENCE_MAX_PENDING_SETUPS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_setups: u64,

    /// Most of those set-ups one user may hold at once (so one user cannot take them all).
    #[arg(long, env = "PRESENCE_MAX_PENDING_SETUPS_PER_USER", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_setups_per_user: u32,

    /// Deliveries are released to the network in batches this often, in microseconds (0: at
    /// once). Batching lets one HTTP/2 connection write many updates in one system call.
    #[arg(long, env = "PRESENCE_DELIVERY_BATCH_US", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub delivery_batch_us: u64,

    /// Redis URL: set it to run several nodes as one cluster (unset: a single node, no Redis).
    /// redis://HOST:PORT (one instance), redis+cluster://HOST:PORT,HOST:PORT,… (a Redis
    /// Cluster: any of its nodes as seeds) or redis+sentinel://HOST:PORT,…/MASTER (Sentinel).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<SecretUrl>,

    /// Replicas that must hold each presence change before a node acts on it (Redis WAIT, at
    /// most 100 ms per batch), so a failover loses no acknowledged change. Default: 1 on a Redis
    /// Cluster or Sentinel, 0 on one instance.
    #[arg(long, env = "PRESENCE_REDIS_WAIT_REPLICAS", value_parser = clap::value_parser!(u32).range(0..=16))]
    pub redis_wait_replicas: Option<u32>,

    /// Prefix of every Redis key and channel (several clusters or test runs can share a Redis).
    #[arg(long, env = "PRESENCE_REDIS_PREFIX", default_value = "presence")]
    pub redis_prefix: String,

    /// How long a user's state stays in Redis after their last device left, in seconds (the
    /// node that wrote their row releases it sooner; this is the safety net).
    #[arg(long, env = "PRESENCE_REDIS_IDLE_TTL_S", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_idle_ttl_s: u64,

    /// Users per batch when a dead node's devices are dropped (one pipelined Redis round trip
    /// each).
    #[arg(long, env = "PRESENCE_REAP_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub reap_batch: u64,

    /// Node lease, in seconds: a node silent this long is declared dead; its devices go offline
    /// (cluster) and the rows it left online are recovered.
    #[arg(long, env = "PRESENCE_NODE_LEASE_TTL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_lease_ttl_s: u64,

    /// Address of the Prometheus /metrics listener; empty disables it.
    #[arg(
        long,
        env = "PRESENCE_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: MetricsListen,
}

/// The metrics listener: an address, or disabled (empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Ok(MetricsListen(None));
        }
        raw.parse()
            .map(|a| MetricsListen(Some(a)))
            .map_err(|e| format!("{raw:?} is not an address like 127.0.0.1:9090: {e}"))
    }
}

/// A setting that cannot work, found before anything starts: `presence` exits 2 with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(String);

impl SettingsError {
    /// `message` about `setting` (its environment variable's name), named once.
    pub fn new(setting: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        if message.contains(setting) {
            SettingsError(message)
        } else {
            SettingsError(format!("{setting}: {message}"))
        }
    }
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

/// What [`Settings::check`] validated, typed: what the assembly starts from.
pub struct Checked {
    pub verifier: Verifier,
    pub redis: Option<crate::cluster::redis::RedisConfig>,
}

impl Settings {
    /// Settings with every default, for tests and tools: equivalent to `presence serve` with no
    /// flags and no environment.
    pub fn defaults() -> Settings {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        use clap::{CommandFactory, FromArgMatches};
        // Parse with an empty environment view: clap reads env vars, so build the matches from
        // a command whose args ignore the environment.
        let mut cmd = Wrapper::command();
        let ids: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        for id in ids {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches = cmd
            .try_get_matches_from(["presence"])
            .expect("every setting has a default or is optional");
        Wrapper::from_arg_matches(&matches)
            .expect("matches come from the same command")
            .settings
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            offline_grace: Duration::from_millis(self.offline_grace_ms),
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_s),
            queue_capacity: self.queue_capacity as usize,
            relay_queue_capacity: self.relay_queue_capacity as usize,
            max_devices: self.max_devices,
            max_watches: self.max_watches,
            max_pending_setups: self.max_pending_setups as usize,
            max_pending_setups_per_user: self.max_pending_setups_per_user,
            delivery_batch: Duration::from_micros(self.delivery_batch_us),
            node_ttl: Duration::from_secs(self.node_lease_ttl_s),
            reap_batch: self.reap_batch as usize,
            ..EngineConfig::default()
        }
    }

    /// Checks every setting that can be wrong beyond its own type: the key material (and
    /// development mode only on loopback), the database and Redis URLs. Fails naming the setting.
    pub fn check(&self) -> Result<Checked, SettingsError> {
        let keys = self.keys()?;
        // Its messages name the key setting at fault (secret or public key).
        let verifier = Verifier::from_keys(&keys).map_err(|e| {
            let setting = if e.contains("PRESENCE_JWT_PUBLIC_KEY") {
                "PRESENCE_JWT_PUBLIC_KEY"
            } else {
                "PRESENCE_JWT_SECRET"
            };
            SettingsError::new(setting, e)
        })?;
        if verifier.is_development() && !self.listen.ip().is_loopback() {
            return Err(SettingsError::new(
                "PRESENCE_LISTEN",
                format!(
                    "refusing to listen on {} in development mode: set PRESENCE_JWT_SECRET or PRESENCE_JWT_PUBLIC_KEY, or listen on a loopback address",
                    self.listen
                ),
            ));
        }
        let db = self.database_url.expose();
        if !(db.starts_with("sqlite:")
            || db.starts_with("mysql://")
            || db.starts_with("mariadb://"))
        {
            return Err(SettingsError::new(
                "DATABASE_URL",
                format!(
                    "{} is not supported: use sqlite://FILE or mysql://USER:PASS@HOST:PORT/DB",
                    self.database_url
                ),
            ));
        }
        Ok(Checked {
            verifier,
            redis: self.redis()?,
        })
    }

    /// The Redis backplane's settings, or None on a single node.
    fn redis(&self) -> Result<Option<crate::cluster::redis::RedisConfig>, SettingsError> {
        use crate::cluster::redis::{RedisConfig, RedisTarget};
        let Some(url) = self
            .redis_url
            .as_ref()
            .filter(|u| !u.expose().trim().is_empty())
        else {
            return Ok(None);
        };
        let target = RedisTarget::parse(url.expose())
            .map_err(|e| SettingsError::new("REDIS_URL", format!("{url} {e}")))?;
        let wait_replicas = match (self.redis_wait_replicas, &target) {
            (Some(n), _) => n,
            (None, RedisTarget::Single(_)) => 0,
            (None, _) => 1,
        };
        Ok(Some(RedisConfig {
            target,
            wait_replicas,
            prefix: self.redis_prefix.clone(),
            lease_ttl: Duration::from_secs(self.node_lease_ttl_s),
            idle_ttl: Duration::from_secs(self.redis_idle_ttl_s),
        }))
    }

    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_ids: self.max_ids as usize,
            max_pairs: self.max_pairs as usize,
            hello_timeout: Duration::from_secs(self.hello_timeout_s),
            max_hello_pending_per_conn: self.max_hello_pending_per_conn,
            max_relay_sessions: self.max_relay_sessions as usize,
        }
    }

    pub fn rates(&self) -> RateSettings {
        RateSettings {
            status_changes_per_min: self.rate_status_per_min,
            presence_ids_per_min: self.rate_ids_per_min,
            activity_changes_per_min: self.rate_activity_per_min,
        }
    }

    /// The JWT key material, reading the public key file. Fails naming the setting.
    fn keys(&self) -> Result<KeyConfig, SettingsError> {
        let public_key_pem = match &self.jwt_public_key {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                SettingsError::new(
                    "PRESENCE_JWT_PUBLIC_KEY",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?),
            None => None,
        };
        Ok(KeyConfig {
            secret: self
                .jwt_secret
                .as_ref()
                .map(|s| s.expose().to_string())
                .filter(|s| !s.is_empty()),
            public_key_pem,
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
            max_ttl: Duration::from_secs(self.jwt_max_ttl_s),
        })
    }

    /// The metrics listener, or None when disabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen.0
    }

    pub fn keepalive(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.keepalive_interval_s),
            Duration::from_secs(self.keepalive_timeout_s),
        )
    }

    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.shutdown_deadline_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_names_no_secret_and_no_password() {
        let mut s = Settings::defaults();
        s.jwt_secret = Some("a-very-secret-signing-key-0123456789".into());
        s.database_url = "mysql://app:hunter2@db:3306/presence".into();
        s.redis_url = Some("redis://:hunter3@cache:6379".into());
        let shown = format!("{s:?}");
        for secret in ["a-very-secret", "hunter2", "hunter3"] {
            assert!(!shown.contains(secret), "{secret} leaks into {shown}");
        }
        assert!(
            shown.contains("mysql://app:***@db:3306/presence"),
            "{shown}"
        );
    }
}
