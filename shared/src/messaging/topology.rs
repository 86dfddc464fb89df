//! The broker topology in one place: every exchange, queue and binding, declared idempotently.
//!
//! ```text
//!   publisher ──► {ns}shop.events (topic) ──[event type]──► {ns}<queue> ──► consumer
//!                                                              │  ▲
//!                               nack (permanent / out of retries)│  │ TTL expires, dead-lettered via
//!                                                              ▼  │ the default exchange to <queue>
//!   {ns}shop.events.dlx (direct) ──[<queue>]──► {ns}<queue>.dlq   {ns}<queue>.retry ◄── consumer
//!                                                                     (transient failure, confirmed)
//! ```
//!
//! A retry goes to the consumer's own retry queue and comes back to that consumer only, never
//! fanned out again to the other consumers of the event.
//!
//! Every queue is of the [`QueueType`] in `AMQP_QUEUE_TYPE`. Classic queues are declared as they
//! always were (no `x-queue-type`, so queues made before the setting existed stay equivalent).
//! Quorum queues add:
//!
//! | argument | on | why |
//! |---|---|---|
//! | `x-queue-type: quorum` | all three | replicated over the cluster's nodes (Raft) |
//! | `x-dead-letter-strategy: at-least-once` | queue, retry queue | a dead-lettered or expired message leaves its queue only once the DLQ (or, for a retry, the consumer's queue) has confirmed it; classic dead-lettering is at most once |
//! | `x-overflow: reject-publish` | queue, retry queue | at-least-once dead-lettering requires it (dropping the oldest message would lose it) |
//! | `x-delivery-limit` | queue | a message that keeps coming back unacknowledged is dead-lettered instead of redelivered forever |
//!
//! With `AMQP_QUEUE_MAX_LENGTH` set, a full consumer queue refuses publishes (`reject-publish`
//! on both types): the publisher sees a nack, and the outbox keeps the row and retries it.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ErrorKind, ExchangeKind};

use super::ConsumerSpec;
use super::settings::{MessagingSettings, QueueType};

/// Name of the topic exchange every event is published to (before the namespace).
pub const EVENTS_EXCHANGE: &str = "shop.events";
/// Name of the dead-letter exchange (before the namespace).
pub const DEAD_LETTER_EXCHANGE: &str = "shop.events.dlx";

/// Applies `namespace` to `name`: `shop.events` stays as it is with an empty namespace and
/// becomes `t-abc.shop.events` with namespace `t-abc`.
pub fn namespaced(namespace: &str, name: &str) -> String {
    let namespace = namespace.trim_end_matches('.');
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// One consumer queue with its dead-letter and retry queues (names already namespaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTopology {
    /// The consumer's queue.
    pub queue: String,
    /// Where messages that failed for good are parked.
    pub dead_letter_queue: String,
    /// Where transiently failed messages wait for `retry_delay` before coming back.
    pub retry_queue: String,
    /// Routing keys (event types) bound to the queue.
    pub event_types: Vec<String>,
}

impl QueueTopology {
    /// The names for consumer queue `queue` (without namespace) in `namespace`.
    pub fn new(namespace: &str, queue: &str, event_types: Vec<String>) -> Self {
        let queue = namespaced(namespace, queue);
        Self {
            dead_letter_queue: format!("{queue}.dlq"),
            retry_queue: format!("{queue}.retry"),
            queue,
            event_types,
        }
    }
}

/// Everything one process declares: the shared exchanges and its own consumers' queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The topic exchange events are published to.
    pub exchange: String,
    /// The dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Time a message waits in a retry queue.
    pub retry_delay: Duration,
    /// The kind of every queue.
    pub queue_type: QueueType,
    /// Returns of one message before a quorum queue dead-letters it.
    pub delivery_limit: u32,
    /// Messages a consumer queue holds before publishes to it are refused; `None`: unbounded.
    pub max_length: Option<u32>,
    /// The consumer queues.
    pub queues: Vec<QueueTopology>,
}

/// A declaration that the broker refused or that did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The broker answered with an error (a 406 means a queue exists with other arguments).
    #[error("declaring {what}: {source}")]
    Broker {
        /// The object being declared or deleted.
        what: String,
        /// The broker's error.
        source: lapin::Error,
    },
    /// The broker did not answer within the operation timeout.
    #[error("declaring {what}: timed out")]
    Timeout {
        /// The object being declared or deleted.
        what: String,
    },
    /// The queue exists with other arguments (406 `PRECONDITION_FAILED`): it was declared by
    /// an earlier configuration, and the broker never changes an existing queue's arguments.
    /// Retrying cannot help until the queue is deleted (see the README's messaging section).
    #[error(
        "queue {queue} was created with other arguments than declared now \
         (AMQP_QUEUE_TYPE={queue_type}); check {variable}, then drain and delete the queue or \
         use a new virtual host. The broker says: {reason}"
    )]
    Inequivalent {
        /// The queue the broker refused.
        queue: String,
        /// The queue type declared now.
        queue_type: QueueType,
        /// The setting whose value the existing queue contradicts (`AMQP_QUEUE_TYPE`, ...).
        variable: &'static str,
        /// The broker's explanation.
        reason: String,
    },
}

