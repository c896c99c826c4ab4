//! Cluster mode: several nodes behind a load balancer behave as one, through Redis.
//!
//! Redis holds the authoritative presence of every user whose devices are connected anywhere
//! (hash `{prefix}:u:{id}`: chosen status, last_seen, version, privacy, pending grace, and one
//! device count per node). Every change is one Lua script run: it applies the event (a device
//! connects on node A, a status changes on node B…), decides the effective status and the next
//! version atomically, and publishes the new state once on `{prefix}:changes`. Each node applies
//! what it hears to its local watchers (dropping anything not newer than what it has), so
//! versions increase strictly across nodes and a change costs one round trip and one publish,
//! however many receivers.
//!
//! Liveness: each node holds a lease (`{prefix}:lease:{node}`, TTL) and a registration in
//! `{prefix}:nodes` (its last renewal). A node that finds another's lease expired claims it with
//! an atomic HDEL (so exactly one survivor acts) and drops that node's devices, taking their users
//! offline at the dead node's last renewal. A node that wakes up to find itself claimed (it was
//! paused past its TTL) registers again and restores its live devices.
//!
//! While Redis is unreachable a node keeps serving from memory with local rules; when Redis
//! returns it restores its devices and statuses there and every node converges.
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::domain::{Millis, Privacy, Status, UserId, Visibility, now_millis};
use crate::store::PresenceRow;

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis_url: String,
    /// Prefix of every key and channel, so several clusters (or test runs) share one Redis.
    pub prefix: String,
    /// Lease lifetime: a node silent for this long is declared dead.
    pub lease_ttl: Duration,
}

/// One event applied to a user's shared presence.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Connect,
    /// A device left; with a grace token, the user stays online until `Expire` of that token.
    Disconnect {
        grace_token: Option<u64>,
    },
    Expire {
        grace_token: u64,
    },
    Status(Status),
    Privacy(Privacy),
    /// Removes every device of `node`, offline at `at` (no grace).
    DropNode {
        node: String,
        at: Millis,
    },
    /// Sets this node's device count, and takes the local state when it is newer (re-sync
    /// after a Redis outage or a lost lease).
    Restore {
        devices: u32,
    },
}

/// A user's shared presence as the script returns and publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedState {
    pub user: UserId,
    pub effective: Status,
    pub chosen: Status,
    pub connected: bool,
    pub last_seen: Option<Millis>,
    pub last_offline: Option<Millis>,
    pub version: u64,
    pub offline_version: u64,
    pub privacy: Privacy,
}

/// What the change channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Presence(SharedState),
    ContactsAdded(UserId, UserId),
    ContactsRemoved(UserId, UserId),
}

pub(crate) struct Cluster {
    pub node: String,
    prefix: String,
    lease_ttl: Duration,
    conn: ConnectionManager,
    client: redis::Client,
    transition: redis::Script,
    claim: redis::Script,
    /// False while Redis does not answer: presence is then served with local rules.
    up: AtomicBool,
    /// Our last successful lease renewal.
    last_renewal: AtomicI64,
    /// Set after the first registration: from then on a missing registration means we were
    /// declared dead.
    registered_once: AtomicBool,
    /// Set when any Redis call failed: changes may have been applied with local rules, so the
    /// next successful renewal restores this node's state in Redis.
    needs_restore: AtomicBool,
}

/// The transition script. KEYS: user hash, this node's user set, the other node's user set (for
/// DropNode). ARGV: op, node, now, user id, channel, seed (c ls lo v ov po pl), arg1, arg2, and
/// this node's device count before the event (seeds the device count when Redis lost it).
const TRANSITION: &str = r#"
local h, nu = KEYS[1], KEYS[2]
local op, node, now, uid, chan = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local a1, a2 = ARGV[13], ARGV[14]
if redis.call('EXISTS', h) == 0 then
  redis.call('HSET', h, 'c', ARGV[6], 'ls', ARGV[7], 'lo', ARGV[8], 'v', ARGV[9], 'ov', ARGV[10],
    'po', ARGV[11], 'pl', ARGV[12], 'pt', '', 'ps', '', 'pn', '')
  -- This node's devices as they were before this event (Redis may have lost them).
  if tonumber(ARGV[15]) > 0 then
    redis.call('HSET', h, 'd:' .. node, ARGV[15])
    redis.call('SADD', nu, uid)
  end
