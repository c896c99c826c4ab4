//! Cluster tests (issue 6): several real `presence serve` processes sharing one Redis behave
//! as one server.
//!
//! Each test starts its nodes from the built binary on port 0, on one shared database (a SQLite
//! file, or MySQL in `shared_database`), under a Redis key prefix of their own (so runs and
//! tests never collide), with a 2 s node lease and no anti-flap grace. Redis is the machine's (`PRESENCE_TEST_REDIS_URL` overrides);
//! the outage test starts a `redis-server` of its own so it can stop it. Without Redis the tests
//! fail, saying how to start one; built with `PRESENCE_TEST_REDIS=off` they are listed as
//! ignored (never counted as passed). Tests take turns, wait for the
//! events they expect with timeouts, and print what they measure
//! (`cargo test --test cluster -- --nocapture`).
//!
//! Every receiver checks, for the whole test, that the versions it gets of each user strictly
//! increase (see the common `Inbox`), whichever node made the change.
//!
//! - `devices`: devices of one user on two nodes, seen once online and once offline;
//! - `features`: auto-away and platforms across nodes, a passive device's resync, a node dying
//!   with a passive device, a custom status expiring once after its node was killed;
//! - `contacts`: contact changes under concurrent status changes, seen on every node;
//! - `fan_out`: each update reaches a contact on another node once, in order; every node
//!   answers GetPresence the same;
//! - `node_death`: kill -9 a node: its users go offline once, within TTL + 5 s; no ghosts after
//!   a restart;
//! - `reaping`: 10,000 users of a killed node reaped once, nothing left in Redis; a reaper
//!   killed halfway taken over;
//! - `pause`: SIGSTOP a node past its lease, SIGCONT it: the cluster converges;
//! - `redis_outage`: Redis stopped and restarted empty: streams stay open, local fan-out goes
//!   on, health says so, and the nodes converge when it is back, changes made on different
//!   nodes meanwhile included;
//! - `shared_database`: nodes on one MySQL database touch only their own users' rows.
//!
//! `TEST_NODE_LOG=presence=debug` sets the nodes' log filter; a failing test prints the end of
//! each node's log.
mod clients;
mod contacts;
mod devices;
mod failover;
mod fan_out;
mod features;
mod harness;
mod node_death;
mod pause;
mod reaping;
mod redis_outage;
mod shared_database;
mod topology;
