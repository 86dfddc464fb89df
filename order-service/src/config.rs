//! Order-service's settings, read from the environment in one place.

use std::time::Duration;

use shared::admission::AdmissionSettings;
use shared::client::ClientConfig;
use shared::config::{ConfigError, Env};
use shared::db::DbSettings;
use shared::messaging::MessagingSettings;

/// Everything order-service needs to start. Tests build it directly (for example with a
/// shortened client timeout or breaker open time) instead of touching the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HOST`, default `0.0.0.0`.
    pub host: String,
    /// `PORT`, default 4001 (0 picks a free port, which tests use).
    pub port: u16,
    /// `DATABASE_URL` (default `sqlite://data/order.db`) and `SQLITE_SYNCHRONOUS`.
    pub database: DbSettings,
    /// `REQUEST_BUDGET_MS`: the budget of a request whose caller sent none, and the cap on one
    /// that did.
    pub request_budget: Duration,
    /// The listener's bounds and the concurrency limit (`HTTP_*`, `ADMISSION_*`).
    pub admission: AdmissionSettings,
    /// The broker connection.
    pub messaging: MessagingSettings,
    /// The pricing client (`PRICING_URL` and the `HTTP_*` / `BREAKER_*` tunables).
    pub pricing: ClientConfig,
    /// The inventory client (`INVENTORY_URL` and the same tunables).
    pub inventory: ClientConfig,
}

/// A caller that sends no deadline still gets an answer in bounded time; 5 s matches the
/// gateway's edge budget, so a direct call is never allowed more than a call through the edge.
const DEFAULT_REQUEST_BUDGET: Duration = Duration::from_secs(5);

/// Pricing answers a one-row lookup in well under a millisecond, and a line can be priced from
/// the cache instead, so a price attempt gets 500 ms rather than the general 2 s: two full
/// attempts fit in the lookup budget (`placement.rs`), which lets a hanging pricing trip the
/// breaker (only full attempts count) and fall back to the cache within about a second.
const PRICING_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

impl Settings {
    /// Reads the settings.
    ///
    /// # Errors
    /// [`ConfigError`] for a malformed variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mut pricing =
            ClientConfig::from_env("pricing", env, "PRICING_URL", "http://pricing:4003")?;
        pricing.attempt_timeout = pricing.attempt_timeout.min(PRICING_ATTEMPT_TIMEOUT);
        Ok(Self {
            admission: AdmissionSettings::from_env(env)?,
            host: env.string_or("HOST", "0.0.0.0"),
            port: env.parse_or("PORT", 4001)?,
            database: DbSettings::from_env(env, crate::SERVICE)?,
            request_budget: env.millis_or("REQUEST_BUDGET_MS", DEFAULT_REQUEST_BUDGET)?,
            messaging: MessagingSettings::from_env(env)?,
            pricing,
            inventory: ClientConfig::from_env(
                "inventory",
                env,
                "INVENTORY_URL",
                "http://inventory:4002",
            )?,
        })
    }
}
