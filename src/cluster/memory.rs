//! The [`Backplane`] in memory: a [`MemoryHub`] shared by several engines of one process, so
//! that tests exercise multi-node logic (transitions decided once, publications, leases, claims
//! and their take-over, outages) without Redis. It runs the same rules as Redis does
//! ([`crate::rules`]); what it does not model is time to live of idle users (they stay until
//! released).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{Backplane, BackplaneError, Claim, Message, Renewal, Result, Transition};
use crate::domain::{Millis, UserId, now_millis};
use crate::rules::{self, NodeId, Op, Outcome, Presence};

/// What a Redis would hold, shared by the backplanes of several engines.
pub struct MemoryHub {
    state: Mutex<HubState>,
    changes: broadcast::Sender<Message>,
    /// While set, every call fails (an outage).
    down: AtomicBool,
}

#[derive(Default)]
struct HubState {
    users: HashMap<UserId, Presence>,
    /// Registrations: node → last renewal.
    nodes: HashMap<NodeId, Millis>,
    /// Leases: node → when it expires.
    leases: HashMap<NodeId, Millis>,
    /// Dead node → (claimer, its last renewal).
    claims: HashMap<NodeId, (NodeId, Millis)>,
    /// Users each node holds devices of.
    node_users: HashMap<NodeId, HashSet<UserId>>,
}

impl MemoryHub {
    pub fn new() -> Arc<MemoryHub> {
        Arc::new(MemoryHub {
            state: Mutex::new(HubState::default()),
            changes: broadcast::channel(65_536).0,
            down: AtomicBool::new(false),
        })
    }

    /// A node's backplane on this hub.
    pub fn backplane(self: &Arc<Self>, node: &str, lease_ttl: Duration) -> Arc<MemoryBackplane> {
        Arc::new(MemoryBackplane {
            hub: self.clone(),
            node: Arc::from(node),
            lease_ttl,
            registered_once: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            up: AtomicBool::new(true),
        })
    }

    /// Simulates an outage (every call fails) or its end.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Forgets everything, as a Redis restarted without persistence.
    pub fn wipe(&self) {
        *self.lock() = HubState::default();
    }

    /// A user's shared presence, for tests.
    pub fn presence(&self, user: UserId) -> Option<Presence> {
        self.lock().users.get(&user).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("memory hub lock poisoned")
    }
}

/// One node's view of a [`MemoryHub`].
pub struct MemoryBackplane {
    hub: Arc<MemoryHub>,
    node: NodeId,
    lease_ttl: Duration,
    registered_once: AtomicBool,
    failed: AtomicBool,
    up: AtomicBool,
}

