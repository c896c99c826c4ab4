//! The server assembly: store, engine, gRPC services, health, reflection, and the shutdown
//! sequence. `main` and the tests start the server through [`Application`] exactly alike.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tower::Layer;

use crate::auth::Verifier;
use crate::cluster::Backplane;
use crate::cluster::redis::{RedisBackplane, RedisConfig};
use crate::engine::Engine;
use crate::grpc::limits::RateLimits;
use crate::grpc::{
    ContactsService, DeviceLayer, IdentityLayer, ObserveLayer, PresenceService, RelayService,
};
use crate::pb;
use crate::rules::NodeId;
use crate::settings::{Checked, SecretUrl, Settings, SettingsError};
use crate::store::{self, Store};

/// Health service names we report on; "" is the whole server.
const HEALTH_NAMES: [&str; 4] = [
    "",
    "presence.v1.Presence",
    "presence.v1.Contacts",
    "presence.v1.RelayService",
];

/// A built server: the store is migrated, the engine is running and the port is bound.
pub struct Application {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Engine,
    verifier: Arc<Verifier>,
    settings: Settings,
}

/// Opens the store named by the URL and migrates it, retrying while the database is
/// unreachable (saying so each time) instead of crash-looping silently.
pub async fn open_store(url: &SecretUrl) -> anyhow::Result<Arc<dyn Store>> {
    open_store_within(url, None).await
}

