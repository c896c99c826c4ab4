//! The status rules: how a user's devices (on every node), chosen status, privacy, activity,
//! offline grace and custom status make the presence others see, and when its version moves.
//!
//! Pure and synchronous: one function, [`apply`], takes a user's [`Presence`] and one [`Op`].
//! A single node runs it in memory under the user's shard lock. In cluster mode the same rules
//! run inside Redis as one Lua script (`src/cluster/transition.lua`), so that a change is decided
//! once, atomically, for every node; a conformance test (`tests/rules_conformance.rs`) runs the
//! same operation sequences through both and compares every state and every published result.
//! A node that cannot reach Redis falls back to this module for its own users.
//!
//! Each node reports its own devices of a user as one absolute summary ([`Devices`]) tagged with
//! a sequence number, never as increments: a summary retried after a failover, or overtaken by
//! a newer one, changes nothing.
use std::sync::Arc;

use crate::domain::{
    Activity, CustomStatus, Millis, Platform, PlatformSet, Privacy, Status, Visibility,
};

/// A cluster node's id (a new one per process); `"local"` on a single node.
pub type NodeId = Arc<str>;

/// Live devices of one user on one node (or summed over nodes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Devices {
    pub total: u32,
    /// Devices whose activity is ACTIVE.
    pub active: u32,
    /// Devices per platform, indexed by [`Platform::index`].
    pub platforms: [u32; 4],
}

impl Devices {
    /// One device.
    pub fn one(activity: Activity, platform: Platform) -> Devices {
        let mut d = Devices {
            total: 1,
            active: u32::from(activity.is_active()),
            platforms: [0; 4],
        };
        d.platforms[platform.index()] = 1;
        d
    }

    pub fn add(&mut self, other: &Devices) {
        self.total += other.total;
        self.active += other.active;
        for (a, b) in self.platforms.iter_mut().zip(other.platforms) {
            *a += b;
        }
    }

    pub fn remove(&mut self, other: &Devices) {
        self.total = self.total.saturating_sub(other.total);
        self.active = self.active.saturating_sub(other.active);
        for (a, b) in self.platforms.iter_mut().zip(other.platforms) {
            *a = a.saturating_sub(b);
        }
    }

    /// The known platforms with at least one device.
    pub fn platform_set(&self) -> PlatformSet {
        Platform::ALL
            .into_iter()
            .filter(|p| self.platforms[p.index()] > 0)
            .fold(PlatformSet::EMPTY, PlatformSet::with)
    }

    /// `total,active,unspecified,desktop,mobile,web`: the form Redis keeps.
    pub fn encode(&self) -> String {
        let p = self.platforms;
        format!(
            "{},{},{},{},{},{}",
            self.total, self.active, p[0], p[1], p[2], p[3]
        )
    }

    pub fn decode(raw: &str) -> Option<Devices> {
        let mut it = raw.split(',').map(|f| f.parse::<u32>().ok());
        let mut next = || it.next().flatten();
        Some(Devices {
            total: next()?,
            active: next()?,
            platforms: [next()?, next()?, next()?, next()?],
        })
    }
}

/// One node's devices of a user, as that node last reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDevices {
    pub node: NodeId,
    /// The node's sequence number of this report: a lower one is stale and ignored.
    pub seq: u64,
    pub devices: Devices,
}

/// The user's last device left, and the anti-flap grace runs: the user still shows as they
/// were (the devices frozen at that moment) until the grace expires or a device returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grace {
    /// Names this grace, so that an expiry of an older one does nothing.
    pub token: u64,
    /// When the last device left: last_seen if the grace expires.
    pub since: Millis,
    /// The node that runs the grace timer.
    pub node: NodeId,
    pub frozen: Devices,
}

/// One user's presence: everything the rules decide from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Presence {
    pub chosen: Status,
    /// When the user last became visibly online or offline.
    pub last_seen: Option<Millis>,
    /// last_seen as of the last visible offline transition: what viewers who may see last_seen
    /// but not the online status are shown, so that coming online does not leak through it.
    pub last_offline: Option<Millis>,
    /// Grows by one with every change of what anyone may see.
    pub version: u64,
    /// Grows by one with every change of `last_offline`: the version of viewers who may see
    /// last_seen but not the online status, so that their version moves only when what they
    /// see moves.
    pub offline_version: u64,
    pub privacy: Privacy,
    pub custom: Option<Arc<CustomStatus>>,
    /// When the user last chose (status, privacy, custom status): after a partition, the later
    /// choice wins (nodes that decided alone while the backplane failed each have their copy;
    /// versions there say nothing about which choice came last). 0: unknown.
    pub chosen_at: Millis,
    /// When the user's live devices all stopped being ACTIVE (None while one is, or offline).
    pub inactive_since: Option<Millis>,
    /// Each node's report of its devices; a node whose devices left keeps its entry (with zero
    /// devices) so that a stale report cannot bring them back.
    pub nodes: Vec<NodeDevices>,
    pub grace: Option<Grace>,
}

