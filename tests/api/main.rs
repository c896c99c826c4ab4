//! Integration tests of the presence server: each test starts the real server from the library
//! (its own SQLite file, 127.0.0.1:0) and talks to it with the generated gRPC clients.
//!
//! - `presence_rules`: the rules of presence (issue 2): devices, statuses, last_seen, versions;
//! - `fan_out`: who receives what, contacts, watchers, slow receivers;
//! - `queries`: GetPresence, GetStats, ListContacts, health;
//! - `bad_input`: every refusal, and that it changed nothing;
//! - `durability`: persistence, graceful shutdown, the reconnect race;
//! - `auth`: signed identities (issue 3);
//! - `privacy`: privacy settings on every read and push path (issue 3);
//! - `limits`: abuse limits (issue 3);
//! - `wire`: Authenticate as a raw HTTP/2 client sees it (framing, headers, trailers).
mod auth;
mod bad_input;
mod custom_status;
mod devices;
mod durability;
mod fan_out;
mod hardening;
mod helpers;
mod limits;
mod presence_rules;
mod privacy;
mod queries;
mod relay;
mod wire;
