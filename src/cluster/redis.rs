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
//! - Changes are published on `P:changes`.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::ConnectionManager;

use super::{
    Backplane, BackplaneError, Claim, Message, Renewal, Result, Transition, Wire, contact_message,
    parse_message,
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
    pub url: String,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// A node silent this long is declared dead.
    pub lease_ttl: Duration,
    /// How long a user's hash outlives their last device (a safety net: the node that wrote
    /// the user's row releases it sooner).
    pub idle_ttl: Duration,
}

/// The backplane on one Redis server.
pub struct RedisBackplane {
    node: NodeId,
    config: RedisConfig,
    conn: ConnectionManager,
    client: redis::Client,
    transition: redis::Script,
    claim: redis::Script,
    take_over: redis::Script,
    release: redis::Script,
    /// False while Redis does not answer.
    up: AtomicBool,
    /// Set after the first registration: from then on a missing registration means this node
    /// was declared dead (or Redis lost everything).
    registered_once: AtomicBool,
    /// A call failed since the last renewal: the next successful one reports `lost`.
    failed: AtomicBool,
}

fn redis_error(e: redis::RedisError) -> BackplaneError {
    BackplaneError(e.to_string())
}

impl RedisBackplane {
    /// Connects (failing at once if Redis does not answer: the caller retries).
    pub async fn connect(node: NodeId, config: RedisConfig) -> Result<RedisBackplane> {
        let client = redis::Client::open(config.url.as_str()).map_err(redis_error)?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(redis_error)?;
        Ok(RedisBackplane {
            node,
            config,
            conn,
            client,
            transition: redis::Script::new(TRANSITION),
            claim: redis::Script::new(CLAIM),
            take_over: redis::Script::new(TAKE_OVER),
            release: redis::Script::new(RELEASE),
            up: AtomicBool::new(true),
            registered_once: AtomicBool::new(false),
            failed: AtomicBool::new(false),
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

    fn channel(&self) -> String {
        format!("{}:changes", self.config.prefix)
    }

    /// The script call of one transition.
    fn transition_cmd(&self, t: &Transition) -> redis::Cmd {
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
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.transition.get_hash())
            .arg(1)
            .arg(self.user_key(t.user))
            .arg(name)
            .arg(&*self.node)
            .arg(t.at)
            .arg(t.user.get())
            .arg("PUBLISH")
            .arg(self.channel())
            .arg(self.config.idle_ttl.as_millis() as u64)
            .arg(&seed[..])
            .arg(&args[..])
            .arg(
                t.seed()
                    .node(&self.node)
                    .map(|n| format!("{},{}", n.seq, n.devices.encode()))
                    .unwrap_or_default(),
            );
        cmd
    }

    /// Runs a pipeline whose scripts Redis may not know yet (after a restart): on NOSCRIPT the
    /// scripts are loaded and the pipeline runs again (every step is idempotent).
    async fn run_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        scripts: &[&redis::Script],
    ) -> redis::RedisResult<T> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for s in scripts {
                    s.load_async(&mut conn).await?;
                }
                pipe.query_async(&mut conn).await
            }
            other => other,
        }
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
        let mine = self.node_users_key(&self.node);
        let mut pipe = redis::pipe();
        for t in &batch {
            // Added before the transition: a reaper of this node finds every user whose state
            // it may have changed and not written yet.
            pipe.cmd("SADD").arg(&mine).arg(t.user.get()).ignore();
            pipe.add_command(self.transition_cmd(t));
        }
        let replies: Vec<(String, String)> =
            self.note(self.run_scripts(&pipe, &[&self.transition]).await)?;
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
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HGETALL").arg(self.user_key(*u));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, String>> = self.note(pipe.query_async(&mut conn).await)?;
        Ok(users
            .iter()
            .zip(hashes)
            .filter_map(|(u, h)| wire_of_hash(*u, h)?.to_presence())
            .collect())
    }

    async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) -> Result<()> {
        let mut pipe = redis::pipe();
        for &(a, b) in pairs {
            pipe.cmd("PUBLISH")
                .arg(self.channel())
                .arg(contact_message(added, a, b))
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.note(pipe.query_async::<()>(&mut conn).await)
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Message>> {
        let mut pubsub = self.note(self.client.get_async_pubsub().await)?;
        self.note(pubsub.subscribe(self.channel()).await)?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|m| async move {
                let payload: String = m.get_payload().ok()?;
                parse_message(&payload)
            })
            .boxed())
    }

    async fn renew(&self) -> Result<Renewal> {
        let now = now_millis();
        let nodes = self.control_key("nodes");
        let mut conn = self.conn.clone();
        let (registered,): (bool,) = self.note(
            redis::pipe()
                .hexists(&nodes, &*self.node)
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
        })
    }

    async fn claim(&self) -> Result<Vec<Claim>> {
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
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
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let ids: Vec<u64> = users.iter().map(|u| u.get()).collect();
        self.note(
            redis::cmd("SREM")
                .arg(self.node_users_key(dead))
                .arg(ids)
                .query_async::<()>(&mut conn)
                .await,
        )
    }

    async fn finish_claim(&self, dead: &NodeId) -> Result<()> {
        let mut conn = self.conn.clone();
        self.note(
            redis::pipe()
                .del(self.node_users_key(dead))
                .ignore()
                .hdel(self.control_key("claims"), &**dead)
                .ignore()
                .query_async::<()>(&mut conn)
                .await,
        )
    }

    async fn settled(&self, users: &[UserId]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let ids: Vec<u64> = users.iter().map(|u| u.get()).collect();
        self.note(
            redis::cmd("SREM")
                .arg(self.node_users_key(&self.node))
                .arg(ids)
                .query_async::<()>(&mut conn)
                .await,
        )
    }

    async fn release(&self, users: &[(UserId, u64)]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        // One call per user: on a Redis Cluster the users' hashes live in different slots.
        for &(user, version) in users {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.release.get_hash())
                .arg(1)
                .arg(self.user_key(user))
                .arg(version);
            pipe.add_command(cmd).ignore();
        }
        self.note(self.run_scripts::<()>(&pipe, &[&self.release]).await)
    }

    async fn deregister(&self) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<()> = redis::pipe()
            .hdel(self.control_key("nodes"), &*self.node)
            .del(self.lease_key(&self.node))
            .del(self.node_users_key(&self.node))
            .query_async(&mut conn)
            .await;
    }
}
