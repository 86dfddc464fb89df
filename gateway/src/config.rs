//! The gateway's settings, read from the environment in one function.

use std::time::Duration;

use shared::admission::AdmissionSettings;
use shared::client::ClientConfig;
use shared::config::{ConfigError, Env};
use subtle::ConstantTimeEq;

use crate::rate_limit::RateLimitSettings;

/// The admin key used when `ADMIN_API_KEY` is unset: convenient for `docker compose up` and curl,
/// and therefore logged as a warning at startup, because anyone who has read the README knows it.
pub const DEFAULT_ADMIN_API_KEY: &str = "dev-admin-key";

/// Everything the gateway reads from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Interface to listen on (`HOST`).
    pub host: String,
    /// Port to listen on (`PORT`, 8080; tests use 0).
    pub port: u16,
    /// The edge budget every request gets (`REQUEST_BUDGET_MS`); see [`Settings::from_env`].
    pub request_budget: Duration,
    /// The listener's bounds and the concurrency limit (`HTTP_*`, `ADMISSION_*`).
    pub admission: AdmissionSettings,
    /// The key that `PUT /api/prices/{sku}` requires in `x-api-key` (`ADMIN_API_KEY`).
    pub admin_api_key: AdminApiKey,
    /// Per-client rate limits (`RATE_LIMIT_*`).
    pub rate_limit: RateLimitSettings,
    /// The order-service client (`ORDER_URL` and the shared `HTTP_*`/`BREAKER_*` tunables).
    pub order: ClientConfig,
    /// The inventory-service client (`INVENTORY_URL`).
    pub inventory: ClientConfig,
    /// The pricing-service client (`PRICING_URL`).
    pub pricing: ClientConfig,
}

impl Settings {
    /// Reads the settings, with defaults that work under compose.
    ///
    /// # Errors
    /// Returns [`ConfigError`] for a variable that is set but unusable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        // 5 s at the edge: placing an order is the longest path (price every line, reserve every
        // line, store, each hop allowed one retry), which takes milliseconds when healthy and at
        // most a couple of attempt timeouts when a dependency struggles. 5 s covers that while
        // staying far below the 30–60 s after which browsers, curl scripts and load balancers give
        // up on their own, so a client always gets our 504 problem rather than a dropped socket.
        let request_budget = env.millis_or("REQUEST_BUDGET_MS", Duration::from_secs(5))?;
        if request_budget.is_zero() {
            return Err(ConfigError {
                key: "REQUEST_BUDGET_MS".to_owned(),
                value: "0".to_owned(),
                reason: "a zero budget would time out every request".to_owned(),
            });
        }
        let mut order = ClientConfig::from_env("order", env, "ORDER_URL", "http://order:4001")?;
        // Placing an order is itself a chain of calls with their own attempt timeouts and retries
        // (order → pricing, inventory). Cutting order-service's attempt at the same 2 s would cut
        // its retries short, and its own timeouts would never count against its breakers (a
        // timeout cut short by the deadline says nothing about the dependency). So the gateway
        // gives each attempt at order-service the whole edge budget: the hop's timeout sits
        // inside its caller's, never equal to it.
        order.attempt_timeout = order.attempt_timeout.max(request_budget);
        let inventory =
            ClientConfig::from_env("inventory", env, "INVENTORY_URL", "http://inventory:4002")?;
        let pricing = ClientConfig::from_env("pricing", env, "PRICING_URL", "http://pricing:4003")?;
        Ok(Self {
            admission: AdmissionSettings::from_env(env)?,
            rate_limit: RateLimitSettings::from_env(env)?,
            host: env.string_or("HOST", "0.0.0.0"),
            port: env.parse_or("PORT", 8080)?,
            request_budget,
            admin_api_key: AdminApiKey::new(env.string_or("ADMIN_API_KEY", DEFAULT_ADMIN_API_KEY)),
            order,
            inventory,
            pricing,
        })
    }
}

/// The admin API key. Its `Debug` output is redacted so settings can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminApiKey(String);

impl AdminApiKey {
    /// Wraps `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Whether this is the well-known development default.
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_ADMIN_API_KEY
    }

    /// Whether `presented` is the key, compared in constant time so response timing does not
    /// reveal how many leading bytes of a guess were right. (The length is not hidden: keys of a
    /// different length are rejected at once, which tells an attacker nothing about the content.)
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl std::fmt::Debug for AdminApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_key_matches_only_itself_and_never_prints() {
        let key = AdminApiKey::new("s3cret");
        assert!(key.matches(b"s3cret"));
        assert!(!key.matches(b"s3cres"));
        assert!(!key.matches(b"s3cret "));
        assert!(!key.matches(b""));
        assert!(!format!("{key:?}").contains("s3cret"));
    }

    #[test]
    fn a_zero_request_budget_is_rejected() {
        let env = Env::from_pairs([("REQUEST_BUDGET_MS", "0")]);
        let err = Settings::from_env(&env).expect_err("must fail");
        assert_eq!(err.key, "REQUEST_BUDGET_MS");
    }
}
