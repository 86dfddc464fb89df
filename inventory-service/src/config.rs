//! Inventory's settings, read from the environment in one place.

use std::time::Duration;

use shared::admission::AdmissionSettings;
use shared::config::{ConfigError, Env};
use shared::db::DbSettings;
use shared::messaging::MessagingSettings;

/// Everything inventory-service needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HOST`, default `0.0.0.0`.
    pub host: String,
    /// `PORT`, default 4002 (0 picks a free port, which tests use).
    pub port: u16,
    /// `DATABASE_URL` (default `sqlite://data/inventory.db`; `postgres://…` for a database
    /// several replicas share) and `SQLITE_SYNCHRONOUS`.
    pub database: DbSettings,
    /// `REQUEST_BUDGET_MS`: the budget of a request whose caller sent none.
    pub request_budget: Duration,
    /// The listener's bounds and the concurrency limit (`HTTP_*`, `ADMISSION_*`).
    pub admission: AdmissionSettings,
    /// The broker connection.
    pub messaging: MessagingSettings,
    /// `RESERVATION_TTL_MS`: how long a reservation holds stock without being committed.
    pub reservation_ttl: Duration,
    /// How often the sweeper looks for expired reservations (derived from the TTL).
    pub sweep_interval: Duration,
    /// `LOW_STOCK_THRESHOLD`: a reservation leaving fewer units available logs a warning.
    pub low_stock_threshold: i64,
}

/// Ten minutes: far longer than placing an order takes (a few hundred milliseconds even with
/// retries), short enough that stock held by a crashed order-service comes back the same hour.
const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(600);

/// A caller that sends no deadline still gets an answer in bounded time; 5 s matches the
/// gateway's edge budget, so a direct call is never allowed more than a call through the edge.
const DEFAULT_REQUEST_BUDGET: Duration = Duration::from_secs(5);

/// Low-stock warnings below five units: the smallest seeded stock (three hoodies) starts low.
const DEFAULT_LOW_STOCK_THRESHOLD: i64 = 5;

impl Settings {
    /// Reads the settings.
    ///
    /// # Errors
    /// [`ConfigError`] for a malformed variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let reservation_ttl = env.millis_or("RESERVATION_TTL_MS", DEFAULT_RESERVATION_TTL)?;
        if reservation_ttl.is_zero() {
            return Err(ConfigError {
                key: "RESERVATION_TTL_MS".to_owned(),
                value: "0".to_owned(),
                reason: "a reservation must live for some time".to_owned(),
            });
        }
        Ok(Self {
            admission: AdmissionSettings::from_env(env)?,
            host: env.string_or("HOST", "0.0.0.0"),
            port: env.parse_or("PORT", 4002)?,
            database: DbSettings::from_env(env, crate::SERVICE)?,
            request_budget: env.millis_or("REQUEST_BUDGET_MS", DEFAULT_REQUEST_BUDGET)?,
            messaging: MessagingSettings::from_env(env)?,
            reservation_ttl,
            sweep_interval: sweep_interval_for(reservation_ttl),
            low_stock_threshold: env
                .parse_or("LOW_STOCK_THRESHOLD", DEFAULT_LOW_STOCK_THRESHOLD)?,
        })
    }
}

/// A tenth of the TTL, between 100 ms and 30 s: a reservation then outlives its TTL by at most
/// 10% (30 s at the default ten minutes), each sweep is one indexed query so sweeping that often
/// costs nothing, and the floor keeps a tiny test TTL from spinning the sweeper.
pub fn sweep_interval_for(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweeper_runs_at_a_tenth_of_the_ttl_within_bounds() {
        assert_eq!(
            sweep_interval_for(Duration::from_secs(600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            sweep_interval_for(Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        assert_eq!(
            sweep_interval_for(Duration::from_millis(50)),
            Duration::from_millis(100)
        );
    }
}
