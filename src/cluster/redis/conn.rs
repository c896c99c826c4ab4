//! Connections to the backplane's Redis, whatever its shape: commands go through [`Commands`],
//! which hands out a connection that follows the deployment (one instance: a reconnecting
//! manager; a Redis Cluster: a slot-routing cluster connection; Sentinel: the current master,
//! found again after a switch). Pipelines whose commands live in different slots run through
//! [`Commands::grouped`], one pipeline per slot.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::target::{RedisTarget, slot};

/// How long connecting, and one reply, may take before the call fails (and the node falls
/// back to its own memory until Redis answers again).
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);

/// How long a write waits for its replicas (Redis `WAIT`), in milliseconds.
const WAIT_MS: u64 = 100;

/// After a write reached fewer replicas than asked, writes to that shard stop waiting for this
/// long (a master whose replica is gone, or was promoted, must not make every write wait).
const UNREPLICATED_FOR: Duration = Duration::from_secs(10);

/// The command side of the backplane.
pub(super) struct Commands {
    kind: Kind,
    /// Replicas a write waits for (Redis `WAIT`, at most [`WAIT_MS`]), 0: none.
    wait_replicas: u32,
    /// Slots (of one instance: 0) whose master lately had fewer replicas than that: until when
    /// their writes do not wait.
    unreplicated: Mutex<BTreeMap<u16, std::time::Instant>>,
}

enum Kind {
    Single(ConnectionManager),
    Cluster {
        client: redis::cluster::ClusterClient,
        conn: Mutex<ClusterConnection>,
        /// The lease's own connection: a shard that hangs (a frozen master) stalls a cluster
        /// connection's other requests too, and the lease must not wait behind it.
        control: Mutex<ClusterConnection>,
    },
    Sentinel(Sentinel),
}

/// One connection, of whichever kind, for one call.
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

pub(super) fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
}

pub(super) async fn bounded<T>(
    what: &str,
    f: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(TIMEOUT * 2, f)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what}: no answer within {:?}", TIMEOUT * 2),
            )))
        })
}

