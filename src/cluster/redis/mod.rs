//! The [`Backplane`] on Redis.
//!
//! Keys, under a prefix P (several clusters, or test runs, share one Redis):
//! - `P:u:{G}:ID` — user ID's presence, a hash (see `transition.lua`); G = ID mod [`GROUPS`] is
//!   a hash tag, so on a Redis Cluster a user's hash and that user's script live in one slot and
//!   the users spread over all shards;
//! - `P:nu:{NODE}` — the users NODE holds devices of or owes a row for (a set: a user is added
//!   before each of NODE's transitions, removed once NODE wrote their row and holds no device
//!   of theirs), what a reaper walks when NODE dies: it drops NODE's devices and writes the
//!   rows NODE did not;
//! - `{P}:nodes` (registrations: node → last renewal), `{P}:lease:NODE` (expires when NODE
//!   stops renewing), `{P}:claims` (dead node → "claimer,last renewal"): the control keys,
//!   one slot.
//! - Changes are published on `P:changes` (one instance, Sentinel) or, on a Redis Cluster, on
//!   `P:changes:{G}`, in the slot of group G's users: see [`pubsub`].
//!
//! Where Redis is (one instance, a Redis Cluster, Sentinel) is [`target`]; [`conn`] hands out
//! connections that follow it.
mod conn;
mod pubsub;
pub mod target;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use redis::{Cmd, Value};

use conn::Commands;
pub use target::RedisTarget;

use super::{
    Backplane, BackplaneError, Claim, Message, Renewal, Result, Transition, Wire, contact_message,
};
use crate::domain::{Millis, UserId, now_millis};
use crate::rules::{NodeId, Op, Outcome, Presence};

/// Hash-tag groups of user keys.
pub const GROUPS: u64 = 64;

/// The transition script: the status rules, run in Redis.
const TRANSITION: &str = include_str!("transition.lua");

/// Claims an expired node: exactly one caller gets it. KEYS: nodes, the node's lease, claims.
/// ARGV: node, claimer. Returns the node's last renewal, or nil.
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local last = redis.call('HGET', KEYS[1], ARGV[1])
if not last then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ',' .. last)
return last
"#;

/// Takes over a claim whose claimer died. KEYS: claims, the claimer's lease. ARGV: node, the
/// claim as read, new claimer. Returns the dead node's last renewal, or nil.
const TAKE_OVER: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return false end
local last = string.match(ARGV[2], ',(.*)$')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ',' .. last)
return last
"#;

/// Drops a claim on the calling node itself whose claimer died: the node is alive, and restores
/// its devices itself. KEYS: claims, the claimer's lease. ARGV: node, the claim as read.
const UNCLAIM_SELF: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#;

/// Forgets users written to the store: only those still at the written version, without
/// devices or grace. KEYS: the user hashes. ARGV: their versions.
const RELEASE: &str = r#"
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'v', 'g')
  if f[1] == ARGV[i] and (f[2] == false or f[2] == '') then
    local live = false
    local all = redis.call('HKEYS', key)
    for _, k in ipairs(all) do
      if string.sub(k, 1, 2) == 'd:' then
        local d = redis.call('HGET', key, k)
        local total = string.match(d, '^[^,]*,([^,]*)')
        if tonumber(total) > 0 then live = true end
      end
    end
    if not live then redis.call('DEL', key) end
  end
end
return 0
"#;

/// Settings of the Redis backplane.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: RedisTarget,
    /// Replicas that must have each write before the node acts on it (Redis `WAIT`, at most
    /// 100 ms): a failover then loses no transition a node acknowledged. 0: do not wait.
    pub wait_replicas: u32,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// A node silent this long is declared dead.
    pub lease_ttl: Duration,
    /// How long a user's hash outlives their last device (a safety net: the node that wrote
    /// the user's row releases it sooner).
    pub idle_ttl: Duration,
}

