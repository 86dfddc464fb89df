//! What every handler shares: one client per dependency, built once, and the admin key.

use shared::client::ResilientClient;

use crate::config::AdminApiKey;

/// The gateway's shared state. Cloning is cheap: clients share their pool, breaker and budget.
#[derive(Debug, Clone)]
pub struct AppState {
    /// order-service.
    pub order: ResilientClient,
    /// inventory-service.
    pub inventory: ResilientClient,
    /// pricing-service.
    pub pricing: ResilientClient,
    /// The key admin routes require.
    pub admin_api_key: AdminApiKey,
}
