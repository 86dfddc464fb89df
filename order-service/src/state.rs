//! What every handler can reach.

use std::sync::Arc;

use shared::outbox::OutboxRelay;

use crate::placement::OrderPlacement;
use crate::store::OrderRepository;

/// Shared by all handlers; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Orders as stored.
    pub orders: Arc<dyn OrderRepository>,
    /// The place-order flow.
    pub placement: OrderPlacement,
    /// Woken after a transaction that enqueued an event.
    pub relay: OutboxRelay,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("placement", &self.placement)
            .finish_non_exhaustive()
    }
}
