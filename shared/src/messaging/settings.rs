//! Broker settings, read from the environment once at startup.

use std::time::Duration;

use crate::config::{ConfigError, Env};

/// Broker settings, read from the environment.
#[derive(Debug, Clone)]
pub struct MessagingSettings {
    /// `AMQP_URL`, default `amqp://guest:guest@rabbitmq:5672/%2f`.
    pub amqp_url: String,
    /// `EVENTS_NAMESPACE`, default empty: a prefix for every exchange and queue name, so tests
    /// (and several stacks on one broker) stay isolated.
    pub namespace: String,
    /// Unacked deliveries per consumer (the consumer applies up to half of them as one batch).
    pub prefetch: u16,
    /// Delayed retries before a failing message goes to the DLQ (a message is handled at most
    /// `1 + max_retries` times).
    pub max_retries: u32,
    /// Delay of one retry (the retry queue's TTL).
    pub retry_delay: Duration,
    /// Publishes awaiting their confirm at once.
    pub publish_window: usize,
    /// Timeout of every broker operation.
    pub operation_timeout: Duration,
}

/// `AMQP_URL` when unset: the broker's name under docker compose.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@rabbitmq:5672/%2f";

/// 32 unacked deliveries per consumer: twice the largest batch
/// ([`MAX_BATCH`](super::MAX_BATCH)), so that the broker is already sending the next batch while
/// one is being applied, and few enough that a crashing instance hands back only a few dozen for
/// redelivery. A consumer applies one batch at a time (SQLite has one writer anyway), so a larger
/// prefetch buys no concurrency, only deliveries waiting in memory.
pub const DEFAULT_PREFETCH: u16 = 32;

/// Three delayed retries ride out a short hiccup (a database busy, a dependency restarting)
/// without holding a poisoned message for long before it is parked in the DLQ for a human.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Two seconds between tries: longer than a typical transient blip, short enough that a retried
/// event is still "near real time". Tests set milliseconds.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(2);

/// 1024 publishes in flight per process: confirms arrive in batches, so a deep window reaches
/// about 10k msgs/s where awaiting each confirm serially manages about 600; the bound keeps memory
/// and the redo-work after a connection loss small.
pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;

/// Five seconds for any one broker operation (connect, declare, confirm): a healthy local broker
/// answers in milliseconds, so anything slower means a dead or overloaded broker, and giving up
/// lets the supervisor rebuild the connection instead of hanging.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

impl MessagingSettings {
    /// Reads `AMQP_URL`, `EVENTS_NAMESPACE`, `AMQP_PREFETCH`, `AMQP_MAX_RETRIES`,
    /// `AMQP_RETRY_DELAY_MS`, `AMQP_PUBLISH_WINDOW` and `AMQP_OPERATION_TIMEOUT_MS`.
    ///
    /// # Errors
    /// [`ConfigError`] for malformed values.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let settings = Self {
            amqp_url: env.string_or("AMQP_URL", DEFAULT_AMQP_URL),
            namespace: env.string_or("EVENTS_NAMESPACE", ""),
            prefetch: env.parse_or("AMQP_PREFETCH", DEFAULT_PREFETCH)?,
            max_retries: env.parse_or("AMQP_MAX_RETRIES", DEFAULT_MAX_RETRIES)?,
            retry_delay: env.millis_or("AMQP_RETRY_DELAY_MS", DEFAULT_RETRY_DELAY)?,
            publish_window: env.parse_or("AMQP_PUBLISH_WINDOW", DEFAULT_PUBLISH_WINDOW)?,
            operation_timeout: env
                .millis_or("AMQP_OPERATION_TIMEOUT_MS", DEFAULT_OPERATION_TIMEOUT)?,
        };
        let positive = |key: &str, value: String| ConfigError {
            key: key.to_owned(),
            value,
            reason: "must be greater than zero".to_owned(),
        };
        if settings.prefetch == 0 {
            return Err(positive("AMQP_PREFETCH", "0".to_owned()));
        }
        if settings.publish_window == 0 {
            return Err(positive("AMQP_PUBLISH_WINDOW", "0".to_owned()));
        }
        if settings.operation_timeout.is_zero() {
            return Err(positive("AMQP_OPERATION_TIMEOUT_MS", "0".to_owned()));
        }
        Ok(settings)
    }

    /// Settings for `amqp_url` with every other value at its default (tests and tools).
    pub fn new(amqp_url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            namespace: namespace.into(),
            prefetch: DEFAULT_PREFETCH,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_delay: DEFAULT_RETRY_DELAY,
            publish_window: DEFAULT_PUBLISH_WINDOW,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let settings = MessagingSettings::from_env(&Env::default()).expect("defaults are valid");
        assert_eq!(settings.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(settings.namespace, "");
        assert_eq!(settings.prefetch, 32);
        assert_eq!(settings.max_retries, 3);
        assert_eq!(settings.retry_delay, Duration::from_secs(2));
        assert_eq!(settings.publish_window, 1024);
        assert_eq!(settings.operation_timeout, Duration::from_secs(5));
    }

    #[test]
    fn values_are_read_from_the_environment_and_zero_prefetch_is_rejected() {
        let env = Env::from_pairs([
            ("AMQP_URL", "amqp://u:p@127.0.0.1:5672/%2f"),
            ("EVENTS_NAMESPACE", "t-1"),
            ("AMQP_RETRY_DELAY_MS", "50"),
        ]);
        let settings = MessagingSettings::from_env(&env).expect("valid");
        assert_eq!(settings.namespace, "t-1");
        assert_eq!(settings.retry_delay, Duration::from_millis(50));
        let bad = Env::from_pairs([("AMQP_PREFETCH", "0")]);
        assert!(MessagingSettings::from_env(&bad).is_err());
    }
}
