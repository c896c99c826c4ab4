//! The change channel of each Redis shape. One instance and Sentinel: one channel, `PUBLISH`ed
//! and `SUBSCRIBE`d. A Redis Cluster: one channel per hash-tag group (in the slot of that
//! group's users, so the transition script `SPUBLISH`es next to the keys it wrote), subscribed
//! with `SSUBSCRIBE` on each shard's master over a connection of its own: no shard carries
//! every message.
//!
//! A subscription ends (and the engine subscribes again, then re-reads every user it holds)
//! when a connection drops, when Redis unsubscribes it (its master was demoted), or when a
//! once-a-second check finds the masters changed (one froze and was replaced, silently). Each
//! end also marks the backplane as having failed, so the node re-asserts its own devices.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use super::GROUPS;
use super::conn::{Commands, bounded, connection_config, master_client, sentinel_master_addr};
use super::target::{RedisTarget, slot};
use crate::cluster::{Message, parse_message};

/// How often a subscription checks that it still listens to the right masters.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The one channel of one instance or Sentinel.
pub(super) fn channel(prefix: &str) -> String {
    format!("{prefix}:changes")
}

/// The channel of one group on a Redis Cluster: tagged like the group's user keys.
pub(super) fn group_channel(prefix: &str, group: u64) -> String {
    format!("{prefix}:changes:{{{group}}}")
}

/// Marks the backplane failed when the subscription ends, however it ends.
struct EndGuard(Arc<AtomicBool>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn decode(payload: &[u8]) -> Option<Message> {
    parse_message(std::str::from_utf8(payload).ok()?)
}

pub(super) async fn subscribe(
    target: &RedisTarget,
    commands: Arc<Commands>,
    prefix: &str,
    failed: Arc<AtomicBool>,
) -> RedisResult<BoxStream<'static, Message>> {
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())?;
            let pubsub = plain(client, channel(prefix)).await?;
            let guard = EndGuard(failed);
            Ok(pubsub
                .filter_map(move |m| {
                    let _alive = &guard;
                    async move { m }
                })
                .boxed())
        }
        RedisTarget::Sentinel { .. } => {
            let (client, addr) = master_client(target).await?;
            let messages = plain(client, channel(prefix)).await?;
            let watch = SentinelWatch {
                target: target.clone(),
                subscribed: addr,
                commands,
            };
            Ok(watched(messages, failed, watch))
        }
        RedisTarget::Cluster(seeds) => {
            let masters = cluster_masters(&commands).await?;
            let userinfo = seeds
                .first()
                .and_then(|s| s.strip_prefix("redis://"))
                .and_then(|s| s.rsplit_once('@'))
                .map(|(u, _)| format!("{u}@"))
                .unwrap_or_default();
            let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
            let mut by_master: BTreeMap<(String, u16), Vec<String>> = BTreeMap::new();
            for group in 0..GROUPS {
                let ch = group_channel(prefix, group);
                let owner = masters.owner(slot(ch.as_bytes())).ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "no master serves the slot of channel",
                        ch.clone(),
                    ))
                })?;
                by_master.entry(owner).or_default().push(ch);
            }
            let mut connections = Vec::new();
            for ((host, port), channels) in by_master {
                let client = redis::Client::open(format!(
                    "redis://{userinfo}{host}:{port}/?protocol=resp3"
                ))?;
                let config = connection_config().set_push_sender(tx.clone());
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                for ch in channels {
                    // One channel per command: one confirmation per reply.
                    let _: Value = bounded(
                        "SSUBSCRIBE",
                        redis::cmd("SSUBSCRIBE").arg(&ch).query_async(&mut conn),
                    )
                    .await?;
                }
                connections.push(conn);
            }
            drop(tx);
            let pushes = futures::stream::unfold(rx, |mut rx| async move {
                let push = rx.recv().await?;
                Some((push, rx))
            });
            let messages = pushes
                .take_while(|p| {
                    let go_on = !matches!(p.kind, PushKind::SUnsubscribe | PushKind::Disconnection);
                    if !go_on {
                        tracing::warn!(kind = ?p.kind, "a shard's subscription ended (its master changed or went away)");
                    }
                    futures::future::ready(go_on)
                })
                .filter_map(move |p| {
                    // The connections live as long as the stream.
                    let _alive = &connections;
                    let msg = match (&p.kind, p.data.get(1)) {
                        (PushKind::SMessage, Some(Value::BulkString(payload))) => decode(payload),
                        _ => None,
                    };
                    futures::future::ready(msg)
                });
            Ok(watched(
                messages.boxed(),
                failed,
                ClusterWatch { commands, masters },
            ))
        }
    }
}