end
local f = redis.call('HMGET', h, 'c', 'ls', 'lo', 'v', 'ov', 'po', 'pl', 'pt', 'ps', 'pn')
local c, ls, lo, v, ov, po, pl, pt, ps, pn = f[1], f[2], f[3], tonumber(f[4]), tonumber(f[5]), f[6], f[7], f[8], f[9], f[10]
local function total()
  local t, all = 0, redis.call('HGETALL', h)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'd:' then t = t + tonumber(all[i + 1]) end
  end
  return t
end
local function eff(tot)
  if tot > 0 or pt ~= '' then return c end
  return 'offline'
end
local before, bpo, bpl = eff(total()), po, pl
local at = now
local function setdev(n, count)
  if count > 0 then
    redis.call('HSET', h, 'd:' .. n, count)
    redis.call('SADD', nu, uid)
  else
    redis.call('HDEL', h, 'd:' .. n)
    redis.call('SREM', nu, uid)
  end
end
if op == 'connect' then
  setdev(node, tonumber(redis.call('HGET', h, 'd:' .. node) or '0') + 1)
  pt, ps, pn = '', '', ''
elseif op == 'disconnect' then
  setdev(node, tonumber(redis.call('HGET', h, 'd:' .. node) or '0') - 1)
  if total() == 0 and a1 ~= '' and pt == '' then pt, ps, pn = a1, tostring(now), node end
elseif op == 'expire' then
  if pt == a1 and pn == node then at = tonumber(ps); pt, ps, pn = '', '', '' end
elseif op == 'status' then
  c = a1
elseif op == 'privacy' then
  po, pl = a1, a2
elseif op == 'drop_node' then
  redis.call('HDEL', h, 'd:' .. a1)
  redis.call('SREM', KEYS[3], uid)
  at = tonumber(a2)
  if pn == a1 then
    if ps ~= '' and tonumber(ps) < at then at = tonumber(ps) end
    pt, ps, pn = '', '', ''
  end
elseif op == 'restore' then
  setdev(node, tonumber(a1))
  if tonumber(ARGV[9]) > v then
    c, po, pl, v = ARGV[6], ARGV[11], ARGV[12], tonumber(ARGV[9])
  end
end
local after = eff(total())
local changed = before ~= after or po ~= bpo or pl ~= bpl
if changed then
  v = v + 1
  if (before ~= 'offline') ~= (after ~= 'offline') then
    if ls == '' or tonumber(ls) < at then ls = string.format('%.0f', at) end
    if after == 'offline' then lo, ov = ls, v end
  end
end
redis.call('HSET', h, 'c', c, 'ls', ls, 'lo', lo, 'v', string.format('%.0f', v), 'ov',
  string.format('%.0f', ov), 'po', po, 'pl', pl, 'pt', pt, 'ps', ps, 'pn', pn)
local conn = 0
if total() > 0 then conn = 1 end
local msg = table.concat({'p', uid, after, c, conn, ls, lo, string.format('%.0f', v),
  string.format('%.0f', ov), po, pl}, '|')
if changed then redis.call('PUBLISH', chan, msg) end
return msg
"#;

/// Claims a dead node: exactly one caller gets its users.
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local last = redis.call('HGET', KEYS[1], ARGV[1])
if not last then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
local users = redis.call('SMEMBERS', KEYS[3])
table.insert(users, 1, last)
return users
"#;

impl Cluster {
    pub async fn connect(config: &ClusterConfig) -> redis::RedisResult<Cluster> {
        let client = redis::Client::open(config.redis_url.as_str())?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = client
            .get_connection_manager_with_config(manager_config)
            .await?;
        Ok(Cluster {
            node: format!("{:016x}", rand::random::<u64>()),
            prefix: config.prefix.clone(),
            lease_ttl: config.lease_ttl,
            conn,
            client,
            transition: redis::Script::new(TRANSITION),
            claim: redis::Script::new(CLAIM),
            up: AtomicBool::new(true),
            last_renewal: AtomicI64::new(now_millis()),
            registered_once: AtomicBool::new(false),
            needs_restore: AtomicBool::new(false),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        if !up {
            self.needs_restore.store(true, Ordering::Relaxed);
        }
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("redis is reachable again");
            } else {
                tracing::warn!("redis is unreachable: serving presence from this node's memory");
            }
        }
    }

    fn user_key(&self, user: UserId) -> String {
        format!("{}:u:{}", self.prefix, user)
    }

    fn node_users_key(&self, node: &str) -> String {
        format!("{}:nu:{}", self.prefix, node)
    }

