//! A presence update as receivers queue it: one allocation for every receiver that sees a change
//! alike, with a slot for the transport's encoding of it.
//!
//! A change of a user with 50 watchers reaches them through two or three distinct views (what a
//! contact sees, what the user's own devices see…). Fan-out projects once per view and queues
//! the same [`Update`] for each receiver of it; the first stream to send it encodes it and the
//! others reuse those bytes. Queues hold a pointer instead of a view.
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::domain::PresenceView;

#[derive(Debug)]
pub struct Update {
    view: PresenceView,
    wire: OnceLock<Bytes>,
}

impl Update {
    pub fn new(view: PresenceView) -> Arc<Update> {
        Arc::new(Update {
            view,
            wire: OnceLock::new(),
        })
    }

    pub fn view(&self) -> &PresenceView {
        &self.view
    }

    /// The update's encoding on the wire, made by `encode` the first time it is asked for.
    /// Every caller must ask for the same encoding: the gRPC layer's framed
    /// `presence_updated` message, which is the same bytes on every stream that carries one.
    pub fn wire(&self, encode: impl FnOnce(&PresenceView) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(&self.view)).clone()
    }
}

impl PartialEq for Update {
    fn eq(&self, other: &Update) -> bool {
        self.view == other.view
    }
}

impl Eq for Update {}