impl MemoryBackplane {
    fn check(&self) -> Result<()> {
        if self.hub.down.load(Ordering::SeqCst) {
            self.failed.store(true, Ordering::Relaxed);
            self.up.store(false, Ordering::Relaxed);
            return Err(BackplaneError("the memory hub is down".into()));
        }
        self.up.store(true, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    async fn transition(&self, batch: Vec<Transition>) -> Result<Vec<Option<(Presence, Outcome)>>> {
        self.check()?;
        let mut state = self.hub.lock();
        let mut out = Vec::with_capacity(batch.len());
        for t in batch {
            if matches!(t.op, Op::DropNode { .. } | Op::Expire { .. })
                && !state.users.contains_key(&t.user)
            {
                out.push(None);
                continue;
            }
            let p = state
                .users
                .entry(t.user)
                .or_insert_with(|| t.seed().seed_of(&self.node));
            let outcome = rules::apply(p, &t.op, &self.node, t.at);
            let p = p.clone();
            state
                .node_users
                .entry(self.node.clone())
                .or_default()
                .insert(t.user);
            if outcome.publish {
                let _ = self
                    .hub
                    .changes
                    .send(Message::Presence(t.user, Box::new(p.clone())));
            }
            out.push(Some((p, outcome)));
        }
        Ok(out)
    }

    async fn load(&self, users: &[UserId]) -> Result<Vec<(UserId, Presence)>> {
        self.check()?;
        let state = self.hub.lock();
        Ok(users
            .iter()
            .filter_map(|u| state.users.get(u).map(|p| (*u, p.clone())))
            .collect())
    }

    async fn publish_contacts(&self, added: bool, pairs: &[(UserId, UserId)]) -> Result<()> {
        self.check()?;
        for &(a, b) in pairs {
            let _ = self.hub.changes.send(if added {
                Message::ContactsAdded(a, b)
            } else {
                Message::ContactsRemoved(a, b)
            });
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Message>> {
        self.check()?;
        // A receiver that falls behind ends its stream: the engine resubscribes and resyncs,
        // as it does when Redis drops a subscription.
        Ok(BroadcastStream::new(self.hub.changes.subscribe())
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| async move { m.ok() })
            .boxed())
    }

    async fn renew(&self) -> Result<Renewal> {
        self.check()?;
        let now = now_millis();
        let mut state = self.hub.lock();
        let registered = state.nodes.contains_key(&self.node);
        state.nodes.insert(self.node.clone(), now);
        state.leases.insert(
            self.node.clone(),
            now + self.lease_ttl.as_millis() as Millis,
        );
        let first = !self.registered_once.swap(true, Ordering::Relaxed);
        let failed_since = self.failed.swap(false, Ordering::Relaxed);
        Ok(Renewal {
            lost: !first && (!registered || failed_since),
            claimed: state.claims.contains_key(&self.node),
        })
    }

    async fn claim(&self) -> Result<Vec<Claim>> {
        self.check()?;
        let now = now_millis();
        let mut state = self.hub.lock();
        let expired = |state: &HubState, n: &NodeId| state.leases.get(n).is_none_or(|&t| t <= now);
        let dead: Vec<(NodeId, Millis)> = state
            .nodes
            .iter()
            .filter(|(n, _)| **n != self.node && expired(&state, n))
            .map(|(n, last)| (n.clone(), *last))
            .collect();
        let mut out = Vec::new();
        for (node, last) in dead {
            state.nodes.remove(&node);
            state.claims.insert(node.clone(), (self.node.clone(), last));
        }
        let claims: Vec<(NodeId, NodeId, Millis)> = state
            .claims
            .iter()
            .map(|(d, (c, l))| (d.clone(), c.clone(), *l))
            .collect();
        for (dead, claimer, last) in claims {
            if dead == self.node {
                if expired(&state, &claimer) {
                    state.claims.remove(&dead);
                }
                continue;
            }
            if claimer == self.node || expired(&state, &claimer) {
                state.claims.insert(dead.clone(), (self.node.clone(), last));
                out.push(Claim {
                    node: dead,
                    last_renewal: last,
                });
            }
        }
        Ok(out)
    }

    async fn claimed_users(&self, dead: &NodeId, max: usize) -> Result<Vec<UserId>> {
        self.check()?;
        let state = self.hub.lock();
        Ok(state
            .node_users
            .get(dead)
            .map(|s| s.iter().take(max).copied().collect())
            .unwrap_or_default())
    }

    async fn finish_users(&self, dead: &NodeId, users: &[UserId]) -> Result<()> {
        self.check()?;
        let mut state = self.hub.lock();
        if let Some(set) = state.node_users.get_mut(dead) {
            for u in users {
                set.remove(u);
            }
        }
        Ok(())
    }

    async fn finish_claim(&self, dead: &NodeId) -> Result<()> {
        self.check()?;
        let mut state = self.hub.lock();
        state.node_users.remove(dead);
        state.claims.remove(dead);
        Ok(())
    }

    async fn settled(&self, users: &[UserId]) -> Result<()> {
        self.check()?;
        let mut state = self.hub.lock();
        if let Some(set) = state.node_users.get_mut(&self.node) {
            for u in users {
                set.remove(u);
            }
        }
        Ok(())
    }

    async fn release(&self, users: &[(UserId, u64)]) -> Result<()> {
        self.check()?;
        let mut state = self.hub.lock();
        for (user, version) in users {
            if state
                .users
                .get(user)
                .is_some_and(|p| p.version == *version && p.live().total == 0 && p.grace.is_none())
            {
                state.users.remove(user);
            }
        }
        Ok(())
    }

    async fn deregister(&self) {
        let mut state = self.hub.lock();
        state.nodes.remove(&self.node);
        state.leases.remove(&self.node);
        state.node_users.remove(&self.node);
    }
}
