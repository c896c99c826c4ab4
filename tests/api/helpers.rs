//! The harness: a real server per test (its own SQLite file, port 0), callers that name
//! themselves through metadata or tokens the tests sign, and receivers (devices and watchers)
//! that wait for the updates a test expects, with a timeout, instead of sleeping.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use presence::pb::{self};
use presence::pb::{contacts_client::ContactsClient, presence_client::PresenceClient};
use presence::server::Application;
use presence::settings::Settings;
use presence::store::{self, PresenceRow, Store};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

#[path = "../common/calls.rs"]
mod calls;
#[path = "../common/streams.rs"]
mod streams;
pub use calls::*;
pub use streams::*;

/// How long a negative check listens. Only used after a positive control proved that the
/// same kind of event does arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// The HS256 secret of the JWT-mode tests.
pub const SECRET: &str = "integration-test-secret-0123456789";

/// A running server and what a test needs to talk to it, restart it and read its database.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// The settings it was started with (listen still port 0, so a restart gets a new port).
    pub settings: Settings,
    /// Shared by unary calls; devices and watchers open their own connections.
    channel: Channel,
    stop_tx: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Keeps the database file alive as long as the app (and across restarts).
    db_dir: Arc<TempDir>,
}

/// Settings of a test server: a fresh database, port 0, no anti-flap grace (announcements at
/// once), fast flushes, no metrics listener; then `configure`.
pub fn test_settings(db_dir: &TempDir, configure: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = Settings::defaults();
    settings.listen = "127.0.0.1:0".parse().expect("a literal address");
    settings.database_url =
        format!("sqlite://{}", db_dir.path().join("presence.db").display()).into();
    settings.offline_grace_ms = 0;
    settings.flush_interval_ms = 50;
    settings.metrics_listen = presence::settings::MetricsListen(None);
    configure(&mut settings);
    settings
}

pub async fn spawn_app(configure: impl FnOnce(&mut Settings)) -> TestApp {
    init_tracing();
    let db_dir = Arc::new(tempfile::tempdir().expect("a temporary directory for the database"));
    let settings = test_settings(&db_dir, configure);
    start(settings, db_dir).await
}

/// A server in JWT mode (HS256 with [`SECRET`]).
pub async fn spawn_jwt_app(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app(|s| {
        s.jwt_secret = Some(SECRET.into());
        configure(s);
    })
    .await
}

async fn start(settings: Settings, db_dir: Arc<TempDir>) -> TestApp {
    let app = Application::build(settings.clone())
        .await
        .expect("the test server builds");
    let addr = app.local_addr();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_lazy();
    TestApp {
        addr,
        settings,
        channel,
        stop_tx: Some(stop_tx),
        handle: Some(handle),
        db_dir,
    }
}

