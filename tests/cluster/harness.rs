//! The processes of the cluster tests: Redis (the machine's, shared under a key prefix per
//! test, or one the test owns so it can stop it) and `presence serve` nodes joined into one
//! cluster through it. Everything a test starts is killed when it is dropped, and the test's
//! keys are deleted, even when the test fails.
use std::collections::HashMap;
use std::net::SocketAddr;

use crate::clients::free_port;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

#[path = "../common/mysql_db.rs"]
mod mysql_db;
#[path = "../common/process.rs"]
mod process;
pub use mysql_db::MySqlDatabase;
use process::ServerProcess;
use tonic::transport::{Channel, Endpoint};

/// How long a test waits for something it expects (an update, a welcome, an answer).
pub const WAIT: Duration = Duration::from_secs(5);

/// The node lease of every test node, in seconds: small, so a dead node is noticed quickly.
pub const LEASE_TTL_S: u64 = 2;

/// The machine's Redis, unless `PRESENCE_TEST_REDIS_URL` names another (`.ci/run` sets it).
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The cluster tests measure detection and convergence times on a 2-core machine, with three
/// server processes each: they take turns, so one test's nodes do not slow another's down.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds the machine for one test; see [`EXCLUSIVE`].
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

/// A missing Redis fails the test, saying how to run one or to leave the Redis tests out: a
/// test that did not run must never count as passed (built with `PRESENCE_TEST_REDIS=off`,
/// see build.rs, libtest lists them as ignored instead).
pub fn unavailable(what: &str) -> ! {
    panic!(
        "{what}. The cluster tests need Redis: start one (`redis-server --daemonize yes --port \
         6379 --save \"\" --appendonly no`) or set PRESENCE_TEST_REDIS_URL; to leave them out, \
         build the tests with PRESENCE_TEST_REDIS=off (they are then listed as ignored)"
    )
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

fn redis_connection(url: &str) -> redis::RedisResult<redis::Connection> {
    let conn = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

fn ping(url: &str) -> redis::RedisResult<()> {
    let mut conn = redis_connection(url)?;
    redis::cmd("PING").query::<String>(&mut conn).map(|_| ())
}

/// The shared Redis the tests use under their own key prefix; fails the test when it does not
/// answer.
pub fn shared_redis() -> String {
    let url = std::env::var("PRESENCE_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into());
    match ping(&url) {
        Ok(()) => url,
        Err(e) => unavailable(&format!(
            "no Redis answers at {url} ({e}); start one or set PRESENCE_TEST_REDIS_URL"
        )),
    }
}

/// A key prefix no other test or run uses: every key and channel of a test's nodes lives
/// under it.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!(
        "ptest-{}-{}-{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A `redis-server` of the test's own, on a free port, with nothing persisted: it can be
/// stopped and restarted (empty) without touching the machine's Redis.
pub struct OwnRedis {
    /// Kept across a restart: the nodes reconnect to the same address.
    port: u16,
    /// None while stopped.
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one; fails the test when `redis-server` cannot run.
    pub async fn start() -> OwnRedis {
        for _ in 0..3 {
            let mut redis = OwnRedis {
                port: free_port(),
                child: None,
            };
            match redis.spawn() {
                Err(e) => unavailable(&format!("redis-server does not start ({e})")),
                Ok(()) if redis.wait_ready(WAIT).await => return redis,
                // Someone took the port between our probe and redis-server's bind: try another.
                Ok(()) => redis.stop(),
            }
        }
        panic!("redis-server did not come up on any of three free ports")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls PING until it answers; false if the process exited or `within` passed.
    async fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if ping(&self.url()).is_ok() {
                return true;
            }
            if let Some(child) = &mut self.child
                && !matches!(child.try_wait(), Ok(None))
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// kill -9: the nodes lose Redis at once, and everything it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty; waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart only a stopped redis-server");
        self.spawn()
            .expect("redis-server started once, so it starts again");
        assert!(
            self.wait_ready(WAIT).await,
            "redis-server did not come back on port {} within {WAIT:?}",
            self.port
        );
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// One `presence serve` node of a cluster.
pub struct Node {
    /// "A", "B"…: names the node in messages.
    pub name: String,
    /// The process, killed (and reaped) on drop.
    process: ServerProcess,
    /// Where it listens: the port it picked, read from its `listening on` line.
    pub addr: SocketAddr,
    /// One HTTP/2 connection, shared by every client of this node in a test.
    pub channel: Channel,
}

impl Node {
    /// kill -9: no clean shutdown, no deregistration; only the lease can tell.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// SIGSTOP: the process freezes (a long stall), its sockets stay open.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// SIGCONT: the frozen process runs again.
    pub fn resume(&self) {
        self.process.resume();
    }

    /// The node's id in the cluster (a new one per process), from its start-up log line.
    pub async fn cluster_id(&self) -> String {
        let started = Instant::now();
        loop {
            let log = self.log();
            if let Some(id) = log
                .lines()
                .find(|l| l.contains("cluster mode"))
                .and_then(|l| l.split("node=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
            {
                return id.to_string();
            }
            assert!(
                started.elapsed() < WAIT,
                "node {} logged no cluster id within {WAIT:?}; log:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything the process wrote on stderr (its logs), shown when a test fails.
    pub fn log(&self) -> String {
        self.process.stderr()
    }
}

/// Where a cluster's nodes keep their rows: one database for all of them, as operators run it.
pub enum Database {
    /// One SQLite file every node opens (the default suite).
    Sqlite(TempDir),
    /// One MySQL database of the test's own (dropped with it).
    MySql(MySqlDatabase),
}

impl Database {
    /// A fresh shared SQLite file.
    pub fn sqlite() -> Database {
        Database::Sqlite(tempfile::tempdir().expect("a temporary directory for the database"))
    }

    /// A fresh MySQL database on `PRESENCE_TEST_MYSQL_URL`.
    pub async fn mysql() -> Database {
        Database::MySql(MySqlDatabase::create(mysql_db::admin_url()).await)
    }

    pub fn url(&self) -> String {
        match self {
            Database::Sqlite(dir) => {
                format!("sqlite://{}", dir.path().join("cluster.db").display())
            }
            Database::MySql(db) => db.url(),
        }
    }
}

/// Nodes sharing one Redis under one key prefix, and one database.
pub struct Cluster {
    /// The Redis every node shares.
    pub redis_url: String,
    /// Every key and channel of this cluster starts with it; deleted on drop.
    pub prefix: String,
    /// The database every node shares, kept across a node's restart.
    pub database: Database,
    pub nodes: Vec<Node>,
    /// Extra environment of every node (after the defaults).
    env: Vec<(String, String)>,
}

const NAMES: [&str; 4] = ["A", "B", "C", "D"];

impl Cluster {
    /// `count` nodes on `redis_url`, each started and listening.
    pub async fn start(redis_url: &str, count: usize) -> Cluster {
        Self::start_with(redis_url, count, &[]).await
    }

    /// Like [`Cluster::start`], with extra environment for every node.
    pub async fn start_with(redis_url: &str, count: usize, env: &[(&str, &str)]) -> Cluster {
        Self::start_on(Database::sqlite(), redis_url, count, env).await
    }

    /// `count` nodes on `redis_url` and `database`.
    pub async fn start_on(
        database: Database,
        redis_url: &str,
        count: usize,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cluster = Cluster {
            redis_url: redis_url.to_string(),
            prefix: unique_prefix(),
            database,
            nodes: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for i in 0..count {
            let node = cluster.spawn(i, &[]).await;
            cluster.nodes.push(node);
        }
        cluster
    }

    /// Replaces node `i` (which must be dead) with a new process on the same database.
    pub async fn restart(&mut self, i: usize) {
        let node = self.spawn(i, &[]).await;
        self.nodes[i] = node;
    }

    /// Starts node `i` with `extra` environment on top of the cluster's.
    pub async fn spawn(&self, i: usize, extra: &[(&str, &str)]) -> Node {
        let name = NAMES[i].to_string();
        let ttl = LEASE_TTL_S.to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("REDIS_URL", &self.redis_url),
            ("PRESENCE_REDIS_PREFIX", &self.prefix),
            ("PRESENCE_NODE_LEASE_TTL_S", &ttl),
            ("PRESENCE_OFFLINE_GRACE_MS", "0"),
            // The fan-out test changes one status 20 times in a few seconds.
            ("PRESENCE_RATE_STATUS_PER_MIN", "1000"),
            ("PRESENCE_SHUTDOWN_DEADLINE_S", "2"),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env.extend(extra.iter().copied());
        let process = ServerProcess::serve(&self.database.url(), &env).await;
        let addr = process.addr();
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect_timeout(WAIT)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("node {name} at {addr} accepts connections: {e}"));
        Node {
            name,
            process,
            addr,
            channel,
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    /// The hash of a user's shared presence (see src/cluster/redis.rs for the key scheme).
    fn user_key(&self, user: u64) -> String {
        format!(
            "{}:u:{{{}}}:{user}",
            self.prefix,
            user % presence::cluster::redis::GROUPS
        )
    }

    /// A control key (registrations, leases, claims): one slot, tagged by the prefix.
    fn control_key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.prefix)
    }

    /// The node registrations in Redis (`{prefix}:nodes`): node id → its last lease renewal.
    /// The tests read Redis only to know when something has happened inside the cluster that
    /// no RPC shows (a registration claimed, a device count gone), never to decide an outcome.
    pub fn registrations(&self) -> HashMap<String, i64> {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        redis::cmd("HGETALL")
            .arg(self.control_key("nodes"))
            .query(&mut conn)
            .expect("HGETALL of the registrations")
    }

    /// How many nodes hold devices of `user`, per Redis (`d:NODE` fields of its hash).
    pub fn device_nodes(&self, user: u64) -> usize {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        let hash: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.user_key(user))
            .query(&mut conn)
            .expect("HGETALL of a user's shared presence");
        // d:NODE = "seq,total,active,…": a node whose devices left keeps its entry at 0.
        hash.iter()
            .filter(|(k, v)| {
                k.starts_with("d:")
                    && v.split(',').nth(1).and_then(|t| t.parse::<u32>().ok()) > Some(0)
            })
            .count()
    }

    /// Who holds the claim on dead node `node` (a cluster id), if anyone.
    pub fn claimer_of(&self, node: &str) -> Option<String> {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        let claim: Option<String> = redis::cmd("HGET")
            .arg(self.control_key("claims"))
            .arg(node)
            .query(&mut conn)
            .expect("HGET of a claim");
        claim.and_then(|c| c.split(',').next().map(str::to_string))
    }

    /// How many users node `node` (a cluster id) still holds devices of or owes a row for.
    pub fn node_users(&self, node: &str) -> usize {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        redis::cmd("SCARD")
            .arg(format!("{}:nu:{{{node}}}", self.prefix))
            .query(&mut conn)
            .expect("SCARD of a node's users")
    }

    /// How many of these users Redis still holds a shared presence of.
    pub fn users_known(&self, users: &[u64]) -> usize {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        let mut pipe = redis::pipe();
        for &u in users {
            pipe.cmd("EXISTS").arg(self.user_key(u));
        }
        let found: Vec<u32> = pipe.query(&mut conn).expect("EXISTS of many users");
        found.into_iter().filter(|&f| f == 1).count()
    }

    /// Whether Redis holds a shared presence of `user` (its hash exists).
    pub fn user_known(&self, user: u64) -> bool {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        redis::cmd("EXISTS")
            .arg(self.user_key(user))
            .query(&mut conn)
            .expect("EXISTS of a user's shared presence")
    }

    /// How many connections listen to the change channel: one per node that is subscribed.
    pub fn subscribers(&self) -> usize {
        let mut conn = redis_connection(&self.redis_url).expect("the test's Redis answers");
        let (_, count): (String, usize) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.key("changes"))
            .query(&mut conn)
            .expect("PUBSUB NUMSUB of the change channel");
        count
    }

    /// Polls `what` until it holds, at most `within`; returns how long it took.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        mut ready: impl FnMut(&Cluster) -> bool,
    ) -> Duration {
        let started = Instant::now();
        while !ready(self) {
            assert!(
                started.elapsed() < within,
                "timed out after {within:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    /// Deletes every key under the test's prefix (best effort: Redis may be gone).
    fn delete_keys(&self) {
        let Ok(mut conn) = redis_connection(&self.redis_url) else {
            return;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(200).collect();
                eprintln!(
                    "--- node {} ({}), last lines of its log ---",
                    node.name, node.addr
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Kill first, so no node writes keys again after they are deleted.
        self.nodes.clear();
        self.delete_keys();
    }
}