/// The setting behind the queue argument the broker called inequivalent in `reason`, for an
/// error an operator can act on. Quorum queues carry arguments classic ones lack, so a mismatch on
/// one of those with nothing on the other side (`none`) means the queue type changed.
fn variable_of(reason: &str, has_max_length: bool) -> &'static str {
    let on = |argument: &str| reason.contains(&format!("'{argument}'"));
    let absent_on_one_side = reason.contains("none");
    if on("x-message-ttl") {
        "AMQP_RETRY_DELAY_MS"
    } else if on("x-max-length") {
        "AMQP_QUEUE_MAX_LENGTH"
    } else if on("x-delivery-limit") && !absent_on_one_side {
        "AMQP_DELIVERY_LIMIT"
    } else if on("x-overflow") && has_max_length {
        "AMQP_QUEUE_TYPE or AMQP_QUEUE_MAX_LENGTH"
    } else {
        "AMQP_QUEUE_TYPE"
    }
}

impl Topology {
    /// The topology for `consumers` in the settings' namespace, with queues of the settings'
    /// type and retry queues holding messages for the settings' `retry_delay`.
    pub fn new(settings: &MessagingSettings, consumers: &[ConsumerSpec]) -> Self {
        let namespace = settings.namespace.as_str();
        Self {
            exchange: namespaced(namespace, EVENTS_EXCHANGE),
            dead_letter_exchange: namespaced(namespace, DEAD_LETTER_EXCHANGE),
            retry_delay: settings.retry_delay,
            queue_type: settings.queue_type,
            delivery_limit: settings.delivery_limit,
            max_length: settings.max_length,
            queues: consumers
                .iter()
                .map(|c| {
                    let types = c.event_types.iter().map(|t| (*t).to_owned()).collect();
                    QueueTopology::new(namespace, &c.queue, types)
                })
                .collect(),
        }
    }

    /// Declares everything; declaring what already exists with the same arguments is a no-op.
    ///
    /// Queue arguments cannot change once a queue exists: another queue type or `retry_delay`
    /// makes the broker refuse the queue (406, [`TopologyError::Inequivalent`]) until the old
    /// one is deleted.
    ///
    /// # Errors
    /// [`TopologyError`] when the broker refuses a declaration or does not answer in `timeout`.
    pub async fn declare(&self, channel: &Channel, timeout: Duration) -> Result<(), TopologyError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let what = format!("exchange {}", self.exchange);
        bounded(&what, timeout, async {
            channel
                .exchange_declare(
                    self.exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
        })
        .await?;
        let what = format!("exchange {}", self.dead_letter_exchange);
        bounded(&what, timeout, async {
            channel
                .exchange_declare(
                    self.dead_letter_exchange.as_str().into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await
        })
        .await?;
        for queue in &self.queues {
            self.declare_queue(channel, queue, timeout).await?;
        }
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &QueueTopology,
        timeout: Duration,
    ) -> Result<(), TopologyError> {
        let mut main_args = self.arguments(Role::Consumer);
        main_args.insert(
            "x-dead-letter-exchange".into(),
            text(&self.dead_letter_exchange),
        );
        main_args.insert("x-dead-letter-routing-key".into(), text(&queue.queue));
        declare_queue(channel, &queue.queue, main_args, self.queue_type, timeout).await?;
        for event_type in &queue.event_types {
            bind(channel, &queue.queue, &self.exchange, event_type, timeout).await?;
        }

        declare_queue(
            channel,
            &queue.dead_letter_queue,
            self.arguments(Role::DeadLetters),
            self.queue_type,
            timeout,
        )
        .await?;
        bind(
            channel,
            &queue.dead_letter_queue,
            &self.dead_letter_exchange,
            &queue.queue,
            timeout,
        )
        .await?;

        let mut retry_args = self.arguments(Role::Retry);
        let ttl = i64::try_from(self.retry_delay.as_millis()).unwrap_or(i64::MAX);
        retry_args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        // The default exchange ("") routes by queue name, so an expired retry goes back to this
        // consumer's queue only.
        retry_args.insert("x-dead-letter-exchange".into(), text(""));
        retry_args.insert("x-dead-letter-routing-key".into(), text(&queue.queue));
        declare_queue(
            channel,
            &queue.retry_queue,
            retry_args,
            self.queue_type,
            timeout,
        )
        .await
    }

    /// The arguments that follow from the queue type and the length bound, for a queue in
    /// `role`; the caller adds its dead-letter target and TTL.
    fn arguments(&self, role: Role) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), text(QueueType::Quorum.as_str()));
            if role != Role::DeadLetters {
                arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
                arguments.insert("x-overflow".into(), text("reject-publish"));
            }
            // Only the consumer's queue: `dlq list` reads dead letters unacknowledged and hands
            // them back, which a quorum queue counts as returns, so a limit on the DLQ would
            // dead-letter its letters into nowhere after a few looks.
            if role == Role::Consumer {
                let limit = i64::from(self.delivery_limit);
                arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
            }
        }
        if let (Some(max_length), Role::Consumer) = (self.max_length, role) {
            arguments.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(max_length)),
            );
            // The classic default, `drop-head`, would discard the oldest message to make room:
            // refusing the new one instead lets its publisher keep it (the outbox retries).
            arguments.insert("x-overflow".into(), text("reject-publish"));
        }
        arguments
    }

    /// Deletes every queue and exchange of this topology (test cleanup), whatever they hold.
    ///
    /// # Errors
    /// [`TopologyError`] when the broker refuses a deletion or does not answer in `timeout`.
    pub async fn delete(&self, channel: &Channel, timeout: Duration) -> Result<(), TopologyError> {
        for queue in &self.queues {
            for name in [&queue.queue, &queue.retry_queue, &queue.dead_letter_queue] {
                bounded(&format!("delete queue {name}"), timeout, async {
                    channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map(drop)
                })
                .await?;
            }
        }
        for name in [&self.exchange, &self.dead_letter_exchange] {
            bounded(&format!("delete exchange {name}"), timeout, async {
                channel
                    .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await
            })
            .await?;
        }
        Ok(())
    }
}

