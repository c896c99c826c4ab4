//! The backplane: how the nodes of a cluster share presence. The engine talks to it through the
//! [`Backplane`] trait only (transitions, loads, publications, leases, claims); [`redis`]
//! implements it on Redis (one instance, Redis Cluster or Sentinel) and [`memory`] in memory,
//! for tests of multi-node logic without Redis.
//!
//! A transition runs the status rules ([`crate::rules`]) once, atomically, for every node, and
//! publishes the user's new presence; each node applies what it hears to its own receivers
//! (dropping anything not newer than what it has). A node holds a lease; a node whose lease
//! runs out is claimed by a survivor, who drops its devices user by user (a claim is a durable
//! record: if the claimer dies too, another node finishes it).
use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::domain::{CustomStatus, Millis, Privacy, Status, UserId, Visibility};
use crate::rules::{Devices, Grace, NodeDevices, NodeId, Op, Outcome, Presence};

pub mod memory;
pub mod redis;

/// Why the backplane could not do something. The engine falls back to its own memory.
#[derive(Debug, Clone, thiserror::Error)]
#[error("backplane: {0}")]
pub struct BackplaneError(pub String);

pub type Result<T> = std::result::Result<T, BackplaneError>;

/// One operation for one user, with what the calling node knows of the user (used when the
/// backplane has no state for them).
#[derive(Debug, Clone)]
pub struct Transition {
    pub user: UserId,
    pub op: Op,
    /// The node's copy of the user ([`Presence::seed_of`] is taken from it). A reconciliation
    /// is seeded from its own copy instead: see [`Transition::seed`].
    pub seed: Presence,
    /// When the node made the change (last_seen and idle times come from it).
    pub at: Millis,
}

impl Transition {
    /// What the backplane starts from when it has nothing for the user: for a reconciliation
    /// the node's copy it carries, else `seed`.
    pub fn seed(&self) -> &Presence {
        match &self.op {
            Op::Reconcile(own) => own,
            _ => &self.seed,
        }
    }
}

/// What the change channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Presence(UserId, Box<Presence>),
    ContactsAdded(UserId, UserId),
    ContactsRemoved(UserId, UserId),
}

/// A lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// This node had been declared dead (its registration claimed, or the backplane lost it):
    /// its devices must be restored and its users reconciled.
    pub lost: bool,
    /// Another node holds a claim on this one and is dropping its devices: restoring them
    /// before it is done would be undone.
    pub claimed: bool,
}

/// A dead node whose devices this node must drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub node: NodeId,
    /// The dead node's last lease renewal: its users went offline then.
    pub last_renewal: Millis,
}

#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// This node's id.
    fn node(&self) -> &NodeId;

    /// Whether the last call succeeded.
    fn is_up(&self) -> bool;

    /// Runs the transitions (pipelined; each atomic for its user) and returns each user's new
    /// presence with what the transition did, in order (None: the backplane has no state for
    /// the user and the operation needs one: dropping a node's devices, ending a grace).
    /// Publishes what changed.
    async fn transition(&self, batch: Vec<Transition>) -> Result<Vec<Option<(Presence, Outcome)>>>;

    /// The presence of the given users that the backplane has (users it has not are left out).
    async fn load(&self, users: &[UserId]) -> Result<Vec<(UserId, Presence)>>;

    /// Tells every node about contact changes.
    async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) -> Result<()>;

    /// The change messages, from now on; the stream ends when the subscription breaks.
    async fn subscribe(&self) -> Result<BoxStream<'static, Message>>;

    /// Renews this node's lease.
    async fn renew(&self) -> Result<Renewal>;

    /// Dead nodes this node now holds a claim on: newly expired leases, and claims whose
    /// claimer died.
    async fn claim(&self) -> Result<Vec<Claim>>;

    /// Up to `max` users a claimed node held devices of or owed a row for, not yet done.
    async fn claimed_users(&self, dead: &NodeId, max: usize) -> Result<Vec<UserId>>;

    /// These users of a claimed node are done.
    async fn finish_users(&self, dead: &NodeId, users: &[UserId]) -> Result<()>;

    /// A claimed node is done.
    async fn finish_claim(&self, dead: &NodeId) -> Result<()>;

    /// This node wrote these users' rows and holds no device of theirs: a reaper of this node
    /// no longer needs to visit them.
    async fn settled(&self, users: &[UserId]) -> Result<()>;

    /// The store has these users' presence at these versions and none of them has a device:
    /// the backplane may forget them (only those still at that version, without devices).
    async fn release(&self, users: &[(UserId, u64)]) -> Result<()>;

    /// A clean stop: this node's registration and lease go.
    async fn deregister(&self);
}

/// A user's presence as the transition script returns and publishes it (JSON, every number as
/// text: Lua's numbers are doubles, and its JSON encoder would round long ones).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Wire {
    #[serde(default)]
    pub k: String,
    pub u: String,
    pub c: String,
    pub ls: String,
    pub lo: String,
    pub v: String,
    pub ov: String,
    pub po: String,
    pub pl: String,
    pub pa: String,
    pub ct: String,
    pub ce: String,
    pub cx: String,
    #[serde(rename = "is")]
    pub inactive: String,
    pub g: String,
    /// When the user last chose (status, privacy, custom status), ms; absent in older states.
    #[serde(default)]
    pub ca: String,
    /// Per node: "seq,devices". Lua encodes an empty table as `{}`.
    #[serde(default)]
    pub d: BTreeMap<String, String>,
}