/// An event applied to a user's presence. Device reports and grace expiries come from the node
/// that runs them (the `node` argument of [`apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The calling node's devices of the user are now `devices`. `grace`: the node's last device
    /// just left and the user should stay as they were until `Expire` of this token.
    Devices {
        seq: u64,
        devices: Devices,
        grace: Option<u64>,
    },
    /// The calling node's grace timer ran out.
    Expire {
        token: u64,
    },
    Status(Status),
    Privacy(Privacy),
    Custom(Option<Arc<CustomStatus>>),
    /// Clears the custom status if it is the one that expires at this instant.
    ExpireCustom {
        expires_at: Millis,
    },
    /// A dead node's devices are gone, the user offline (if they were the last) at `at`.
    DropNode {
        node: NodeId,
        at: Millis,
    },
    /// The calling node's own copy of the user, after the shared state missed changes made
    /// while it was unreachable (or lost them all): merged, newer facets win.
    Reconcile(Box<Presence>),
    /// Moves the version without changing anything: some viewers' sight of the user changed
    /// (a contact removed) and they are told so with a version above what they had.
    Touch,
}

/// What an [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Something anyone may see changed: the version moved.
    pub changed: bool,
    /// Every node must hear the result (a change, or a reconciliation that re-created the
    /// shared state).
    pub publish: bool,
}

/// What viewers can see, for deciding whether a change happened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Facets {
    effective: Status,
    last_seen: Option<Millis>,
    privacy: Privacy,
    platforms: PlatformSet,
    idle_since: Option<Millis>,
    custom: Option<Arc<CustomStatus>>,
}

impl Presence {
    /// A fresh state seeded from what `node` knows (its own devices, no grace, nothing of other
    /// nodes): how the shared state starts when it has none for the user.
    pub fn seed_of(&self, node: &str) -> Presence {
        Presence {
            nodes: self
                .nodes
                .iter()
                .filter(|n| &*n.node == node)
                .cloned()
                .collect(),
            grace: None,
            ..self.clone()
        }
    }

    /// Devices live on every node together.
    pub fn live(&self) -> Devices {
        let mut sum = Devices::default();
        for n in &self.nodes {
            sum.add(&n.devices);
        }
        sum
    }

    /// The devices the user shows as: the live ones, or during a grace the ones frozen when
    /// the last left; None when offline.
    pub fn shown(&self) -> Option<Devices> {
        let live = self.live();
        if live.total > 0 {
            Some(live)
        } else {
            self.grace.as_ref().map(|g| g.frozen)
        }
    }

    /// The status others see: OFFLINE without a device (or invisible), AWAY when the user chose
    /// ONLINE but no device is in use (auto-away), else the chosen status.
    pub fn effective(&self) -> Status {
        match self.shown() {
            None => Status::Offline,
            Some(d) if self.chosen == Status::Online && d.active == 0 => Status::Away,
            Some(_) => self.chosen,
        }
    }

    /// Whether AWAY comes from activity, not from the user's choice.
    pub fn auto_away(&self) -> bool {
        self.chosen == Status::Online && self.shown().is_some_and(|d| d.active == 0)
    }

    /// When the user went auto-away; None unless they are.
    pub fn idle_since(&self) -> Option<Millis> {
        if self.auto_away() {
            self.inactive_since
        } else {
            None
        }
    }

    /// At least one live device, even while invisible (what services see as `connected`).
    pub fn connected(&self) -> bool {
        self.live().total > 0
    }

    /// The known platforms the user shows as being on; empty while offline or invisible.
    pub fn platforms(&self) -> PlatformSet {
        match self.shown() {
            Some(d) if self.effective() != Status::Offline => d.platform_set(),
            _ => PlatformSet::EMPTY,
        }
    }

    fn facets(&self) -> Facets {
        Facets {
            effective: self.effective(),
            last_seen: self.last_seen,
            privacy: self.privacy,
            platforms: self.platforms(),
            idle_since: self.idle_since(),
            custom: self.custom.clone(),
        }
    }

