//! The harness of the fault tests: servers (in-process or as a real process that can be killed
//! with SIGKILL), callers that name themselves through development-mode metadata, and receivers
//! (devices and watchers) that wait for the updates a test expects, with a timeout.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence::engine::Engine;
use presence::pb::{self};
use presence::pb::{contacts_client::ContactsClient, presence_client::PresenceClient};
use presence::server::Application;
use presence::settings::Settings;
use presence::store::{self, PresenceRow, Store};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[path = "../common/calls.rs"]
mod calls;
#[path = "../common/process.rs"]
mod process;
#[path = "../common/streams.rs"]
mod streams;
pub use calls::*;
pub use process::ServerProcess;
pub use streams::*;

/// The fault tests measure times (detection, convergence, latency percentiles) on a 2-core
/// machine: they take turns, so that one test's 2000 streams do not skew another's figures.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds the machine for one test; see [`EXCLUSIVE`].
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    init_tracing();
    EXCLUSIVE.lock().await
}

// ---------------------------------------------------------------------------------------------
// In-process servers
// ---------------------------------------------------------------------------------------------

/// A temporary directory for a test's SQLite file, and the URL of that file.
pub fn sqlite_dir() -> (Arc<TempDir>, String) {
    let dir = tempfile::tempdir().expect("a temporary directory for the database");
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    (Arc::new(dir), url)
}

/// Settings of a test server: the given database, port 0, no anti-flap grace, fast flushes, no
/// metrics listener; then `configure`.
pub fn test_settings(database_url: &str, configure: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = Settings::defaults();
    settings.listen = "127.0.0.1:0".parse().expect("a literal address");
    settings.database_url = database_url.into();
    settings.offline_grace_ms = 0;
    settings.flush_interval_ms = 50;
    settings.metrics_listen = presence::settings::MetricsListen(None);
    configure(&mut settings);
    settings
}

/// A server running in this process, built exactly as `presence serve` builds it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub settings: Settings,
    /// The running engine, for counters GetStats does not carry (db_errors, dirty_users).
    pub engine: Engine,
    stop_tx: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Keeps the SQLite file alive as long as the server (and across restarts).
    pub db_dir: Option<Arc<TempDir>>,
}

impl TestServer {
    /// A server on a fresh SQLite file.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> TestServer {
        let (dir, url) = sqlite_dir();
        Self::start_with(test_settings(&url, configure), Some(dir)).await
    }

    /// A server with the given settings (for example a restart on the same database).
    pub async fn start_with(settings: Settings, db_dir: Option<Arc<TempDir>>) -> TestServer {
        init_tracing();
        let app = Application::build(settings.clone())
            .await
            .expect("the test server builds");
        Self::run(app, settings, db_dir)
    }

    /// A server on a store the test opened (and may have wrapped to inject faults).
    pub async fn start_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
        db_dir: Option<Arc<TempDir>>,
    ) -> TestServer {
        init_tracing();
        let app = Application::build_with_store(settings.clone(), store)
            .await
            .expect("the test server builds on the given store");
        Self::run(app, settings, db_dir)
    }

    fn run(app: Application, settings: Settings, db_dir: Option<Arc<TempDir>>) -> TestServer {
        let addr = app.local_addr();
        let engine = app.engine().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = stop_rx.await;
        }));
        TestServer {
            addr,
            settings,
            engine,
            stop_tx: Some(stop_tx),
            handle: Some(handle),
            db_dir,
        }
    }

    /// Triggers the graceful shutdown and waits for `run_until_stopped` to return, at most
    /// `limit`. Returns how long it took.
    pub async fn stop_within(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let result = tokio::time::timeout(limit, handle)
                .await
                .unwrap_or_else(|_| panic!("run_until_stopped returns within {limit:?}"))
                .expect("the server task does not panic");
            result.expect("the server stops without error");
        }
        started.elapsed()
    }

    /// A new HTTP/2 connection to the server.
    pub async fn connection(&self) -> Channel {
        connect(self.addr).await
    }
}

/// A new HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    endpoint(addr)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("the server at {addr} accepts connections: {e}"))
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_timeout(WAIT)
}

// ---------------------------------------------------------------------------------------------
// Servers as processes
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Calls (callers are in tests/common/calls.rs)
// ---------------------------------------------------------------------------------------------

/// Adds symmetric contact pairs as a service; panics on refusal.
pub async fn add_contacts(channel: &Channel, pairs: &[(u64, u64)]) {
    let pairs = pairs
        .iter()
        .map(|&(user_id, contact_id)| pb::ContactPair {
            user_id,
            contact_id,
        })
        .collect();
    ContactsClient::new(channel.clone())
        .add_contacts(service().request(pb::AddContactsRequest { pairs }))
        .await
        .expect("a service may add contacts");
}