/// SUBSCRIBE to one channel; the messages, ending when the connection does.
async fn plain(
    client: redis::Client,
    channel: String,
) -> RedisResult<BoxStream<'static, Option<Message>>> {
    let mut pubsub = bounded("subscribe", client.get_async_pubsub()).await?;
    bounded("SUBSCRIBE", pubsub.subscribe(channel)).await?;
    Ok(pubsub
        .into_on_message()
        .map(|m| {
            let payload: Vec<u8> = m.get_payload().ok()?;
            decode(&payload)
        })
        .boxed())
}

/// Something that can tell, once a second, that a subscription listens to the wrong servers.
trait Watch: Send + 'static {
    fn changed(&mut self) -> impl Future<Output = bool> + Send;
}

/// Merges `messages` with a once-a-second check; the stream ends when either says so.
fn watched<M>(
    messages: BoxStream<'static, M>,
    failed: Arc<AtomicBool>,
    watch: impl Watch,
) -> BoxStream<'static, Message>
where
    M: Into<Option<Message>> + Send + 'static,
{
    let state = (
        messages,
        watch,
        tokio::time::interval(CHECK_EVERY),
        EndGuard(failed),
    );
    futures::stream::unfold(
        state,
        |(mut messages, mut watch, mut tick, guard)| async move {
            loop {
                tokio::select! {
                    next = messages.next() => match next {
                        None => return None,
                        Some(m) => {
                            if let Some(m) = m.into() {
                                return Some((m, (messages, watch, tick, guard)));
                            }
                        }
                    },
                    _ = tick.tick() => {
                        if watch.changed().await {
                            return None;
                        }
                    }
                }
            }
        },
    )
    .boxed()
}

/// Sentinel: the master the sentinels name is still the one subscribed to.
struct SentinelWatch {
    target: RedisTarget,
    subscribed: (String, u16),
    commands: Arc<Commands>,
}

impl Watch for SentinelWatch {
    async fn changed(&mut self) -> bool {
        match sentinel_master_addr(&self.target).await {
            Ok(addr) if addr != self.subscribed => {
                tracing::warn!(from = ?self.subscribed, to = ?addr, "the sentinels switched masters; subscribing to the new one");
                let _ = self.commands.refresh().await;
                true
            }
            _ => false,
        }
    }
}

/// Redis Cluster: the masters serving the channels' slots are still the ones subscribed to.
struct ClusterWatch {
    commands: Arc<Commands>,
    masters: Masters,
}

impl Watch for ClusterWatch {
    async fn changed(&mut self) -> bool {
        let Ok(now) = cluster_masters(&self.commands).await else {
            return false;
        };
        if now == self.masters {
            return false;
        }
        tracing::warn!("the Redis Cluster's masters changed; subscribing again");
        if let Err(e) = self.commands.refresh().await {
            tracing::warn!(error = %e, "could not reconnect to the Redis Cluster yet");
        }
        true
    }
}

/// Which master serves which slots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Masters(Vec<(u16, u16, String, u16)>);

impl Masters {
    fn owner(&self, slot: u16) -> Option<(String, u16)> {
        self.0
            .iter()
            .find(|(start, end, _, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, host, port)| (host.clone(), *port))
    }
}

/// CLUSTER SLOTS, as (first slot, last slot, master host, master port), sorted.
async fn cluster_masters(commands: &Commands) -> RedisResult<Masters> {
    let mut conn = commands.conn().await?;
    let ranges: Vec<Value> = bounded(
        "CLUSTER SLOTS",
        redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn),
    )
    .await?;
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(start), Some(end), Some(Value::Array(master))) = (
            fields.first().and_then(int),
            fields.get(1).and_then(int),
            fields.get(2),
        ) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(port) = master.get(1).and_then(int) else {
            continue;
        };
        out.push((start, end, host, port));
    }
    out.sort();
    Ok(Masters(out))
}
