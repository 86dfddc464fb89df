//! What every request handler can reach.

use std::sync::Arc;

use shared::outbox::OutboxRelay;

use crate::store::PriceStore;

/// Shared, cheaply cloned request state.
#[derive(Clone)]
pub struct AppState {
    /// Prices and sales counters.
    pub store: Arc<dyn PriceStore>,
    /// Woken after a price change commits, so `price.changed` goes out at once.
    pub relay: OutboxRelay,
}