impl Commands {
    /// Connects (failing if Redis does not answer: the caller retries).
    pub(super) async fn connect(target: &RedisTarget, wait_replicas: u32) -> RedisResult<Commands> {
        let kind = match target {
            RedisTarget::Single(url) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1);
                let client = redis::Client::open(url.as_str())?;
                Kind::Single(client.get_connection_manager_with_config(config).await?)
            }
            RedisTarget::Cluster(seeds) => {
                // Short: a frozen master must not hold a request (and the device or user
                // waiting on it) for long; the node decides locally and reconciles later.
                let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(TIMEOUT / 2)
                    .response_timeout(TIMEOUT / 2)
                    .overall_response_timeout(Some(TIMEOUT + TIMEOUT / 2))
                    .retries(5)
                    .min_retry_wait(100)
                    .max_retry_wait(1000)
                    .build()?;
                let conn = bounded("cluster connect", client.get_async_connection()).await?;
                let control = bounded("cluster connect", client.get_async_connection()).await?;
                Kind::Cluster {
                    client,
                    conn: Mutex::new(conn),
                    control: Mutex::new(control),
                }
            }
            RedisTarget::Sentinel { .. } => {
                let sentinel = Sentinel::new(target.clone());
                sentinel.connection().await?;
                Kind::Sentinel(sentinel)
            }
        };
        Ok(Commands {
            kind,
            wait_replicas,
            unreplicated: Mutex::new(BTreeMap::new()),
        })
    }

    /// A connection for one call.
    pub(super) async fn conn(&self) -> RedisResult<Conn> {
        Ok(match &self.kind {
            Kind::Single(c) => Conn::Single(c.clone()),
            Kind::Cluster { conn, .. } => Conn::Cluster(
                conn.lock()
                    .expect("cluster connection lock poisoned")
                    .clone(),
            ),
            Kind::Sentinel(s) => Conn::Sentinel(s.connection().await?),
        })
    }

    /// A connection for the lease (renewals): on a Redis Cluster one of its own.
    pub(super) async fn control_conn(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Cluster { control, .. } => Ok(Conn::Cluster(
                control
                    .lock()
                    .expect("cluster connection lock poisoned")
                    .clone(),
            )),
            _ => self.conn().await,
        }
    }

    /// After a failed call: a Sentinel connection that failed this way is dropped, so the next
    /// call finds the master again.
    pub(super) fn failed(&self, e: &RedisError) {
        if let Kind::Sentinel(s) = &self.kind
            && (e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly))
        {
            s.forget();
        }
    }

    /// The masters changed: on a Redis Cluster a new connection, with a fresh slot map (the
    /// old one may keep retrying a master that froze and was replaced); with Sentinel, the
    /// master is looked up again (the old one may still take writes it will lose).
    pub(super) async fn refresh(&self) -> RedisResult<()> {
        match &self.kind {
            Kind::Cluster {
                client,
                conn,
                control,
            } => {
                let fresh = bounded("cluster reconnect", client.get_async_connection()).await?;
                *conn.lock().expect("cluster connection lock poisoned") = fresh;
                let fresh = bounded("cluster reconnect", client.get_async_connection()).await?;
                *control.lock().expect("cluster connection lock poisoned") = fresh;
            }
            // The next call asks the sentinels again.
            Kind::Sentinel(s) => s.forget(),
            Kind::Single(_) => {}
        }
        Ok(())
    }

    fn unreplicated(&self, slot: u16) -> bool {
        let mut map = self
            .unreplicated
            .lock()
            .expect("unreplicated lock poisoned");
        match map.get(&slot) {
            Some(until) if *until > std::time::Instant::now() => true,
            Some(_) => {
                map.remove(&slot);
                false
            }
            None => false,
        }
    }

    fn mark_unreplicated(&self, slot: u16, acked: i64) {
        let now = std::time::Instant::now();
        let mut map = self
            .unreplicated
            .lock()
            .expect("unreplicated lock poisoned");
        // One warning for a wave of them (every slot of a master says the same).
        let quiet = map.values().any(|until| *until > now);
        map.insert(slot, now + UNREPLICATED_FOR);
        if !quiet {
            tracing::warn!(
                slot,
                acked,
                wanted = self.wait_replicas,
                "a Redis write reached fewer replicas than PRESENCE_REDIS_WAIT_REPLICAS within {WAIT_MS} ms: until its master has replicas again, a failover there may lose recent changes (the nodes reconcile them); writes there stop waiting for {UNREPLICATED_FOR:?} at a time"
            );
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// Runs commands that may live in different slots, keyed by the key that routes each: on
    /// one instance as one pipeline, on a Redis Cluster as one pipeline per slot, all at once.
    /// Each pipeline ends with `WAIT` when replicas must have the writes. Replies come back in
    /// the order of `cmds`.
    pub(super) async fn grouped(
        &self,
        cmds: Vec<(String, Cmd)>,
        write: bool,
    ) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let groups: Vec<(u16, Vec<(usize, Cmd)>)> = if self.is_cluster() {
            let mut by_slot: BTreeMap<u16, Vec<(usize, Cmd)>> = BTreeMap::new();
            for (i, (key, cmd)) in cmds.into_iter().enumerate() {
                by_slot
                    .entry(slot(key.as_bytes()))
                    .or_default()
                    .push((i, cmd));
            }
            by_slot.into_iter().collect()
        } else {
            let all = cmds.into_iter().enumerate().map(|(i, (_, c))| (i, c));
            vec![(0, all.collect())]
        };
        let total = groups.iter().map(|(_, g)| g.len()).sum();
        let runs = groups
            .into_iter()
            .map(|(slot, group)| self.run_group(slot, group, write));
        let mut out = vec![Value::Nil; total];
        for run in join_all(runs).await {
            for (i, v) in run? {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// One pipeline of [`Commands::grouped`]: commands of one slot, with their indexes.
    async fn run_group(
        &self,
        slot: u16,
        group: Vec<(usize, Cmd)>,
        write: bool,
    ) -> RedisResult<Vec<(usize, Value)>> {
        let mut pipe = redis::pipe();
        for (_, cmd) in &group {
            pipe.add_command(cmd.clone());
        }
        let wait = write && self.wait_replicas > 0 && !self.unreplicated(slot);
        if wait {
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(WAIT_MS);
        }
        let mut conn = self.conn().await?;
        let mut values: Vec<Value> = pipe.query_async(&mut conn).await?;
        if wait {
            let acked = match values.pop() {
                Some(Value::Int(n)) => n,
                _ => 0,
            };
            if acked < i64::from(self.wait_replicas) {
                // Done on a master that may not keep it (a stale master about to be demoted,
                // or one whose replica is gone): the caller treats it as failed, decides
                // locally and reconciles later. Writes to this shard stop waiting for a while,
                // and a Sentinel connection looks for the master again.
                self.mark_unreplicated(slot, acked);
                if let Kind::Sentinel(s) = &self.kind {
                    s.forget();
                }
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "a write reached fewer replicas than PRESENCE_REDIS_WAIT_REPLICAS",
                    format!("{acked} of {} within {WAIT_MS} ms", self.wait_replicas),
                )));
            }
        }
        Ok(group.into_iter().map(|(i, _)| i).zip(values).collect())
    }
}