/// The backplane on Redis.
pub struct RedisBackplane {
    node: NodeId,
    config: RedisConfig,
    commands: Arc<Commands>,
    transition: redis::Script,
    claim: redis::Script,
    take_over: redis::Script,
    unclaim_self: redis::Script,
    release: redis::Script,
    /// False while Redis does not answer.
    up: AtomicBool,
    /// Set after the first registration: from then on a missing registration means this node
    /// was declared dead (or Redis lost everything).
    registered_once: AtomicBool,
    /// A call failed (or the subscription ended) since the last renewal: the next successful
    /// one reports `lost`.
    failed: Arc<AtomicBool>,
}

fn redis_error(e: redis::RedisError) -> BackplaneError {
    BackplaneError(e.to_string())
}

impl RedisBackplane {
    /// Connects (failing at once if Redis does not answer: the caller retries).
    pub async fn connect(node: NodeId, config: RedisConfig) -> Result<RedisBackplane> {
        let commands = Commands::connect(&config.target, config.wait_replicas)
            .await
            .map_err(redis_error)?;
        Ok(RedisBackplane {
            node,
            config,
            commands: Arc::new(commands),
            transition: redis::Script::new(TRANSITION),
            claim: redis::Script::new(CLAIM),
            take_over: redis::Script::new(TAKE_OVER),
            unclaim_self: redis::Script::new(UNCLAIM_SELF),
            release: redis::Script::new(RELEASE),
            up: AtomicBool::new(true),
            registered_once: AtomicBool::new(false),
            failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Records the outcome of a call: a failure marks Redis down until a call succeeds.
    fn note<T>(&self, result: redis::RedisResult<T>) -> Result<T> {
        match result {
            Ok(v) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis is reachable again");
                }
                Ok(v)
            }
            Err(e) => {
                self.commands.failed(&e);
                self.failed.store(true, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis is unreachable: serving presence from this node's memory");
                }
                Err(redis_error(e))
            }
        }
    }

    fn user_key(&self, user: UserId) -> String {
        format!(
            "{}:u:{{{}}}:{}",
            self.config.prefix,
            user.get() % GROUPS,
            user
        )
    }

    fn node_users_key(&self, node: &str) -> String {
        format!("{}:nu:{{{}}}", self.config.prefix, node)
    }

    fn control_key(&self, name: &str) -> String {
        format!("{{{}}}:{}", self.config.prefix, name)
    }

    fn lease_key(&self, node: &str) -> String {
        self.control_key(&format!("lease:{node}"))
    }

    /// How a change of `user` is published: the command and the channel.
    fn publication(&self, user: UserId) -> (&'static str, String) {
        if self.commands.is_cluster() {
            (
                "SPUBLISH",
                pubsub::group_channel(&self.config.prefix, user.get() % GROUPS),
            )
        } else {
            ("PUBLISH", pubsub::channel(&self.config.prefix))
        }
    }

    /// A script call: by hash, or (`eval`) with its body, which also caches it in Redis.
    fn script_cmd(script: &redis::Script, body: &str, eval: bool) -> Cmd {
        let mut cmd;
        if eval {
            cmd = redis::cmd("EVAL");
            cmd.arg(body);
        } else {
            cmd = redis::cmd("EVALSHA");
            cmd.arg(script.get_hash());
        }
        cmd
    }

    /// The script call of one transition.
    fn transition_cmd(&self, t: &Transition, eval: bool) -> Cmd {
        let seed = Wire::scalars(t.seed());
        let (name, args): (&str, [String; 3]) = match &t.op {
            Op::Devices {
                seq,
                devices,
                grace,
            } => (
                "devices",
                [
                    seq.to_string(),
                    devices.encode(),
                    grace.map(|g| g.to_string()).unwrap_or_default(),
                ],
            ),
            Op::Expire { token } => ("expire", [token.to_string(), String::new(), String::new()]),
            Op::Status(s) => ("status", [s.as_str().into(), String::new(), String::new()]),
            Op::Privacy(p) => (
                "privacy",
                [
                    p.online.as_str().into(),
                    p.last_seen.as_str().into(),
                    if p.approximate_last_seen { "1" } else { "0" }.into(),
                ],
            ),
            Op::Custom(c) => (
                "custom",
                match c.as_deref() {
                    None => Default::default(),
                    Some(c) => [
                        c.text.clone(),
                        c.emoji.clone(),
                        c.expires_at.map(|t| t.to_string()).unwrap_or_default(),
                    ],
                },
            ),
            Op::ExpireCustom { expires_at } => (
                "expire_custom",
                [expires_at.to_string(), String::new(), String::new()],
            ),
            Op::DropNode { node, at } => (
                "drop_node",
                [node.to_string(), at.to_string(), String::new()],
            ),
            Op::Touch => ("touch", Default::default()),
            Op::Reconcile(own) => (
                "reconcile",
                [
                    own.node(&self.node)
                        .map(|n| format!("{},{}", n.seq, n.devices.encode()))
                        .unwrap_or_default(),
                    own.facets_key(),
                    String::new(),
                ],
            ),
        };
        let (publish, channel) = self.publication(t.user);
        let mut cmd = Self::script_cmd(&self.transition, TRANSITION, eval);
        cmd.arg(1)
            .arg(self.user_key(t.user))
            .arg(name)
            .arg(&*self.node)
            .arg(t.at)
            .arg(t.user.get())
            .arg(publish)
            .arg(channel)
            .arg(self.config.idle_ttl.as_millis() as u64)
            .arg(&seed[..])
            .arg(&args[..])
            .arg(
                t.seed()
                    .node(&self.node)
                    .map(|n| format!("{},{}", n.seq, n.devices.encode()))
                    .unwrap_or_default(),
            )
            .arg(t.seed().chosen_at);
        cmd
    }

    /// Runs script calls (built by hash, or with their bodies when `eval`) grouped by slot;
    /// when Redis does not know a script (a restart, a promoted replica), they run again with
    /// their bodies. Every step is idempotent.
    async fn run_scripts(
        &self,
        build: impl Fn(bool) -> Vec<(String, Cmd)>,
    ) -> redis::RedisResult<Vec<Value>> {
        match self.commands.grouped(build(false), true).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.commands.grouped(build(true), true).await
            }
            other => other,
        }
    }

    /// Takes users out of a node's set (a reaper done with them, or this node settled them).
    async fn remove_node_users(&self, node: &str, users: &[UserId]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let ids: Vec<u64> = users.iter().map(|u| u.get()).collect();
        self.note(
            redis::cmd("SREM")
                .arg(self.node_users_key(node))
                .arg(ids)
                .query_async::<()>(&mut conn)
                .await,
        )
    }

    async fn conn(&self) -> Result<conn::Conn> {
        let conn = self.commands.conn().await;
        self.note(conn)
    }
}