    /// Whether viewers see the same in both.
    pub fn same_facets(&self, other: &Presence) -> bool {
        self.facets() == other.facets()
    }

    /// What viewers can see, as one comparable text: the same text the Lua script's `facets()`
    /// builds, so a node can tell the script what its own copy showed (see [`Op::Reconcile`]).
    pub fn facets_key(&self) -> String {
        let opt = |v: Option<Millis>| v.map(|t| t.to_string()).unwrap_or_default();
        let custom = self.custom.as_deref();
        [
            self.effective().as_str().to_string(),
            opt(self.last_seen),
            self.privacy.online.as_str().to_string(),
            self.privacy.last_seen.as_str().to_string(),
            if self.privacy.approximate_last_seen {
                "1"
            } else {
                "0"
            }
            .to_string(),
            self.platforms().bits().to_string(),
            opt(self.idle_since()),
            custom.map(|c| c.text.clone()).unwrap_or_default(),
            custom.map(|c| c.emoji.clone()).unwrap_or_default(),
            opt(custom.and_then(|c| c.expires_at)),
        ]
        .join("\0")
    }

    /// The report of `node`, if it ever made one.
    pub fn node(&self, node: &str) -> Option<&NodeDevices> {
        self.nodes.iter().find(|n| &*n.node == node)
    }

    /// Sets `node`'s report, unless `seq` is not newer than the one kept. Returns whether it
    /// was taken.
    fn report(&mut self, node: &NodeId, seq: u64, devices: Devices) -> bool {
        match self.nodes.iter_mut().find(|n| n.node == *node) {
            Some(n) if n.seq >= seq => false,
            Some(n) => {
                n.seq = seq;
                n.devices = devices;
                true
            }
            None => {
                self.nodes.push(NodeDevices {
                    node: node.clone(),
                    seq,
                    devices,
                });
                self.nodes.sort_by(|a, b| a.node.cmp(&b.node));
                true
            }
        }
    }
}

/// Applies `op`, made by `node` at `now`, to `p`. The version moves by one when anything any
/// viewer may see changes; last_seen is set when the user becomes visibly online or offline.
pub fn apply(p: &mut Presence, op: &Op, node: &NodeId, now: Millis) -> Outcome {
    let before = p.facets();
    let mut at = now;
    let mut publish = false;
    match op {
        Op::Devices {
            seq,
            devices,
            grace,
        } => {
            let was_live = p.live().total > 0;
            let was_shown = p.shown();
            if !p.report(node, *seq, *devices) {
                return Outcome {
                    changed: false,
                    publish: false,
                };
            }
            if p.live().total > 0 {
                p.grace = None;
            } else if let (true, Some(token), None, Some(frozen)) =
                (was_live, grace, &p.grace, was_shown)
            {
                p.grace = Some(Grace {
                    token: *token,
                    since: now,
                    node: node.clone(),
                    frozen,
                });
            }
        }
        Op::Expire { token } => {
            if let Some(g) = &p.grace
                && g.token == *token
                && g.node == *node
            {
                at = g.since;
                p.grace = None;
            }
        }
        Op::Status(s) => {
            p.chosen = *s;
            p.chosen_at = p.chosen_at.max(now);
        }
        Op::Privacy(privacy) => {
            p.privacy = *privacy;
            p.chosen_at = p.chosen_at.max(now);
        }
        Op::Custom(c) => {
            p.custom = c.clone();
            p.chosen_at = p.chosen_at.max(now);
        }
        Op::ExpireCustom { expires_at } => {
            if p.custom
                .as_ref()
                .is_some_and(|c| c.expires_at == Some(*expires_at))
            {
                p.custom = None;
            }
        }
        Op::DropNode {
            node: dead,
            at: when,
        } => {
            p.nodes.retain(|n| n.node != *dead);
            at = *when;
            if let Some(g) = &p.grace
                && g.node == *dead
            {
                at = at.min(g.since);
                p.grace = None;
            }
        }
        Op::Reconcile(seed) => {
            publish = reconcile(p, seed, node);
        }
        Op::Touch => {}
    }
    track_inactivity(p, at);
    let after = p.facets();
    let changed = before != after || matches!(op, Op::Touch);
    if changed {
        p.version += 1;
        let was_visible = before.effective != Status::Offline;
        let is_visible = after.effective != Status::Offline;
        if was_visible != is_visible {
            p.last_seen = Some(p.last_seen.map_or(at, |t| t.max(at)));
            if !is_visible {
                p.last_offline = p.last_seen;
                p.offline_version += 1;
            }
        }
    }
    Outcome {
        changed,
        publish: changed || publish,
    }
}