    fn lease_key(&self, node: &str) -> String {
        format!("{}:lease:{}", self.prefix, node)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    pub fn channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    /// Applies one event to the user's shared presence (created from `seed` when Redis has none)
    /// and returns the result. Err marks Redis down.
    pub async fn transition(
        &self,
        user: UserId,
        op: &Op,
        seed: &PresenceRow,
        seed_offline: (Option<Millis>, u64),
        seed_devices: u32,
    ) -> redis::RedisResult<SharedState> {
        let (name, a1, a2, other_node) = match op {
            Op::Connect => ("connect", String::new(), String::new(), None),
            Op::Disconnect { grace_token } => (
                "disconnect",
                grace_token.map(|t| t.to_string()).unwrap_or_default(),
                String::new(),
                None,
            ),
            Op::Expire { grace_token } => ("expire", grace_token.to_string(), String::new(), None),
            Op::Status(s) => ("status", s.as_str().to_string(), String::new(), None),
            Op::Privacy(p) => (
                "privacy",
                p.online.as_str().to_string(),
                p.last_seen.as_str().to_string(),
                None,
            ),
            Op::DropNode { node, at } => ("drop_node", node.clone(), at.to_string(), Some(node)),
            Op::Restore { devices } => ("restore", devices.to_string(), String::new(), None),
        };
        let opt = |v: Option<Millis>| v.map(|t| t.to_string()).unwrap_or_default();
        let mut conn = self.conn.clone();
        let result: redis::RedisResult<String> = self
            .transition
            .key(self.user_key(user))
            .key(self.node_users_key(&self.node))
            .key(self.node_users_key(other_node.map_or(&self.node, |n| n)))
            .arg(name)
            .arg(&self.node)
            .arg(now_millis())
            .arg(user.get())
            .arg(self.channel())
            .arg(seed.chosen.as_str())
            .arg(opt(seed.last_seen))
            .arg(opt(seed_offline.0))
            .arg(seed.version)
            .arg(seed_offline.1)
            .arg(seed.privacy.online.as_str())
            .arg(seed.privacy.last_seen.as_str())
            .arg(a1)
            .arg(a2)
            .arg(seed_devices)
            .invoke_async(&mut conn)
            .await;
        match result {
            Ok(msg) => {
                self.set_up(true);
                match parse_message(&msg) {
                    Some(Message::Presence(s)) => Ok(s),
                    _ => Err(redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected transition result",
                        msg,
                    ))),
                }
            }
            Err(e) => {
                self.set_up(false);
                Err(e)
            }
        }
    }

    /// The shared presence of the given users that Redis has.
    pub async fn load(&self, users: &[UserId]) -> redis::RedisResult<Vec<SharedState>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HGETALL").arg(self.user_key(*u));
        }
        let mut conn = self.conn.clone();
        let maps: Vec<std::collections::HashMap<String, String>> =
            match pipe.query_async(&mut conn).await {
                Ok(m) => {
                    self.set_up(true);
                    m
                }
                Err(e) => {
                    self.set_up(false);
                    return Err(e);
                }
            };
        Ok(users
            .iter()
            .zip(maps)
            .filter_map(|(u, m)| state_from_hash(*u, &m))
            .collect())
    }

    /// Tells every node about a contact change (they update their caches and watches).
    pub async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) {
        let tag = if added { "c+" } else { "c-" };
        let mut pipe = redis::pipe();
        for (a, b) in pairs {
            pipe.cmd("PUBLISH")
                .arg(self.channel())
                .arg(format!("{tag}|{a}|{b}"))
                .ignore();
        }
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "could not publish contact changes to other nodes");
            self.set_up(false);
        }
    }

    /// Renews our lease. Returns Ok(true) when we had been declared dead (our registration was
    /// claimed) and must restore our devices.
    pub async fn renew(&self) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let now = now_millis();
        let ttl_ms = self.lease_ttl.as_millis() as u64;
        let (registered, _): (bool, ()) = redis::pipe()
            .hexists(self.nodes_key(), &self.node)
            .cmd("SET")
            .arg(self.lease_key(&self.node))
            .arg(now)
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await
            .inspect_err(|_| self.set_up(false))?;
        let _: () = conn
            .hset(self.nodes_key(), &self.node, now)
            .await
            .inspect_err(|_| self.set_up(false))?;
        self.set_up(true);
        self.last_renewal.store(now, Ordering::Relaxed);
        let first = !self.registered_once.swap(true, Ordering::Relaxed);
        let failed_since = self.needs_restore.swap(false, Ordering::Relaxed);
        Ok(!first && (!registered || failed_since))
    }

    /// Nodes whose lease expired, claimed by us: (node, its last renewal, its users).
    pub async fn claim_dead(&self) -> redis::RedisResult<Vec<(String, Millis, Vec<UserId>)>> {
        let mut conn = self.conn.clone();
        let nodes: std::collections::HashMap<String, i64> = conn.hgetall(self.nodes_key()).await?;
        let mut dead = Vec::new();
        for (node, _) in nodes {
            if node == self.node {
                continue;
            }
            let claimed: Option<Vec<String>> = self
                .claim
                .key(self.nodes_key())
                .key(self.lease_key(&node))
                .key(self.node_users_key(&node))
                .arg(&node)
                .invoke_async(&mut conn)
                .await?;
            if let Some(list) = claimed {
                let mut it = list.into_iter();
                let last: Millis = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let users = it
                    .filter_map(|s| s.parse::<u64>().ok())
                    .filter_map(|u| UserId::parse(u).ok())
                    .collect();
                dead.push((node, last, users));
            }
        }
        Ok(dead)
    }

    /// Removes our registration at a clean stop.
    pub async fn deregister(&self) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<()> = redis::pipe()
            .hdel(self.nodes_key(), &self.node)
            .del(self.lease_key(&self.node))
            .del(self.node_users_key(&self.node))
            .query_async(&mut conn)
            .await;
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// A stream of change messages; ends when the subscription breaks.
    pub async fn subscribe(&self) -> redis::RedisResult<impl futures::Stream<Item = Message>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.channel()).await?;
        Ok(pubsub.into_on_message().filter_map(|m| async move {
            let payload: String = m.get_payload().ok()?;
            parse_message(&payload)
        }))
    }
}