pub async fn get_presence(
    channel: &Channel,
    caller: &Caller,
    ids: &[u64],
) -> Result<Vec<pb::UserPresence>, tonic::Status> {
    let reply = PresenceClient::new(channel.clone())
        .get_presence(caller.request(pb::GetPresenceRequest {
            user_ids: ids.to_vec(),
        }))
        .await?;
    Ok(reply.into_inner().users)
}

/// Presence of every given user as a service sees it, in chunks the server accepts.
pub async fn presence_as_service(channel: &Channel, ids: &[u64]) -> Vec<pb::UserPresence> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        out.extend(
            get_presence(channel, &service(), chunk)
                .await
                .expect("a service may read presence"),
        );
    }
    out
}

pub async fn update_status(
    channel: &Channel,
    caller: &Caller,
    status: pb::Status,
) -> Result<pb::UserPresence, tonic::Status> {
    let reply = PresenceClient::new(channel.clone())
        .update_status(caller.request(pb::UpdateStatusRequest {
            status: status as i32,
        }))
        .await?;
    Ok(reply
        .into_inner()
        .presence
        .expect("UpdateStatus returns the presence"))
}

pub async fn stats(channel: &Channel) -> pb::GetStatsResponse {
    PresenceClient::new(channel.clone())
        .get_stats(service().request(pb::GetStatsRequest {}))
        .await
        .expect("a service may read the stats")
        .into_inner()
}

/// Polls GetStats until `ready` holds, at most `within`.
pub async fn wait_for_stats(
    channel: &Channel,
    what: &str,
    within: Duration,
    ready: impl Fn(&pb::GetStatsResponse) -> bool,
) -> pb::GetStatsResponse {
    let deadline = Instant::now() + within;
    loop {
        let stats = stats(channel).await;
        if ready(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; stats: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The health of one service name; NOT_FOUND (never reported) comes back as an error.
pub async fn health(channel: &Channel, name: &str) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: name.to_string(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// Polls the health of `name` until it is `want`, at most `within`; returns how long it took.
pub async fn wait_for_health(
    channel: &Channel,
    name: &str,
    want: ServingStatus,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = health(channel, name).await;
        if now.as_ref().is_ok_and(|s| *s == want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health of {name:?} is not {want:?} within {within:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The database, read behind the server's back
// ---------------------------------------------------------------------------------------------

pub async fn open_store(url: &str) -> Arc<dyn Store> {
    store::connect(url)
        .await
        .unwrap_or_else(|e| panic!("the test database {url} opens: {e}"))
}

/// The stored row of one user, if any.
pub async fn row(store: &Arc<dyn Store>, user: u64) -> Option<PresenceRow> {
    store
        .load_presence(&[uid(user)])
        .await
        .expect("rows load")
        .into_iter()
        .next()
}

/// Polls the user's row until `ready` holds, at most `within`.
pub async fn wait_for_row(
    store: &Arc<dyn Store>,
    user: u64,
    what: &str,
    within: Duration,
    ready: impl Fn(&PresenceRow) -> bool,
) -> PresenceRow {
    let deadline = Instant::now() + within;
    loop {
        let row = row(store, user).await;
        if let Some(row) = row.filter(&ready) {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for the row of user {user} to show {what}: {:?}",
            self::row(store, user).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// The `p`-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "a percentile of no samples");
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------------

impl Device {
    /// Opens a device stream on `channel` (hello, then the welcome, within [`WAIT`]); the
    /// server's refusal comes back as the error.
    pub async fn connect(channel: &Channel, caller: &Caller) -> Result<Device, tonic::Status> {
        Self::connect_within(channel, caller, WAIT).await
    }

    /// Like [`Device::connect`], with a given bound on the welcome.
    pub async fn connect_within(
        channel: &Channel,
        caller: &Caller,
        within: Duration,
    ) -> Result<Device, tonic::Status> {
        Device::open(channel.clone(), caller, "phone", within).await
    }
}

impl Watcher {
    /// Watches the caller's contacts (`ids` empty) or, for a service, the listed users;
    /// panics on refusal.
    pub async fn open(channel: &Channel, caller: &Caller, ids: &[u64]) -> Watcher {
        Watcher::open_on(channel.clone(), caller, ids)
            .await
            .unwrap_or_else(|s| panic!("{caller:?} may watch {ids:?}: {s:?}"))
    }
}

/// Asserts that a refusal is the admission refusal of a reconnect wave: UNAVAILABLE with a
/// `grpc-retry-pushback-ms` hint. Returns the hint.
pub fn pushback_of(status: &tonic::Status) -> Duration {
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a refused stream is UNAVAILABLE, so clients retry: {status:?}"
    );
    let hint = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap_or_else(|| panic!("a refusal carries grpc-retry-pushback-ms: {status:?}"));
    let ms: u64 = hint
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("grpc-retry-pushback-ms is a number of ms: {hint:?}"));
    Duration::from_millis(ms)
}
