//! Pricing's settings, read from the environment in one place.

use std::time::Duration;

use shared::admission::AdmissionSettings;
use shared::config::{ConfigError, Env};
use shared::db::DbSettings;
use shared::messaging::MessagingSettings;

/// Everything pricing-service needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HOST`, default `0.0.0.0`.
    pub host: String,
    /// `PORT`, default 4003 (0 picks a free port, which tests use).
    pub port: u16,
    /// `DATABASE_URL` (default `sqlite://data/pricing.db`) and `SQLITE_SYNCHRONOUS`.
    pub database: DbSettings,
    /// `REQUEST_BUDGET_MS`: the budget of a request whose caller sent none.
    pub request_budget: Duration,
    /// The listener's bounds and the concurrency limit (`HTTP_*`, `ADMISSION_*`).
    pub admission: AdmissionSettings,
    /// The broker connection.
    pub messaging: MessagingSettings,
}

/// A caller that sends no deadline still gets an answer in bounded time; 5 s matches the
/// gateway's edge budget, so a direct call is never allowed more than a call through the edge.
const DEFAULT_REQUEST_BUDGET: Duration = Duration::from_secs(5);

impl Settings {
    /// Reads the settings.
    ///
    /// # Errors
    /// [`ConfigError`] for a malformed variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            admission: AdmissionSettings::from_env(env)?,
            host: env.string_or("HOST", "0.0.0.0"),
            port: env.parse_or("PORT", 4003)?,
            database: DbSettings::from_env(env, crate::SERVICE)?,
            request_budget: env.millis_or("REQUEST_BUDGET_MS", DEFAULT_REQUEST_BUDGET)?,
            messaging: MessagingSettings::from_env(env)?,
        })
    }
}