/// Keeps `inactive_since` = when the shown devices last stopped having an ACTIVE one.
fn track_inactivity(p: &mut Presence, at: Millis) {
    match p.shown() {
        Some(d) if d.active == 0 => {
            if p.inactive_since.is_none() {
                p.inactive_since = Some(at);
            }
        }
        _ => p.inactive_since = None,
    }
}

/// Merges a node's own copy into the shared state: the node's devices (if newer), and the
/// facets of whichever side has the higher version (the shared state on a tie); timestamps and
/// the offline numbering never move backwards. When the merged state differs from what either
/// side had, the version goes above both, so every node accepts it as newer. Returns whether
/// the result must be published even if nothing changed (it always must: the other nodes may
/// hold views from before the outage).
fn reconcile(p: &mut Presence, seed: &Presence, node: &NodeId) -> bool {
    if let Some(own) = seed.node(node) {
        p.report(node, own.seq, own.devices);
    }
    // The later choice wins; with no time on either side (older states), the higher version.
    if seed.chosen_at > p.chosen_at || (seed.chosen_at == p.chosen_at && seed.version > p.version) {
        p.chosen = seed.chosen;
        p.privacy = seed.privacy;
        p.custom = seed.custom.clone();
        p.chosen_at = seed.chosen_at;
    }
    p.last_seen = p.last_seen.max(seed.last_seen);
    p.last_offline = p.last_offline.max(seed.last_offline);
    p.offline_version = p.offline_version.max(seed.offline_version);
    let differs_from_seed = seed.facets() != p.facets();
    p.version = p.version.max(seed.version);
    if differs_from_seed {
        // The node's receivers saw the seed's facets at the seed's version: the merged state
        // must come with a higher one. (A change relative to the shared state bumps the version
        // once more in `apply`.)
        p.version += 1;
    }
    true
}

/// Who may see what of one user, as one viewer: the inputs of a projection besides the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sight {
    pub online: bool,
    pub exact_last_seen: bool,
    pub approx_last_seen: bool,
}

impl Sight {
    pub const ALL: Sight = Sight {
        online: true,
        exact_last_seen: true,
        approx_last_seen: false,
    };

