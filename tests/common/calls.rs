//! Who calls, and the small messages every suite sends: shared by the API, fault and cluster
//! suites (`#[path]`-included: each test binary compiles its own copy, and not every suite uses
//! every helper).
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use presence::domain::UserId;
use presence::pb::{self, client_message};
use tonic::Request;
use tonic::metadata::MetadataValue;

/// How long a test waits for what it expects before failing.
pub const WAIT: Duration = Duration::from_secs(5);

/// The service name test callers present.
pub const SERVICE: &str = "chat";

/// Who makes a call: the metadata it carries.
#[derive(Clone, Debug)]
pub struct Caller {
    metadata: Vec<(&'static str, String)>,
}

/// A user, in development mode.
pub fn user(id: u64) -> Caller {
    Caller {
        metadata: vec![("x-presence-user-id", id.to_string())],
    }
}

/// A service, in development mode: sees everyone with the `connected` flag, manages contacts,
/// reads stats.
pub fn service() -> Caller {
    Caller {
        metadata: vec![("x-presence-service", SERVICE.to_string())],
    }
}

/// A service acting for a user, in development mode.
pub fn service_for(id: u64) -> Caller {
    service().acting_for(id)
}

/// Nobody: no identity at all.
pub fn anonymous() -> Caller {
    Caller {
        metadata: Vec::new(),
    }
}

/// A caller presenting a token (JWT mode).
pub fn bearer(token: &str) -> Caller {
    authorization(&format!("Bearer {token}"))
}

/// A caller sending this exact `authorization` value.
pub fn authorization(value: &str) -> Caller {
    Caller {
        metadata: vec![("authorization", value.to_string())],
    }
}

impl Caller {
    /// The same caller, also naming a user it acts for.
    pub fn acting_for(self, id: u64) -> Caller {
        self.with("x-presence-user-id", &id.to_string())
    }

    /// The same caller with one more metadata entry.
    pub fn with(mut self, name: &'static str, value: &str) -> Caller {
        self.metadata.push((name, value.to_string()));
        self
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        for (name, value) in &self.metadata {
            request.metadata_mut().insert(
                *name,
                MetadataValue::try_from(value.as_str()).expect("test metadata is ASCII"),
            );
        }
        request
    }
}

pub fn uid(id: u64) -> UserId {
    UserId::parse(id).expect("test user ids are positive")
}

pub fn hello(device: &str) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::Hello(pb::Hello {
            device: device.to_string(),
            ..Default::default()
        })),
    }
}

/// A hello naming the device's platform.
pub fn hello_on(device: &str, platform: pb::Platform) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::Hello(pb::Hello {
            device: device.to_string(),
            platform: platform as i32,
        })),
    }
}

/// A device's activity change.
pub fn activity(a: pb::Activity) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::SetActivity(pb::SetActivity {
            activity: a as i32,
        })),
    }
}

pub fn ping(nonce: u64) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::Ping(pb::Ping { nonce })),
    }
}

/// An update_status on a device stream (the status as sent on the wire, so a test can send
/// values the enum does not have).
pub fn status_message(status: impl Into<i32>) -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(client_message::Kind::UpdateStatus(
            pb::UpdateStatusRequest {
                status: status.into(),
            },
        )),
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

pub fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// last_seen in milliseconds, if set.
pub fn last_seen(p: &pb::UserPresence) -> Option<i64> {
    p.last_seen.as_ref().map(millis)
}

/// A port nobody listens on right now (the kernel's pick for port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("the kernel hands out a free loopback port")
        .port()
}

/// Asserts a call failed with `code` and a message containing each of `words`.
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    words: &[&str],
    why: &str,
) -> tonic::Status {
    let status = match result {
        Ok(v) => panic!("expected {code:?} ({why}), got success: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{why}: {status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "{why}: the message should name {w:?}: {:?}",
            status.message()
        );
    }
    status
}

static TRACING: std::sync::Once = std::sync::Once::new();

/// Logs of servers run in the test's process, on stderr, when `TEST_LOG` is set (filter:
/// `RUST_LOG`, default `presence=debug`); silent otherwise.
pub fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "presence=debug".into()),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}
