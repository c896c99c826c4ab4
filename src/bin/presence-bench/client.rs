//! How the bench reaches the server: the loopback-only target, the pool of HTTP/2 connections
//! that users are multiplexed over, and the identity put on each call (development-mode
//! metadata, or HS256 JWTs minted with `--token-secret`).
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use presence::auth::{SERVICE_HEADER, USER_HEADER};
use presence::pb::{self, presence_client::PresenceClient};

/// The name the bench calls itself by when it acts as a service.
const SERVICE_NAME: &str = "bench";

/// How long a minted token lives: longer than any bounded run.
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);

/// Per-stream HTTP/2 receive window. Loopback has a tiny bandwidth-delay product, so the
/// adaptive (BDP-probing) window buys nothing but pings; a fixed window larger than any burst a
/// device receives (its K contacts' updates) keeps the server from ever stalling on credit.
const STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window: ~100 streams share it.
const CONNECTION_WINDOW: u32 = 16 << 20;

/// Resolves `--target` and refuses anything but a loopback address: the bench generates heavy
/// load and must never point at another machine.
pub fn loopback_target(target: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("--target {target:?} is not HOST:PORT"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("--target {target:?} resolves to no address");
    };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "--target {target:?} resolves to {bad}, which is not a loopback address: presence-bench only loads a server on this machine (127.0.0.0/8 or ::1)"
        );
    }
    Ok(first)
}

/// `--target` may list several nodes of a cluster, comma-separated; each must be loopback.
pub fn loopback_targets(targets: &str) -> anyhow::Result<Vec<SocketAddr>> {
    targets
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(loopback_target)
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                bail!("--target names no address")
            } else {
                Ok(v)
            }
        })
}

/// Who the bench is on each call.
#[derive(Clone)]
pub enum Auth {
    /// Development mode: `x-presence-user-id` / `x-presence-service` metadata.
    Development,
    /// HS256 JWTs signed with this secret; the service token is minted once.
    Jwt {
        secret: String,
        service_token: MetadataValue<tonic::metadata::Ascii>,
    },
}

impl Auth {
    pub fn new(token_secret: Option<String>) -> anyhow::Result<Auth> {
        let Some(secret) = token_secret else {
            return Ok(Auth::Development);
        };
        let token = presence::auth::mint(&secret, SERVICE_NAME, true, TOKEN_TTL, None, None)
            .map_err(anyhow::Error::msg)
            .context("minting the service token")?;
        Ok(Auth::Jwt {
            service_token: bearer(&token)?,
            secret,
        })
    }

    /// Makes the call on behalf of `user`.
    pub fn as_user<T>(&self, req: &mut Request<T>, user: u64) -> anyhow::Result<()> {
        match self {
            Auth::Development => {
                req.metadata_mut()
                    .insert(USER_HEADER, MetadataValue::from(user));
            }
            Auth::Jwt { secret, .. } => {
                let token =
                    presence::auth::mint(secret, &user.to_string(), false, TOKEN_TTL, None, None)
                        .map_err(anyhow::Error::msg)
                        .context("minting a user token")?;
                req.metadata_mut().insert("authorization", bearer(&token)?);
            }
        }
        Ok(())
    }

    /// The metadata of a call on behalf of `user`, as HTTP/2 header fields (for
    /// [`crate::h2raw`]).
    pub fn user_headers(&self, user: u64) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut req = Request::new(());
        self.as_user(&mut req, user)?;
        Ok(req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect())
    }

    /// Makes the call as the `bench` service.
    pub fn as_service<T>(&self, req: &mut Request<T>) {
        match self {
            Auth::Development => {
                req.metadata_mut()
                    .insert(SERVICE_HEADER, MetadataValue::from_static(SERVICE_NAME));
            }
            Auth::Jwt { service_token, .. } => {
                req.metadata_mut()
                    .insert("authorization", service_token.clone());
            }
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Auth::Development => "development metadata",
            Auth::Jwt { .. } => "HS256 JWT",
        }
    }
}

