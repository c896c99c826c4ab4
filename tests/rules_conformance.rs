//! The status rules exist once in Rust (`src/rules.rs`) and once as the Lua script Redis runs
//! in cluster mode (`src/cluster/transition.lua`). This suite runs the same random operation
//! sequences through both, two nodes taking turns, and compares after every operation what each
//! returns: the whole state (devices per node, grace, versions, timestamps, custom status…)
//! and whether it changed and must be published. Any drift between the two fails here.
//!
//! Needs Redis (`PRESENCE_TEST_REDIS_URL`, default the machine's); without one it fails, and
//! built with `PRESENCE_TEST_REDIS=off` it is listed as ignored.
use std::sync::Arc;
use std::time::Duration;

use presence::cluster::redis::{RedisBackplane, RedisConfig};
use presence::cluster::{Backplane, Transition};
use presence::domain::{CustomStatus, Millis, Platform, Privacy, Status, UserId, Visibility};
use presence::rules::{self, Devices, NodeId, Op, Outcome, Presence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEQUENCES: u64 = 300;
const OPS_PER_SEQUENCE: usize = 40;

fn redis_url() -> String {
    let url = std::env::var("PRESENCE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if let Err(e) = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
    {
        panic!(
            "no Redis at {url} ({e}): start one or set PRESENCE_TEST_REDIS_URL; to leave this \
             suite out, build the tests with PRESENCE_TEST_REDIS=off (it is then listed as \
             ignored)"
        );
    }
    url
}

/// What each side's node knows when it makes an operation: its own sequence numbers and the
/// grace tokens it started.
struct NodeState {
    id: NodeId,
    seq: u64,
    tokens: Vec<u64>,
}

fn devices(rng: &mut StdRng) -> Devices {
    let total = rng.random_range(0..=3u32);
    let mut d = Devices {
        total,
        active: rng.random_range(0..=total),
        platforms: [0; 4],
    };
    for _ in 0..total {
        d.platforms[rng.random_range(0..4usize)] += 1;
    }
    d
}

fn status(rng: &mut StdRng) -> Status {
    [Status::Online, Status::Away, Status::Busy, Status::Offline][rng.random_range(0..4usize)]
}

fn visibility(rng: &mut StdRng) -> Visibility {
    [
        Visibility::Everyone,
        Visibility::Contacts,
        Visibility::Nobody,
    ][rng.random_range(0..3usize)]
}

fn custom(rng: &mut StdRng, now: Millis) -> Option<Arc<CustomStatus>> {
    match rng.random_range(0..4) {
        0 => None,
        1 => Some(Arc::new(CustomStatus {
            text: "In a meeting | \"quoted\" \\ \u{1F4C5} 会議".into(),
            emoji: ":calendar:".into(),
            expires_at: Some(now + rng.random_range(1..5_000)),
        })),
        2 => Some(Arc::new(CustomStatus {
            text: String::new(),
            emoji: "🏖️".into(),
            expires_at: None,
        })),
        _ => Some(Arc::new(CustomStatus {
            text: "Focus".into(),
            emoji: String::new(),
            expires_at: Some(now + 10),
        })),
    }
}

/// A random operation by `node` at `now`, given the current state (so that expiries and
/// graces sometimes hit).
fn op(
    rng: &mut StdRng,
    node: &mut NodeState,
    other: &NodeId,
    current: &Presence,
    now: Millis,
) -> Op {
    match rng.random_range(0..10) {
        0..=3 => {
            // Mostly newer reports, sometimes a stale one.
            if rng.random_bool(0.9) {
                node.seq += rng.random_range(1..3);
            }
            let grace = rng.random_bool(0.4).then(|| {
                let t = rng.random_range(1..1_000_000);
                node.tokens.push(t);
                t
            });
            Op::Devices {
                seq: node.seq.saturating_sub(u64::from(rng.random_bool(0.05))),
                devices: devices(rng),
                grace,
            }
        }
        4 => Op::Expire {
            token: match (current.grace.as_ref(), rng.random_bool(0.7)) {
                (Some(g), true) => g.token,
                _ => node.tokens.last().copied().unwrap_or(1),
            },
        },
        5 => Op::Status(status(rng)),
        6 => Op::Privacy(Privacy {
            online: visibility(rng),
            last_seen: visibility(rng),
            approximate_last_seen: rng.random_bool(0.5),
        }),
        7 => {
            if rng.random_bool(0.5) {
                Op::Custom(custom(rng, now))
            } else {
                Op::ExpireCustom {
                    expires_at: current
                        .custom
                        .as_ref()
                        .and_then(|c| c.expires_at)
                        .filter(|_| rng.random_bool(0.7))
                        .unwrap_or(now),
                }
            }
        }
        8 if rng.random_bool(0.2) => Op::Touch,
        8 => Op::DropNode {
            node: other.clone(),
            at: now - rng.random_range(0..100),
        },
        _ => {
            // The node's own copy after changes of its own while the backplane was away.
            let mut own = current.clone();
            own.chosen = status(rng);
            own.version += rng.random_range(0..3);
            if rng.random_bool(0.5) {
                own.last_seen = Some(now - 50);
            }
            node.seq += 1;
            own.nodes.retain(|n| n.node == node.id);
            own.nodes = vec![rules::NodeDevices {
                node: node.id.clone(),
                seq: node.seq,
                devices: devices(rng),
            }];
            Op::Reconcile(Box::new(own))
        }
    }
}

/// A seed: what a node knows of the user when the backplane has nothing.
fn seed(rng: &mut StdRng, now: Millis) -> Presence {
    Presence {
        chosen: status(rng),
        last_seen: rng.random_bool(0.5).then_some(now - 10_000),
        last_offline: rng.random_bool(0.5).then_some(now - 20_000),
        version: rng.random_range(0..10),
        offline_version: rng.random_range(0..3),
        privacy: Privacy {
            online: visibility(rng),
            last_seen: visibility(rng),
            approximate_last_seen: rng.random_bool(0.5),
        },
        custom: custom(rng, now),
        ..Presence::default()
    }
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn the_lua_script_and_the_rust_rules_agree_on_every_operation() {
    let url = redis_url();
    let prefix = format!(
        "conformance-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let config = RedisConfig {
        target: presence::cluster::redis::RedisTarget::Single(url.clone()),
        wait_replicas: 0,
        prefix: prefix.clone(),
        lease_ttl: Duration::from_secs(10),
        idle_ttl: Duration::from_secs(60),
    };
    let ids: [NodeId; 2] = [Arc::from("n1"), Arc::from("n2")];
    let backplanes = [
        RedisBackplane::connect(ids[0].clone(), config.clone())
            .await
            .expect("Redis answers"),
        RedisBackplane::connect(ids[1].clone(), config.clone())
            .await
            .expect("Redis answers"),
    ];
    let mut checked = 0usize;
    for sequence in 0..SEQUENCES {
        let mut rng = StdRng::seed_from_u64(sequence);
        let user = UserId::parse(sequence + 1).expect("a positive id");
        let mut nodes = ids
            .iter()
            .map(|id| NodeState {
                id: id.clone(),
                seq: 0,
                tokens: Vec::new(),
            })
            .collect::<Vec<_>>();
        let mut rust: Option<Presence> = None;
        let mut now: Millis = 1_800_000_000_000;
        let mut history = Vec::new();
        for _ in 0..OPS_PER_SEQUENCE {
            now += rng.random_range(0..2_000);
            let who = rng.random_range(0..2usize);
            let other = ids[1 - who].clone();
            let current = rust.clone().unwrap_or_default();
            let op = op(&mut rng, &mut nodes[who], &other, &current, now);
            let seed = seed(&mut rng, now);
            history.push((ids[who].clone(), op.clone()));

            let expected: Option<(Presence, Outcome)> = match (&mut rust, &op) {
                (None, Op::DropNode { .. } | Op::Expire { .. }) => None,
                (state, _) => {
                    let start = match &op {
                        Op::Reconcile(own) => own.as_ref(),
                        _ => &seed,
                    };
                    let p = state.get_or_insert_with(|| start.seed_of(&ids[who]));
                    let outcome = rules::apply(p, &op, &ids[who], now);
                    Some((p.clone(), outcome))
                }
            };
            let got = backplanes[who]
                .transition(vec![Transition {
                    user,
                    op: op.clone(),
                    seed: seed.clone(),
                    at: now,
                }])
                .await
                .expect("the script runs")
                .pop()
                .expect("one result per transition");
            assert_eq!(
                got,
                expected,
                "sequence {sequence}, operation {} by {}: the script and the rules differ.\nhistory: {history:#?}",
                history.len(),
                ids[who]
            );
            checked += 1;
        }
    }
    // Clean up: every user hash and the nodes' user sets.
    let client = redis::Client::open(url.as_str()).expect("a valid URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
    assert_eq!(checked, (SEQUENCES as usize) * OPS_PER_SEQUENCE);
    let _ = Platform::Web;
}
