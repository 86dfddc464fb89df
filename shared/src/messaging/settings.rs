//! Broker settings, read from the environment once at startup.

use std::fmt;
use std::str::FromStr;
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
    /// `AMQP_QUEUE_TYPE`: the kind of every consumer, retry and dead-letter queue.
    pub queue_type: QueueType,
    /// `AMQP_DELIVERY_LIMIT`: how often a quorum queue hands out one message that keeps coming
    /// back unacknowledged before it dead-letters it (classic queues have no such limit).
    pub delivery_limit: u32,
    /// `AMQP_QUEUE_MAX_LENGTH`, default unbounded: messages a consumer queue holds before the
    /// broker refuses (nacks) further publishes to it.
    pub max_length: Option<u32>,
}

/// The kind of queue the topology declares (`AMQP_QUEUE_TYPE`).
///
/// A queue's kind is fixed when it is created: redeclaring an existing classic queue as quorum
/// (or the other way round) is refused with `406 PRECONDITION_FAILED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A queue on one node: the right kind for a single broker (`docker compose up`).
    #[default]
    Classic,
    /// A replicated Raft queue: the right kind for a cluster of three or more nodes.
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument and of `AMQP_QUEUE_TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `AMQP_QUEUE_TYPE` that is neither `classic` nor `quorum`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected `classic` or `quorum`, got `{0}`")]
pub struct UnknownQueueType(String);

impl FromStr for QueueType {
    type Err = UnknownQueueType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(UnknownQueueType(s.to_owned())),
        }
    }
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

/// Classic by default: `docker compose up` and `scripts/run-local.sh` run one broker node, where a
/// quorum queue replicates to nobody yet still pays for its Raft log, and every installation
/// made before `AMQP_QUEUE_TYPE` existed has classic queues, which the broker refuses to
/// redeclare as quorum (406). A cluster sets `quorum` (see `docs/decisions/0500-queue-type.md`).
pub const DEFAULT_QUEUE_TYPE: QueueType = QueueType::Classic;

/// 20 returns of one message. The consumer's own retries (`max_retries`, 3) never count here: a
/// transient failure publishes a fresh copy to the retry queue and acks the original, and a
/// permanent one is rejected straight to the DLQ. The broker counts only a message coming back
/// unacknowledged because its consumer's channel or process died while handling it. A message
/// that crashes every consumer taking it is parked in the DLQ after 20 such deaths instead of
/// crash-looping every replica forever, while 20 is far above what an innocent message sees: a
/// crash returns all `prefetch` unacknowledged messages at once, so the neighbours of a poison
/// message are counted too, and a broker failover or a rolling restart adds one or two more.
/// RabbitMQ 4 chose the same 20 as the default it applies to every quorum queue.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl MessagingSettings {
    /// Reads `AMQP_URL`, `EVENTS_NAMESPACE`, `AMQP_PREFETCH`, `AMQP_MAX_RETRIES`,
    /// `AMQP_RETRY_DELAY_MS`, `AMQP_PUBLISH_WINDOW`, `AMQP_OPERATION_TIMEOUT_MS`,
    /// `AMQP_QUEUE_TYPE`, `AMQP_DELIVERY_LIMIT` and `AMQP_QUEUE_MAX_LENGTH`.
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
            queue_type: env.parse_or("AMQP_QUEUE_TYPE", DEFAULT_QUEUE_TYPE)?,
            delivery_limit: env.parse_or("AMQP_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT)?,
            max_length: match env.get("AMQP_QUEUE_MAX_LENGTH") {
                Some(_) => Some(env.parse_or("AMQP_QUEUE_MAX_LENGTH", 0)?),
                None => None,
            },
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
        if settings.delivery_limit == 0 {
            return Err(positive("AMQP_DELIVERY_LIMIT", "0".to_owned()));
        }
        if settings.max_length == Some(0) {
            return Err(positive("AMQP_QUEUE_MAX_LENGTH", "0".to_owned()));
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
            queue_type: DEFAULT_QUEUE_TYPE,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            max_length: None,
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
        assert_eq!(settings.queue_type, QueueType::Classic);
        assert_eq!(settings.delivery_limit, 20);
        assert_eq!(settings.max_length, None);
    }

    #[test]
    fn the_queue_type_is_read_in_either_case_and_anything_else_is_rejected() {
        let quorum = Env::from_pairs([
            ("AMQP_QUEUE_TYPE", "Quorum"),
            ("AMQP_DELIVERY_LIMIT", "5"),
            ("AMQP_QUEUE_MAX_LENGTH", "1000"),
        ]);
        let settings = MessagingSettings::from_env(&quorum).expect("valid");
        assert_eq!(settings.queue_type, QueueType::Quorum);
        assert_eq!(settings.delivery_limit, 5);
        assert_eq!(settings.max_length, Some(1000));
        let classic = Env::from_pairs([("AMQP_QUEUE_TYPE", "classic")]);
        let settings = MessagingSettings::from_env(&classic).expect("valid");
        assert_eq!(settings.queue_type, QueueType::Classic);

        let stream = Env::from_pairs([("AMQP_QUEUE_TYPE", "stream")]);
        let error = MessagingSettings::from_env(&stream).expect_err("streams are not supported");
        assert_eq!(error.key, "AMQP_QUEUE_TYPE");
        let unbounded = Env::from_pairs([("AMQP_QUEUE_MAX_LENGTH", "0")]);
        assert!(MessagingSettings::from_env(&unbounded).is_err());
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