/// The master a set of sentinels points at, connected to, and found again after a failure.
struct Sentinel {
    target: RedisTarget,
    current: Mutex<Option<MultiplexedConnection>>,
    /// One lookup at a time.
    resolving: tokio::sync::Mutex<()>,
}

impl Sentinel {
    fn new(target: RedisTarget) -> Sentinel {
        Sentinel {
            target,
            current: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    fn forget(&self) {
        *self.current.lock().expect("sentinel lock poisoned") = None;
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.current.lock().expect("sentinel lock poisoned").clone() {
            return Ok(c);
        }
        let _one = self.resolving.lock().await;
        if let Some(c) = self.current.lock().expect("sentinel lock poisoned").clone() {
            return Ok(c);
        }
        let (client, _) = master_client(&self.target).await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await?;
        *self.current.lock().expect("sentinel lock poisoned") = Some(conn.clone());
        Ok(conn)
    }
}

/// The master's address as the first answering sentinel gives it.
pub(super) async fn sentinel_master_addr(target: &RedisTarget) -> RedisResult<(String, u16)> {
    let RedisTarget::Sentinel {
        sentinels, master, ..
    } = target
    else {
        unreachable!("sentinel_master_addr is for Sentinel targets");
    };
    let mut last_error = None;
    for sentinel in sentinels {
        let lookup = async {
            let client = redis::Client::open(sentinel.as_str())?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async(&mut conn)
                .await?;
            addr.ok_or_else(|| {
                RedisError::from((
                    redis::ErrorKind::Client,
                    "the sentinel does not know the master",
                    master.clone(),
                ))
            })
        };
        match bounded("sentinel lookup", lookup).await {
            Ok(addr) => return Ok(addr),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| RedisError::from((redis::ErrorKind::Client, "no sentinel listed"))))
}

/// A client of the master the sentinels point at, checked to be a master (a sentinel may
/// still name the old one for a moment after a switch).
pub(super) async fn master_client(
    target: &RedisTarget,
) -> RedisResult<(redis::Client, (String, u16))> {
    let RedisTarget::Sentinel { auth, db, .. } = target else {
        unreachable!("master_client is for Sentinel targets");
    };
    let (host, port) = sentinel_master_addr(target).await?;
    let userinfo = match auth {
        Some((user, pass)) => format!("{}:{pass}@", user.as_deref().unwrap_or("")),
        None => String::new(),
    };
    let client = redis::Client::open(format!("redis://{userinfo}{host}:{port}/{db}"))?;
    let check = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => Ok(()),
            _ => Err(RedisError::from((
                redis::ErrorKind::Client,
                "the address the sentinels gave is not a master (yet)",
                format!("{host}:{port}"),
            ))),
        }
    };
    bounded("master check", check).await?;
    Ok((client, (host, port)))
}
