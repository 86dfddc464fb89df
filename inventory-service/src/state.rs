//! What every request handler can reach.

use std::sync::Arc;
use std::time::Duration;

use crate::store::InventoryStore;

/// Shared, cheaply cloned request state.
#[derive(Clone)]
pub struct AppState {
    /// Stock and reservations.
    pub store: Arc<dyn InventoryStore>,
    /// How long a new reservation holds its units.
    pub reservation_ttl: Duration,
    /// Below this many available units a reservation logs "low stock".
    pub low_stock_threshold: i64,
}