fn parse_status(s: &str) -> Option<Status> {
    Status::parse_str(s).ok()
}

fn parse_opt(s: &str) -> Option<Millis> {
    if s.is_empty() { None } else { s.parse().ok() }
}

pub(crate) fn parse_message(msg: &str) -> Option<Message> {
    let f: Vec<&str> = msg.split('|').collect();
    match *f.first()? {
        "p" if f.len() == 11 => Some(Message::Presence(SharedState {
            user: UserId::parse_str(f[1]).ok()?,
            effective: parse_status(f[2])?,
            chosen: parse_status(f[3])?,
            connected: f[4] == "1",
            last_seen: parse_opt(f[5]),
            last_offline: parse_opt(f[6]),
            version: f[7].parse().ok()?,
            offline_version: f[8].parse().ok()?,
            privacy: Privacy {
                online: Visibility::parse_str(f[9]).ok()?,
                last_seen: Visibility::parse_str(f[10]).ok()?,
            },
        })),
        "c+" if f.len() == 3 => Some(Message::ContactsAdded(
            UserId::parse_str(f[1]).ok()?,
            UserId::parse_str(f[2]).ok()?,
        )),
        "c-" if f.len() == 3 => Some(Message::ContactsRemoved(
            UserId::parse_str(f[1]).ok()?,
            UserId::parse_str(f[2]).ok()?,
        )),
        _ => None,
    }
}

fn state_from_hash(
    user: UserId,
    m: &std::collections::HashMap<String, String>,
) -> Option<SharedState> {
    let get = |k: &str| m.get(k).map(String::as_str).unwrap_or("");
    if m.is_empty() {
        return None;
    }
    let devices: u64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("d:"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    let chosen = parse_status(get("c"))?;
    let pending = !get("pt").is_empty();
    Some(SharedState {
        user,
        effective: if devices > 0 || pending {
            chosen
        } else {
            Status::Offline
        },
        chosen,
        connected: devices > 0,
        last_seen: parse_opt(get("ls")),
        last_offline: parse_opt(get("lo")),
        version: get("v").parse().ok()?,
        offline_version: get("ov").parse().ok()?,
        privacy: Privacy {
            online: Visibility::parse_str(get("po")).ok()?,
            last_seen: Visibility::parse_str(get("pl")).ok()?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_messages_round_trip_through_the_wire_format() {
        let m = parse_message("p|42|busy|busy|1|1000|900|7|5|contacts|nobody").unwrap();
        let Message::Presence(s) = m else {
            panic!("expected presence")
        };
        assert_eq!(s.user.get(), 42);
        assert_eq!(
            (s.effective, s.connected, s.version, s.offline_version),
            (Status::Busy, true, 7, 5)
        );
        assert_eq!((s.last_seen, s.last_offline), (Some(1000), Some(900)));
        assert_eq!(s.privacy.last_seen, Visibility::Nobody);
        assert_eq!(
            parse_message("c+|1|2"),
            Some(Message::ContactsAdded(
                UserId::parse(1).unwrap(),
                UserId::parse(2).unwrap()
            ))
        );
        assert_eq!(
            parse_message("p|0|busy"),
            None,
            "malformed messages are ignored"
        );
    }
}
