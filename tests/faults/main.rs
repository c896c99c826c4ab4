//! Fault tests (issue 7): dead peers, flapping networks, kill -9, database outages, concurrent
//! flushes on MySQL, shutdown under load and mass reconnects. Nobody stuck online, nothing lost.
//!
//! Each test starts its own server, either in-process through `Application` (port 0, a
//! temporary SQLite file, timings shrunk through the settings) or as a real `presence serve`
//! process when it needs kill -9. Everything runs on loopback and is bounded in time; the tests
//! wait for the events they expect, and measure what the issue asks to be reported (printed on
//! stderr: `cargo test --test faults -- --nocapture` shows the figures).
//!
//! - `dead_peers`: a device behind a proxy that stops forwarding (no FIN, no RST);
//! - `grace`: anti-flap grace, and last_seen still the real disconnect time;
//! - `crash`: kill -9: honest last_seen from checkpoints, versions that never go backwards;
//! - `outage`: the database down under a running server, and at start-up;
//! - `deadlock`: two servers flushing overlapping users on one MySQL database;
//! - `shutdown`: graceful shutdown with 2000 open streams and a client that never reads;
//! - `reconnect`: 2000 devices dropped and reopened at once, and the admission refusal path.
mod crash;
mod dead_peers;
mod deadlock;
mod faulty_store;
mod grace;
mod harness;
mod hostile;
mod outage;
mod proxy;
mod reconnect;
mod shutdown;
