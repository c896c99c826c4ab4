//! presence: a gRPC presence service.
//!
//! The rooms, from the inside out:
//! - [`domain`]: validated types (user ids, statuses, privacy) shared by every layer;
//! - [`rules`]: the status rules, pure: one implementation (the cluster's Redis script mirrors
//!   it, checked by a conformance test);
//! - [`engine`]: the presence engine: connection registry, privacy projection, fan-out to
//!   subscribers, write-behind to the store. Knows nothing of gRPC, SQL or Redis;
//! - [`cluster`]: the backplane several nodes share (Redis, or memory for tests);
//! - [`store`]: the store trait and its SQLite and MySQL backends (all SQL lives there);
//! - [`auth`]: verified identities (JWT) and the development mode;
//! - [`grpc`]: the thin adapter: proto ⇄ domain, identity, limits, error mapping;
//! - [`server`]: the assembly: listeners, health, reflection, shutdown; [`settings`] and
//!   [`telemetry`] feed it.
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod domain;
pub mod engine;
pub mod grpc;
pub mod rules;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;

/// The generated protobuf types, server and client of `presence.v1`.
pub mod pb {
    tonic::include_proto!("presence.v1");

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/presence_descriptor.bin"));
}