    /// What a user viewer sees: `is_contact` of the viewed user; `own_last_seen` the viewer's
    /// own last_seen setting (reciprocity: who hides theirs cannot see others').
    pub fn of(privacy: &Privacy, is_contact: bool, own_last_seen: Visibility) -> Sight {
        let online = privacy.online.allows(is_contact);
        let exact_last_seen =
            privacy.last_seen.allows(is_contact) && own_last_seen.allows(is_contact);
        Sight {
            online,
            exact_last_seen,
            approx_last_seen: online && !exact_last_seen && privacy.approximate_last_seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        Arc::from(name)
    }

    fn dev(total: u32, active: u32) -> Devices {
        Devices {
            total,
            active,
            platforms: [total, 0, 0, 0],
        }
    }

    /// Applies ops from `by`, each a millisecond after the previous, and returns the outcomes.
    fn run(p: &mut Presence, by: &str, ops: &[Op]) -> Vec<Outcome> {
        let n = node(by);
        ops.iter()
            .enumerate()
            .map(|(i, op)| apply(p, op, &n, 1_000 + i as Millis))
            .collect()
    }

    fn devices(seq: u64, d: Devices) -> Op {
        Op::Devices {
            seq,
            devices: d,
            grace: None,
        }
    }

    #[test]
    fn a_device_makes_the_user_online_once_and_the_last_one_leaving_offline() {
        let mut p = Presence::default();
        let out = run(
            &mut p,
            "a",
            &[
                devices(1, dev(1, 1)),
                devices(2, dev(2, 2)),
                devices(3, dev(1, 1)),
            ],
        );
        assert_eq!(
            out.iter().map(|o| o.changed).collect::<Vec<_>>(),
            [true, false, false],
            "a second device and one of two leaving change nothing"
        );
        assert_eq!(
            (p.effective(), p.version, p.last_seen),
            (Status::Online, 1, Some(1_000))
        );
        run(&mut p, "a", &[devices(4, dev(0, 0))]);
        assert_eq!((p.effective(), p.version), (Status::Offline, 2));
        assert_eq!(
            (p.last_seen, p.last_offline, p.offline_version),
            (Some(1_000), Some(1_000), 1)
        );
    }

    #[test]
    fn devices_on_two_nodes_count_together_and_stale_reports_are_ignored() {
        let mut p = Presence::default();
        run(&mut p, "a", &[devices(5, dev(1, 1))]);
        run(&mut p, "b", &[devices(1, dev(1, 1))]);
        run(&mut p, "a", &[devices(6, dev(0, 0))]);
        assert_eq!(p.effective(), Status::Online, "node b still has a device");
        let stale = run(&mut p, "a", &[devices(5, dev(1, 1))]);
        assert!(
            !stale[0].changed && p.node("a").unwrap().devices.total == 0,
            "seq 5 is older than 6"
        );
    }

    #[test]
    fn a_grace_keeps_the_user_as_they_were_until_it_expires_at_the_disconnect_time() {
        let mut p = Presence::default();
        run(&mut p, "a", &[devices(1, dev(1, 1))]);
        let out = run(
            &mut p,
            "a",
            &[Op::Devices {
                seq: 2,
                devices: dev(0, 0),
                grace: Some(7),
            }],
        );
        assert!(!out[0].changed, "nothing changes during the grace");
        assert_eq!(p.effective(), Status::Online);
        let left_at = p.grace.as_ref().unwrap().since;
        assert!(
            !run(&mut p, "b", &[Op::Expire { token: 7 }])[0].changed,
            "only node a's timer ends it"
        );
        assert!(
            !run(&mut p, "a", &[Op::Expire { token: 6 }])[0].changed,
            "an older grace's timer does nothing"
        );
        assert!(run(&mut p, "a", &[Op::Expire { token: 7 }])[0].changed);
        assert_eq!(
            (p.effective(), p.last_seen),
            (Status::Offline, Some(left_at))
        );
    }

    #[test]
    fn a_device_returning_during_the_grace_cancels_it_without_a_change() {
        let mut p = Presence::default();
        run(&mut p, "a", &[devices(1, dev(1, 1))]);
        run(
            &mut p,
            "a",
            &[Op::Devices {
                seq: 2,
                devices: dev(0, 0),
                grace: Some(1),
            }],
        );
        let out = run(&mut p, "b", &[devices(1, dev(1, 1))]);
        assert!(!out[0].changed && p.grace.is_none());
        assert!(!run(&mut p, "a", &[Op::Expire { token: 1 }])[0].changed);
        assert_eq!(p.effective(), Status::Online);
    }

    #[test]
    fn auto_away_needs_every_device_idle_and_a_chosen_online() {
        let mut p = Presence::default();
        run(&mut p, "a", &[devices(1, dev(3, 3))]);
        let v = p.version;
        run(&mut p, "a", &[devices(2, dev(3, 1))]);
        assert_eq!(
            (p.effective(), p.version),
            (Status::Online, v),
            "one active device is enough"
        );
        run(&mut p, "a", &[devices(3, dev(3, 0))]);
        assert_eq!(p.effective(), Status::Away);
        assert_eq!(
            p.idle_since(),
            Some(1_000),
            "when the last device stopped being active"
        );
        run(&mut p, "a", &[devices(4, dev(3, 1))]);
        assert_eq!((p.effective(), p.idle_since()), (Status::Online, None));
        run(
            &mut p,
            "a",
            &[Op::Status(Status::Busy), devices(5, dev(3, 0))],
        );
        assert_eq!(
            p.effective(),
            Status::Busy,
            "a status chosen by hand is never changed"
        );
        assert_eq!(p.idle_since(), None);
        let v = p.version;
        run(&mut p, "a", &[Op::Status(Status::Online)]);
        assert_eq!((p.effective(), p.version), (Status::Away, v + 1));
        // (The second op of that run, at 1_001, made the devices idle.)
        assert_eq!(
            p.idle_since(),
            Some(1_001),
            "idle since the devices went idle, not since the choice"
        );
    }

    #[test]
    fn invisible_hides_platforms_and_activity() {
        let mut p = Presence::default();
        run(
            &mut p,
            "a",
            &[Op::Status(Status::Offline), devices(1, dev(1, 1))],
        );
        assert_eq!(
            (p.effective(), p.platforms(), p.connected()),
            (Status::Offline, PlatformSet::EMPTY, true)
        );
        let v = p.version;
        run(
            &mut p,
            "a",
            &[devices(2, Devices::one(Activity::Idle, Platform::Web))],
        );
        assert_eq!(p.version, v, "nothing anyone may see changed");
    }

    #[test]
    fn a_new_platform_is_a_change() {
        let mut p = Presence::default();
        run(
            &mut p,
            "a",
            &[devices(
                1,
                Devices::one(Activity::Active, Platform::Desktop),
            )],
        );
        let v = p.version;
        let mut both = Devices::one(Activity::Active, Platform::Desktop);
        both.add(&Devices::one(Activity::Active, Platform::Mobile));
        run(
            &mut p,
            "b",
            &[devices(1, Devices::one(Activity::Active, Platform::Mobile))],
        );
        assert_eq!(p.version, v + 1);
        assert_eq!(p.platforms(), both.platform_set());
    }

    #[test]
    fn a_dead_node_takes_its_devices_and_its_grace_with_it() {
        let mut p = Presence::default();
        run(&mut p, "a", &[devices(1, dev(1, 1))]);
        run(
            &mut p,
            "a",
            &[Op::Devices {
                seq: 2,
                devices: dev(0, 0),
                grace: Some(3),
            }],
        );
        let since = p.grace.as_ref().unwrap().since;
        let out = run(
            &mut p,
            "b",
            &[Op::DropNode {
                node: node("a"),
                at: 50_000,
            }],
        );
        assert!(out[0].changed && p.node("a").is_none());
        assert_eq!(
            p.last_seen,
            Some(since),
            "offline when the device left, not at the drop"
        );
        assert!(
            !run(
                &mut p,
                "b",
                &[Op::DropNode {
                    node: node("a"),
                    at: 60_000
                }]
            )[0]
            .changed,
            "dropping twice is harmless"
        );
    }

    #[test]
    fn custom_status_expires_only_if_it_is_still_the_same_one() {
        let mut p = Presence::default();
        let c = |at| {
            Some(Arc::new(CustomStatus {
                text: "x".into(),
                emoji: String::new(),
                expires_at: Some(at),
            }))
        };
        run(&mut p, "a", &[Op::Custom(c(5))]);
        run(&mut p, "a", &[Op::Custom(c(9))]);
        assert!(!run(&mut p, "a", &[Op::ExpireCustom { expires_at: 5 }])[0].changed);
        assert!(run(&mut p, "a", &[Op::ExpireCustom { expires_at: 9 }])[0].changed);
        assert_eq!(p.custom, None);
        assert!(
            !run(&mut p, "b", &[Op::ExpireCustom { expires_at: 9 }])[0].changed,
            "exactly once"
        );
    }

    #[test]
    fn reconciling_takes_the_newer_side_and_moves_above_both() {
        let mut shared = Presence::default();
        run(&mut shared, "a", &[devices(1, dev(1, 1))]);
        let mut local = shared.clone();
        // During an outage node b's user changed status locally (after the shared state's
        // privacy change below: the later choice wins); the shared state moved on too.
        local.chosen = Status::Busy;
        local.chosen_at = 2_000;
        local.version += 2;
        run(
            &mut shared,
            "a",
            &[Op::Privacy(Privacy {
                online: Visibility::Everyone,
                ..Privacy::default()
            })],
        );
        let out = apply(
            &mut shared,
            &Op::Reconcile(Box::new(local.clone())),
            &node("b"),
            5_000,
        );
        assert!(out.publish);
        assert_eq!(shared.chosen, Status::Busy, "the node's copy was newer");
        assert!(
            shared.version > local.version,
            "above what the node's receivers saw"
        );
    }

    #[test]
    fn reconciling_keeps_the_later_choice_whatever_the_versions() {
        let mut shared = Presence::default();
        run(&mut shared, "a", &[devices(1, dev(1, 1))]);
        let mut local = shared.clone();
        // Node b decided a status alone long ago, and bumped its copy's version many times;
        // the shared state's user chose later.
        local.chosen = Status::Away;
        local.chosen_at = 500;
        local.version += 10;
        apply(&mut shared, &Op::Status(Status::Busy), &node("a"), 3_000);
        apply(
            &mut shared,
            &Op::Reconcile(Box::new(local.clone())),
            &node("b"),
            4_000,
        );
        assert_eq!(
            (shared.chosen, shared.chosen_at),
            (Status::Busy, 3_000),
            "the later choice wins"
        );
        assert!(
            shared.version > local.version,
            "above what either side's receivers saw"
        );
    }
}