/// [`open_store`], giving up after `patience` (one-shot commands such as `migrate` must end).
pub async fn open_store_within(
    url: &SecretUrl,
    patience: Option<Duration>,
) -> anyhow::Result<Arc<dyn Store>> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let store = store::connect(url.expose()).await?;
            store.migrate().await?;
            Ok::<_, store::StoreError>(store)
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(store::StoreError::UnsupportedUrl(_)) => {
                return Err(SettingsError::new(
                    "DATABASE_URL",
                    format!("{url} is not supported: use sqlite://FILE or mysql://…"),
                )
                .into());
            }
            Err(e @ store::StoreError::Migrate(_)) => {
                return Err(e).context("database migration failed");
            }
            Err(e) if patience.is_some_and(|p| started.elapsed() + delay > p) => {
                return Err(e).context(format!(
                    "the database did not answer within {:?}",
                    patience.unwrap_or_default()
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "database unavailable at start-up; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Connects to Redis, retrying (and saying so) while it does not answer.
async fn connect_redis(node: NodeId, config: RedisConfig) -> Arc<dyn Backplane> {
    let mut delay = Duration::from_millis(250);
    loop {
        match RedisBackplane::connect(node.clone(), config.clone()).await {
            Ok(b) => return Arc::new(b),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "redis unavailable at start-up; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A fresh id for this process: its record in the store, its lease in the backplane.
fn new_node_id() -> NodeId {
    Arc::from(format!("{:016x}", rand::random::<u64>()).as_str())
}

impl Application {
    /// Validates the settings, opens and migrates the store, starts the engine and binds the
    /// listener. Refuses development mode on a non-loopback address.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        // Settings are checked before waiting on the database, so a typo fails at once.
        settings.check()?;
        let store = open_store(&settings.database_url).await?;
        Self::build_with_store(settings, store).await
    }

    /// Like [`Application::build`] on a store the caller opened and migrated (tests wrap the
    /// real store to inject faults).
    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Application> {
        let Checked { verifier, redis } = settings.check()?;
        if verifier.is_development() {
            tracing::warn!(
                "DEVELOPMENT MODE: no JWT key configured; callers are trusted to name themselves with x-presence-user-id / x-presence-service metadata. Never expose this."
            );
        }
        let node = new_node_id();
        let backplane = match redis {
            Some(config) => Some(connect_redis(node.clone(), config).await),
            None => None,
        };
        let engine = Engine::start(store, settings.engine(), node, backplane).await?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {} (PRESENCE_LISTEN)", settings.listen))?;
        let addr = listener.local_addr()?;
        Ok(Application {
            listener,
            addr,
            engine,
            verifier: Arc::new(verifier),
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves until `shutdown` resolves, then: health NOT_SERVING, every stream ended with
    /// UNAVAILABLE, the server drained within the deadline (streams still open after it are
    /// cut), changes flushed, the clean stop recorded.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Application {
            listener,
            addr,
            engine,
            verifier,
            settings,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        // Components: NOT_SERVING while the database (or, in cluster mode, Redis) fails.
        for name in [
            crate::telemetry::STORE_HEALTH,
            crate::telemetry::CLUSTER_HEALTH,
        ] {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let rates = Arc::new(RateLimits::new(settings.rates()));
        let shrink = {
            let rates = rates.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    rates.shrink();
                }
            })
        };
        let sampler = tokio::spawn(crate::telemetry::sample_engine(
            engine.clone(),
            health.clone(),
        ));
        let max_message = settings.max_message_bytes as usize;
        let identified = IdentityLayer::new(verifier.clone());
        let relay = identified.layer(
            pb::relay_service_server::RelayServiceServer::new(RelayService::new(
                engine.clone(),
                settings.request_limits(),
                rates.clone(),
                verifier.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        );
        let presence_service =
            PresenceService::new(engine.clone(), settings.request_limits(), rates);
        let devices = DeviceLayer::new(presence_service.clone(), verifier.clone(), max_message);
        let presence = identified.layer(
            pb::presence_server::PresenceServer::new(presence_service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        let contacts = identified.layer(
            pb::contacts_server::ContactsServer::new(ContactsService::new(
                engine.clone(),
                settings.request_limits(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        );
        let (keepalive_interval, keepalive_timeout) = settings.keepalive();
        let connections = Connections::default();
        let incoming = {
            let connections = connections.clone();
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(keepalive_interval))
                .map(move |conn| conn.map(|io| connections.track(io)))
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = Server::builder()
            .http2_keepalive_interval(Some(keepalive_interval))
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .max_concurrent_streams(settings.max_streams_per_conn)
            .tcp_nodelay(true)
            .layer(ObserveLayer)
            .layer(devices)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(presence)
            .add_service(contacts)
            .add_service(relay)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        // Boxed rather than pinned on the stack, so that dropping it below really cuts the
        // connections still open after the deadline.
        let mut serve = Box::pin(serve);
        tracing::info!(%addr, "presence server listening");

        tokio::select! {
            result = &mut serve => {
                shrink.abort();
                sampler.abort();
                engine.finish_shutdown().await;
                return result.context("the gRPC server failed");
            }
            _ = shutdown => {}
        }
        tracing::info!(deadline = ?settings.shutdown_deadline(), "shutting down");
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        engine.begin_shutdown();
        let _ = stop_tx.send(());
        let deadline = tokio::time::Instant::now() + settings.shutdown_deadline();
        match tokio::time::timeout_at(deadline, &mut serve).await {
            Ok(result) => result.context("the gRPC server failed while draining")?,
            Err(_) => {
                tracing::warn!("shutdown deadline reached; cutting the connections still open");
                connections.cut_all();
            }
        }
        drop(serve);
        shrink.abort();
        sampler.abort();
        // The flush gets its own short allowance even when draining used the whole deadline,
        // so a stuck client costs at most the deadline plus this.
        let flush_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(2));
        if tokio::time::timeout_at(flush_deadline, engine.finish_shutdown())
            .await
            .is_err()
        {
            tracing::error!(
                "could not flush every change before the deadline; they are lost with this process"
            );
        }
        Ok(())
    }
}

/// The server's open TCP connections, so that those still open at the shutdown deadline can be
/// cut: tonic runs each connection in a task of its own, which dropping the server future does
/// not stop.
#[derive(Clone, Default)]
struct Connections {
    open: Arc<std::sync::Mutex<std::collections::HashMap<u64, std::os::fd::RawFd>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Connections {
    fn track(&self, io: tokio::net::TcpStream) -> TrackedConn {
        use std::os::fd::AsRawFd;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open
            .lock()
            .expect("connections lock poisoned")
            .insert(id, io.as_raw_fd());
        TrackedConn {
            _guard: ConnGuard {
                id,
                open: self.open.clone(),
            },
            io,
        }
    }

    /// Shuts every open connection down in both directions; their tasks then end.
    fn cut_all(&self) {
        let open = self.open.lock().expect("connections lock poisoned");
        for fd in open.values() {
            // SAFETY: the fd is open: a connection leaves the map (under this lock) before its
            // socket is closed, see the field order of TrackedConn.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
    }
}

/// A connection known to [`Connections`]. Field order matters: the guard (which removes the
/// entry) drops before the socket closes, so a cut never reaches a reused descriptor.
struct TrackedConn {
    _guard: ConnGuard,
    io: tokio::net::TcpStream,
}

struct ConnGuard {
    id: u64,
    open: Arc<std::sync::Mutex<std::collections::HashMap<u64, std::os::fd::RawFd>>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl tonic::transport::server::Connected for TrackedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for TrackedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TrackedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