/// What a queue is for, which decides the arguments it gets beyond its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A consumer's queue: dead-letters to its DLQ, bounded by the delivery limit.
    Consumer,
    /// A retry queue: expires messages back into the consumer's queue.
    Retry,
    /// A DLQ: only holds messages for a human.
    DeadLetters,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
    queue_type: QueueType,
    timeout: Duration,
) -> Result<(), TopologyError> {
    let has_max_length = arguments.inner().contains_key("x-max-length");
    let declared = bounded(&format!("queue {name}"), timeout, async {
        channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map(drop)
    })
    .await;
    match declared {
        Err(TopologyError::Broker { source, .. }) if is_precondition_failed(&source) => {
            let reason = match source.kind() {
                ErrorKind::ProtocolError(error) => error.get_message().to_string(),
                _ => source.to_string(),
            };
            Err(TopologyError::Inequivalent {
                queue: name.to_owned(),
                queue_type,
                variable: variable_of(&reason, has_max_length),
                reason,
            })
        }
        other => other,
    }
}

fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(error)
            if matches!(error.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    timeout: Duration,
) -> Result<(), TopologyError> {
    let what = format!("binding {exchange} -[{routing_key}]-> {queue}");
    bounded(&what, timeout, async {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    })
    .await
}

async fn bounded(
    what: &str,
    timeout: Duration,
    operation: impl Future<Output = lapin::Result<()>>,
) -> Result<(), TopologyError> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(TopologyError::Broker {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(TopologyError::Timeout {
            what: what.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_exact_without_a_namespace_and_prefixed_with_one() {
        assert_eq!(namespaced("", "shop.events"), "shop.events");
        assert_eq!(namespaced("t-abc", "shop.events"), "t-abc.shop.events");
        let queue = QueueTopology::new("", "inventory.order-events", vec![]);
        assert_eq!(queue.queue, "inventory.order-events");
        assert_eq!(queue.dead_letter_queue, "inventory.order-events.dlq");
        assert_eq!(queue.retry_queue, "inventory.order-events.retry");
        let queue = QueueTopology::new("t-abc", "inventory.order-events", vec![]);
        assert_eq!(queue.queue, "t-abc.inventory.order-events");
        assert_eq!(queue.retry_queue, "t-abc.inventory.order-events.retry");
    }

    #[test]
    fn an_inequivalent_argument_names_the_setting_behind_it() {
        let reason = "PRECONDITION_FAILED - inequivalent arg 'x-overflow' for queue 'q' in vhost \
                      '/': received the value 'reject-publish' of type 'longstr' but current is none";
        assert_eq!(variable_of(reason, false), "AMQP_QUEUE_TYPE");
        assert_eq!(
            variable_of(reason, true),
            "AMQP_QUEUE_TYPE or AMQP_QUEUE_MAX_LENGTH"
        );
        let reason = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in \
                      vhost '/': received the value '5' of type 'long' but current is '20'";
        assert_eq!(variable_of(reason, false), "AMQP_DELIVERY_LIMIT");
        let reason = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q.retry'";
        assert_eq!(variable_of(reason, false), "AMQP_RETRY_DELAY_MS");
    }
}