fn bearer(token: &str) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}")
        .parse()
        .context("a JWT is always valid ASCII metadata")
}

/// HTTP/2 connections to the server; user `u` always rides connection `(u - 1) % len`, as an
/// edge would multiplex its users.
#[derive(Clone)]
pub struct Pool {
    channels: Vec<Channel>,
}

impl Pool {
    /// Opens `n` connections (each a tonic `Channel` is one HTTP/2 connection), connection `i`
    /// to node `i % nodes` when several are given (a cluster behind a balancer).
    pub async fn connect(addrs: &[SocketAddr], n: usize) -> anyhow::Result<Pool> {
        let mut channels = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let addr = addrs[i % addrs.len()];
            let ch = Self::endpoint(addr)?
                .connect()
                .await
                .with_context(|| format!("connecting HTTP/2 connection {} to {addr}", i + 1))?;
            channels.push(ch);
        }
        Ok(Pool { channels })
    }

    fn endpoint(addr: SocketAddr) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))
            .context("a socket address is a valid URI authority")?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_adaptive_window(false)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20)))
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn for_user(&self, user: u64) -> Channel {
        self.channels[(user.saturating_sub(1) % self.channels.len() as u64) as usize].clone()
    }

    pub fn presence(&self, user: u64) -> PresenceClient<Channel> {
        PresenceClient::new(self.for_user(user))
    }
}

/// The server's GetStats counters.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ServerStats {
    pub online_users: u64,
    pub connections: u64,
    pub watchers: u64,
    pub changes: u64,
    pub deliveries: u64,
    pub coalesced: u64,
    pub db_statements: u64,
    pub db_rows: u64,
    /// Deliveries not sent because the receiving device was in the background.
    pub passive_skipped: u64,
}

impl ServerStats {
    pub async fn read(pool: &Pool, auth: &Auth) -> anyhow::Result<ServerStats> {
        let mut req = Request::new(pb::GetStatsRequest {});
        auth.as_service(&mut req);
        req.set_timeout(Duration::from_secs(10));
        let s = pool
            .presence(1)
            .get_stats(req)
            .await
            .context("GetStats as the bench service")?
            .into_inner();
        Ok(ServerStats {
            online_users: s.online_users,
            connections: s.connections,
            watchers: s.watchers,
            changes: s.changes,
            deliveries: s.deliveries,
            coalesced: s.coalesced,
            db_statements: s.db_statements,
            db_rows: s.db_rows,
            passive_skipped: s.passive_skipped,
        })
    }

    /// Counters grown since `before`; gauges (online users, connections, watchers) as now.
    pub fn since(&self, before: &ServerStats) -> ServerStats {
        ServerStats {
            online_users: self.online_users,
            connections: self.connections,
            watchers: self.watchers,
            changes: self.changes.saturating_sub(before.changes),
            deliveries: self.deliveries.saturating_sub(before.deliveries),
            coalesced: self.coalesced.saturating_sub(before.coalesced),
            db_statements: self.db_statements.saturating_sub(before.db_statements),
            db_rows: self.db_rows.saturating_sub(before.db_rows),
            passive_skipped: self.passive_skipped.saturating_sub(before.passive_skipped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        assert!(loopback_target("127.0.0.1:50051").is_ok());
        assert!(loopback_target("[::1]:50051").is_ok());
        assert!(
            loopback_target("127.9.9.9:1").is_ok(),
            "all of 127/8 is loopback"
        );
    }

    #[test]
    fn other_targets_are_refused() {
        for t in [
            "10.0.0.1:50051",
            "192.168.1.2:50051",
            "8.8.8.8:53",
            "0.0.0.0:50051",
        ] {
            let err = loopback_target(t).expect_err("the bench loads only this machine");
            assert!(err.to_string().contains("loopback"), "{t}: {err}");
        }
    }
}