fn opt_ms(raw: &str) -> Option<Option<Millis>> {
    if raw.is_empty() {
        Some(None)
    } else {
        raw.parse().ok().map(Some)
    }
}

fn ms(v: Option<Millis>) -> String {
    v.map(|t| t.to_string()).unwrap_or_default()
}

impl Wire {
    /// The scalar fields of a presence (what the script's seed arguments carry).
    pub(crate) fn scalars(p: &Presence) -> [String; 12] {
        let custom = p.custom.as_deref();
        [
            p.chosen.as_str().into(),
            ms(p.last_seen),
            ms(p.last_offline),
            p.version.to_string(),
            p.offline_version.to_string(),
            p.privacy.online.as_str().into(),
            p.privacy.last_seen.as_str().into(),
            if p.privacy.approximate_last_seen {
                "1"
            } else {
                "0"
            }
            .into(),
            custom.map(|c| c.text.clone()).unwrap_or_default(),
            custom.map(|c| c.emoji.clone()).unwrap_or_default(),
            ms(custom.and_then(|c| c.expires_at)),
            ms(p.inactive_since),
        ]
    }

    pub(crate) fn to_presence(&self) -> Option<(UserId, Presence)> {
        let user = UserId::parse_str(&self.u).ok()?;
        let custom = if self.ct.is_empty() && self.ce.is_empty() {
            None
        } else {
            Some(Arc::new(CustomStatus {
                text: self.ct.clone(),
                emoji: self.ce.clone(),
                expires_at: opt_ms(&self.cx)?,
            }))
        };
        let mut nodes = Vec::new();
        for (node, report) in &self.d {
            let (seq, devices) = report.split_once(',')?;
            nodes.push(NodeDevices {
                node: Arc::from(node.as_str()),
                seq: seq.parse().ok()?,
                devices: Devices::decode(devices)?,
            });
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Some((
            user,
            Presence {
                chosen: Status::parse_str(&self.c).ok()?,
                last_seen: opt_ms(&self.ls)?,
                last_offline: opt_ms(&self.lo)?,
                version: self.v.parse().ok()?,
                offline_version: self.ov.parse().ok()?,
                privacy: Privacy {
                    online: Visibility::parse_str(&self.po).ok()?,
                    last_seen: Visibility::parse_str(&self.pl).ok()?,
                    approximate_last_seen: self.pa != "0",
                },
                custom,
                chosen_at: self.ca.parse().unwrap_or(0),
                inactive_since: opt_ms(&self.inactive)?,
                nodes,
                grace: decode_grace(&self.g)?,
            },
        ))
    }
}

/// "token,since,node,devices" (empty: no grace). The outer None is a malformed value.
fn decode_grace(raw: &str) -> Option<Option<Grace>> {
    if raw.is_empty() {
        return Some(None);
    }
    let mut f = raw.splitn(4, ',');
    let token = f.next()?.parse().ok()?;
    let since = f.next()?.parse().ok()?;
    let node = Arc::from(f.next()?);
    let frozen = Devices::decode(f.next()?)?;
    Some(Some(Grace {
        token,
        since,
        node,
        frozen,
    }))
}

/// A published message, parsed (None for anything malformed).
pub(crate) fn parse_message(raw: &str) -> Option<Message> {
    #[derive(Deserialize)]
    struct Kind {
        k: String,
        #[serde(default)]
        a: String,
        #[serde(default)]
        b: String,
    }
    let kind: Kind = serde_json::from_str(raw).ok()?;
    match kind.k.as_str() {
        "p" => {
            let wire: Wire = serde_json::from_str(raw).ok()?;
            let (user, presence) = wire.to_presence()?;
            Some(Message::Presence(user, Box::new(presence)))
        }
        "c+" | "c-" => {
            let a = UserId::parse_str(&kind.a).ok()?;
            let b = UserId::parse_str(&kind.b).ok()?;
            Some(if kind.k == "c+" {
                Message::ContactsAdded(a, b)
            } else {
                Message::ContactsRemoved(a, b)
            })
        }
        _ => None,
    }
}

/// A contact change as published.
pub(crate) fn contact_message(added: bool, a: UserId, b: UserId) -> String {
    serde_json::json!({
        "k": if added { "c+" } else { "c-" },
        "a": a.to_string(),
        "b": b.to_string(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_messages_round_trip() {
        let (a, b) = (UserId::parse(1).unwrap(), UserId::parse(2).unwrap());
        assert_eq!(
            parse_message(&contact_message(true, a, b)),
            Some(Message::ContactsAdded(a, b))
        );
        assert_eq!(
            parse_message(r#"{"k":"p","u":"0"}"#),
            None,
            "malformed is ignored"
        );
    }
}