/// A user hash as read with HGETALL, as the wire form.
fn wire_of_hash(user: UserId, hash: HashMap<String, String>) -> Option<Wire> {
    if hash.is_empty() {
        return None;
    }
    let get = |k: &str| hash.get(k).cloned().unwrap_or_default();
    let d = hash
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("d:").map(|n| (n.to_string(), v.clone())))
        .collect();
    Some(Wire {
        k: "p".into(),
        u: user.to_string(),
        c: get("c"),
        ls: get("ls"),
        lo: get("lo"),
        v: get("v"),
        ov: get("ov"),
        po: get("po"),
        pl: get("pl"),
        pa: get("pa"),
        ct: get("ct"),
        ce: get("ce"),
        cx: get("cx"),
        inactive: get("is"),
        g: get("g"),
        ca: get("ca"),
        d,
    })
}

#[async_trait]
impl Backplane for RedisBackplane {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    async fn transition(&self, batch: Vec<Transition>) -> Result<Vec<Option<(Presence, Outcome)>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Added before the transitions: a reaper of this node finds every user whose state it
        // may have changed and not written yet.
        let mine = self.node_users_key(&self.node);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(&mine)
            .arg(batch.iter().map(|t| t.user.get()).collect::<Vec<_>>());
        let cluster = self.commands.is_cluster();
        if cluster {
            // In another slot than the users': its own round trip, first.
            let mut conn = self.conn().await?;
            self.note(sadd.query_async::<()>(&mut conn).await)?;
        }
        let replies = self.note(
            self.run_scripts(|eval| {
                let mut cmds = Vec::with_capacity(batch.len() + 1);
                if !cluster {
                    cmds.push((mine.clone(), sadd.clone()));
                }
                for t in &batch {
                    cmds.push((self.user_key(t.user), self.transition_cmd(t, eval)));
                }
                cmds
            })
            .await,
        )?;
        let replies: Vec<(String, String)> = replies
            .into_iter()
            .skip(usize::from(!cluster))
            .map(redis::from_redis_value)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| BackplaneError(format!("unexpected reply from Redis: {e}")))?;
        batch
            .iter()
            .zip(replies)
            .map(|(t, (flags, msg))| {
                if msg.is_empty() {
                    return Ok(None);
                }
                let wire: Wire = serde_json::from_str(&msg)
                    .map_err(|e| BackplaneError(format!("unexpected transition result: {e}")))?;
                let (_, presence) = wire.to_presence().ok_or_else(|| {
                    BackplaneError(format!("malformed presence of user {}: {msg}", t.user))
                })?;
                let flag = |i: usize| flags.as_bytes().get(i) == Some(&b'1');
                Ok(Some((
                    presence,
                    Outcome {
                        changed: flag(0),
                        publish: flag(1),
                    },
                )))
            })
            .collect()
    }

    async fn load(&self, users: &[UserId]) -> Result<Vec<(UserId, Presence)>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = users
            .iter()
            .map(|u| {
                let key = self.user_key(*u);
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        let hashes: Vec<HashMap<String, String>> = self
            .note(self.commands.grouped(cmds, false).await)?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| BackplaneError(format!("unexpected reply from Redis: {e}")))?;
        Ok(users
            .iter()
            .zip(hashes)
            .filter_map(|(u, h)| wire_of_hash(*u, h)?.to_presence())
            .collect())
    }

    async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) -> Result<()> {
        let cmds = pairs
            .iter()
            .map(|&(a, b)| {
                let (publish, channel) = self.publication(a);
                let mut cmd = redis::cmd(publish);
                cmd.arg(&channel).arg(contact_message(added, a, b));
                (channel, cmd)
            })
            .collect();
        self.note(self.commands.grouped(cmds, false).await)
            .map(|_| ())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Message>> {
        self.note(
            pubsub::subscribe(
                &self.config.target,
                self.commands.clone(),
                &self.config.prefix,
                self.failed.clone(),
            )
            .await,
        )
    }

    async fn renew(&self) -> Result<Renewal> {
        let now = now_millis();
        let nodes = self.control_key("nodes");
        let conn = self.commands.control_conn().await;
        let mut conn = self.note(conn)?;
        let (registered, claimed): (bool, bool) = self.note(
            redis::pipe()
                .hexists(&nodes, &*self.node)
                .hexists(self.control_key("claims"), &*self.node)
                .cmd("SET")
                .arg(self.lease_key(&self.node))
                .arg(now)
                .arg("PX")
                .arg(self.config.lease_ttl.as_millis() as u64)
                .ignore()
                .hset(&nodes, &*self.node, now)
                .ignore()
                .query_async(&mut conn)
                .await,
        )?;
        let first = !self.registered_once.swap(true, Ordering::Relaxed);
        let failed_since = self.failed.swap(false, Ordering::Relaxed);
        Ok(Renewal {
            lost: !first && (!registered || failed_since),
            claimed,
        })
    }

    async fn claim(&self) -> Result<Vec<Claim>> {
        let mut conn = self.conn().await?;
        let nodes_key = self.control_key("nodes");
        let claims_key = self.control_key("claims");
        let (nodes, claims): (HashMap<String, i64>, HashMap<String, String>) = self.note(
            redis::pipe()
                .hgetall(&nodes_key)
                .hgetall(&claims_key)
                .query_async(&mut conn)
                .await,
        )?;
        let mut out = Vec::new();
        for node in nodes.keys().filter(|n| n.as_str() != &*self.node) {
            let last: Option<i64> = self.note(
                self.claim
                    .key(&nodes_key)
                    .key(self.lease_key(node))
                    .key(&claims_key)
                    .arg(node)
                    .arg(&*self.node)
                    .invoke_async(&mut conn)
                    .await,
            )?;
            if let Some(last) = last {
                out.push(Claim {
                    node: Arc::from(node.as_str()),
                    last_renewal: last,
                });
            }
        }
        for (node, claim) in claims {
            let Some((claimer, last)) = claim.split_once(',') else {
                continue;
            };
            let last: Millis = last.parse().unwrap_or(0);
            if node == *self.node {
                // A claim on this very node whose claimer died: this node is alive and
                // restores its own devices once the claim is gone.
                let dropped: i64 = self.note(
                    self.unclaim_self
                        .key(&claims_key)
                        .key(self.lease_key(claimer))
                        .arg(&node)
                        .arg(&claim)
                        .invoke_async(&mut conn)
                        .await,
                )?;
                if dropped == 1 {
                    tracing::warn!(%claimer, "the node dropping this node's devices died; this node restores them itself");
                }
                continue;
            }
            if claimer == &*self.node {
                out.push(Claim {
                    node: Arc::from(node.as_str()),
                    last_renewal: last,
                });
                continue;
            }
            let taken: Option<String> = self.note(
                self.take_over
                    .key(&claims_key)
                    .key(self.lease_key(claimer))
                    .arg(&node)
                    .arg(&claim)
                    .arg(&*self.node)
                    .invoke_async(&mut conn)
                    .await,
            )?;
            if taken.is_some() {
                tracing::warn!(%node, %claimer, "the node reaping a dead node died too; taking its claim over");
                out.push(Claim {
                    node: Arc::from(node.as_str()),
                    last_renewal: last,
                });
            }
        }
        Ok(out)
    }

    async fn claimed_users(&self, dead: &NodeId, max: usize) -> Result<Vec<UserId>> {
        let mut conn = self.conn().await?;
        let members: Vec<u64> = self.note(
            redis::cmd("SRANDMEMBER")
                .arg(self.node_users_key(dead))
                .arg(max)
                .query_async(&mut conn)
                .await,
        )?;
        Ok(members
            .into_iter()
            .filter_map(|u| UserId::parse(u).ok())
            .collect())
    }

    async fn finish_users(&self, dead: &NodeId, users: &[UserId]) -> Result<()> {
        self.remove_node_users(dead, users).await
    }

    async fn finish_claim(&self, dead: &NodeId) -> Result<()> {
        let mut conn = self.conn().await?;
        self.note(
            redis::cmd("DEL")
                .arg(self.node_users_key(dead))
                .query_async::<()>(&mut conn)
                .await,
        )?;
        // The claim goes last: until then another node may finish this one.
        self.note(
            redis::cmd("HDEL")
                .arg(self.control_key("claims"))
                .arg(&**dead)
                .query_async::<()>(&mut conn)
                .await,
        )
    }

    async fn settled(&self, users: &[UserId]) -> Result<()> {
        self.remove_node_users(&self.node, users).await
    }

    async fn release(&self, users: &[(UserId, u64)]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        // One call per user: on a Redis Cluster the users' hashes live in different slots.
        let replies = self.run_scripts(|eval| {
            users
                .iter()
                .map(|&(user, version)| {
                    let key = self.user_key(user);
                    let mut cmd = Self::script_cmd(&self.release, RELEASE, eval);
                    cmd.arg(1).arg(&key).arg(version);
                    (key, cmd)
                })
                .collect()
        });
        self.note(replies.await).map(|_| ())
    }

    async fn deregister(&self) {
        let Ok(mut conn) = self.commands.conn().await else {
            return;
        };
        let _: redis::RedisResult<()> = redis::pipe()
            .hdel(self.control_key("nodes"), &*self.node)
            .del(self.lease_key(&self.node))
            .query_async(&mut conn)
            .await;
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(self.node_users_key(&self.node))
            .query_async(&mut conn)
            .await;
    }
}
