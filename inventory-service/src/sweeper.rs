//! The reservation sweeper: gives back the units of reservations nobody committed in time, so a
//! crash between reserving and placing an order leaks no stock.
//!
//! On PostgreSQL every replica runs one; the store's `expire_due` is a single statement that
//! expires each reservation once however many sweep at the same moment.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::MissedTickBehavior;

use crate::store::InventoryStore;

/// Expires due reservations every `interval`, forever (run it under
/// [`shared::server::spawn_until`] to stop it).
pub async fn run(store: Arc<dyn InventoryStore>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    // After a stall (a long database lock), sweep once and carry on; catching up with a burst of
    // sweeps would find nothing more to do.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match store.expire_due(OffsetDateTime::now_utc()).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired reservations released"),
            // The next tick tries again; a failing database also shows in readiness.
            Err(error) => tracing::warn!(%error, "sweeping expired reservations failed"),
        }
    }
}