impl TestApp {
    /// Stops the server gracefully and waits until it has finished (its changes are flushed).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("the server stops within 30 s")
                .expect("the server task does not panic");
            result.expect("the server stops without error");
        }
    }

    /// Stops the server, then starts it again on the same database (on a new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let fresh = start(self.settings.clone(), self.db_dir.clone()).await;
        *self = fresh;
    }

    /// A new HTTP/2 connection to the server.
    pub async fn connection(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the test server accepts connections")
    }

    pub fn presence(&self) -> PresenceClient<Channel> {
        PresenceClient::new(self.channel.clone())
    }

    pub fn contacts(&self) -> ContactsClient<Channel> {
        ContactsClient::new(self.channel.clone())
    }

    /// The store the server writes to, opened independently of it.
    pub async fn store(&self) -> Arc<dyn Store> {
        store::connect(self.settings.database_url.expose())
            .await
            .expect("the test database opens")
    }

    /// The stored row of one user, if any.
    pub async fn row(&self, user: u64) -> Option<PresenceRow> {
        let store = self.store().await;
        let rows = store.load_presence(&[uid(user)]).await.expect("rows load");
        rows.into_iter().next()
    }

    /// Adds contact pairs as a service; panics on refusal.
    pub async fn add_contacts(&self, pairs: &[(u64, u64)]) {
        self.contacts()
            .add_contacts(self.service_caller().request(pb::AddContactsRequest {
                pairs: pairs_of(pairs),
            }))
            .await
            .expect("a service may add contacts");
    }

    pub async fn remove_contacts(&self, pairs: &[(u64, u64)]) {
        self.contacts()
            .remove_contacts(self.service_caller().request(pb::RemoveContactsRequest {
                pairs: pairs_of(pairs),
            }))
            .await
            .expect("a service may remove contacts");
    }

    /// A user's contacts as the service lists them (first page of up to 1000).
    pub async fn contacts_of(&self, user: u64) -> Vec<u64> {
        self.contacts()
            .list_contacts(self.service_caller().request(pb::ListContactsRequest {
                user_id: user,
                page_size: 1000,
                page_token: String::new(),
            }))
            .await
            .expect("a service may list contacts")
            .into_inner()
            .contact_ids
    }

    pub async fn update_status(
        &self,
        caller: &Caller,
        status: pb::Status,
    ) -> Result<pb::UserPresence, tonic::Status> {
        self.update_status_raw(caller, status as i32).await
    }

    pub async fn update_status_raw(
        &self,
        caller: &Caller,
        status: i32,
    ) -> Result<pb::UserPresence, tonic::Status> {
        let r = self
            .presence()
            .update_status(caller.request(pb::UpdateStatusRequest { status }))
            .await?;
        Ok(r.into_inner()
            .presence
            .expect("UpdateStatus returns the presence"))
    }

    pub async fn get_presence(
        &self,
        caller: &Caller,
        ids: &[u64],
    ) -> Result<Vec<pb::UserPresence>, tonic::Status> {
        let r = self
            .presence()
            .get_presence(caller.request(pb::GetPresenceRequest {
                user_ids: ids.to_vec(),
            }))
            .await?;
        Ok(r.into_inner().users)
    }

    /// One user's presence as `caller` sees it.
    pub async fn presence_of(&self, caller: &Caller, user: u64) -> pb::UserPresence {
        let mut users = self
            .get_presence(caller, &[user])
            .await
            .expect("GetPresence of one user works");
        assert_eq!(users.len(), 1, "one id asked, one answer");
        users.remove(0)
    }

    pub async fn set_privacy(
        &self,
        caller: &Caller,
        online: pb::Visibility,
        last_seen: pb::Visibility,
    ) -> Result<pb::PrivacySettings, tonic::Status> {
        let r = self
            .presence()
            .set_privacy(caller.request(pb::SetPrivacyRequest {
                settings: Some(pb::PrivacySettings {
                    online: online as i32,
                    last_seen: last_seen as i32,
                    approximate_last_seen: None,
                }),
            }))
            .await?;
        Ok(r.into_inner())
    }

    pub async fn stats(&self) -> pb::GetStatsResponse {
        self.presence()
            .get_stats(self.service_caller().request(pb::GetStatsRequest {}))
            .await
            .expect("a service may read the stats")
            .into_inner()
    }

    /// Polls GetStats until `ready` holds (a bounded wait for server-side state, such as a
    /// closed stream having been processed).
    pub async fn wait_for_stats(
        &self,
        what: &str,
        ready: impl Fn(&pb::GetStatsResponse) -> bool,
    ) -> pb::GetStatsResponse {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.stats().await;
            if ready(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; stats: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the server counts exactly `n` live device streams.
    pub async fn wait_for_connections(&self, n: u64) {
        self.wait_for_stats(&format!("{n} connections"), |s| s.connections == n)
            .await;
    }

    /// Polls the database until `ready` holds for the user's row (write-behind reached it).
    pub async fn wait_for_row(
        &self,
        user: u64,
        what: &str,
        ready: impl Fn(&PresenceRow) -> bool,
    ) -> PresenceRow {
        let store = self.store().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let row = store
                .load_presence(&[uid(user)])
                .await
                .expect("rows load")
                .into_iter()
                .next();
            if let Some(row) = row.filter(&ready) {
                return row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the row of user {user} to show {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A service caller that this server accepts: metadata in development mode, a signed
    /// service token in JWT mode.
    pub fn service_caller(&self) -> Caller {
        match self.settings.jwt_secret {
            Some(_) => bearer(&self.service_token()),
            None => service(),
        }
    }

    /// A user caller that this server accepts, like [`TestApp::service_caller`].
    pub fn user_caller(&self, id: u64) -> Caller {
        match self.settings.jwt_secret {
            Some(_) => bearer(&self.user_token(id)),
            None => user(id),
        }
    }

    /// Valid claims for this server (its issuer and audience when it expects them), an hour
    /// long.
    pub fn claims(&self, sub: &str) -> serde_json::Value {
        let mut claims = serde_json::json!({ "sub": sub, "exp": unix_now() + 3600 });
        if let Some(iss) = &self.settings.jwt_issuer {
            claims["iss"] = iss.as_str().into();
        }
        if let Some(aud) = &self.settings.jwt_audience {
            claims["aud"] = aud.as_str().into();
        }
        claims
    }

    /// A valid user token for this server.
    pub fn user_token(&self, id: u64) -> String {
        sign(&self.claims(&id.to_string()), Algorithm::HS256, SECRET)
    }

    /// A valid service token for this server.
    pub fn service_token(&self) -> String {
        let mut claims = self.claims(SERVICE);
        claims["role"] = "service".into();
        sign(&claims, Algorithm::HS256, SECRET)
    }

    /// Connects a device; panics if the server refuses.
    pub async fn device(&self, caller: &Caller) -> Device {
        Device::connect(self, caller, "phone")
            .await
            .unwrap_or_else(|s| panic!("{caller:?} can connect a device: {s:?}"))
    }

    /// Opens a WatchContacts stream; panics if the server refuses.
    pub async fn watcher(&self, caller: &Caller, ids: &[u64]) -> Watcher {
        Watcher::open(self, caller, ids)
            .await
            .unwrap_or_else(|s| panic!("{caller:?} can watch {ids:?}: {s:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens, signed by the tests themselves
// ---------------------------------------------------------------------------------------------

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// Signs `claims` with `alg` and `secret`.
pub fn sign(claims: &serde_json::Value, alg: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("test claims sign")
}

/// base64url without padding, as JWT segments are encoded.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

fn pairs_of(pairs: &[(u64, u64)]) -> Vec<pb::ContactPair> {
    pairs
        .iter()
        .map(|&(user_id, contact_id)| pb::ContactPair {
            user_id,
            contact_id,
        })
        .collect()
}

/// What a user presence says, in one comparable tuple: (status, last_seen ms, version).
pub fn seen(p: &pb::UserPresence) -> (pb::Status, Option<i64>, u64) {
    (p.status(), last_seen(p), p.version)
}

/// The answer for a user who was never seen (or is hidden entirely).
pub fn never_seen(id: u64) -> pb::UserPresence {
    pb::UserPresence {
        user_id: id,
        status: pb::Status::Offline as i32,
        ..Default::default()
    }
}

pub fn find(list: &[pb::UserPresence], id: u64) -> pb::UserPresence {
    list.iter()
        .find(|p| p.user_id == id)
        .cloned()
        .unwrap_or_else(|| panic!("user {id} is in {list:?}"))
}

// ---------------------------------------------------------------------------------------------
// Streams (the clients themselves are in tests/common/streams.rs)
// ---------------------------------------------------------------------------------------------

/// Opens Authenticate and sends `first` before anything is read; returns the server's
/// response (an error when the server refuses the stream up front) and the sender.
pub async fn open_stream(
    app: &TestApp,
    caller: &Caller,
    first: Vec<pb::ClientMessage>,
) -> (
    Result<tonic::Streaming<pb::ServerMessage>, tonic::Status>,
    mpsc::Sender<pb::ClientMessage>,
) {
    open_stream_on(app.connection().await, caller, first).await
}

impl Device {
    /// Opens a device stream labelled `label` on a new connection to `app`.
    pub async fn connect(
        app: &TestApp,
        caller: &Caller,
        label: &str,
    ) -> Result<Device, tonic::Status> {
        Self::connect_on(app.connection().await, caller, label).await
    }

    /// Opens a device stream on a given connection (for example one with a small
    /// flow-control window).
    pub async fn connect_on(
        channel: Channel,
        caller: &Caller,
        label: &str,
    ) -> Result<Device, tonic::Status> {
        Device::open(channel, caller, label, WAIT).await
    }
}

impl Watcher {
    /// Opens a WatchContacts stream on a new connection to `app`.
    pub async fn open(
        app: &TestApp,
        caller: &Caller,
        ids: &[u64],
    ) -> Result<Watcher, tonic::Status> {
        Self::open_on(app.connection().await, caller, ids).await
    }
}
