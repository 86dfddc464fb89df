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

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::ConsumerSpec;

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
}

impl Topology {
    /// The topology for `consumers` in `namespace`, with retry queues holding messages for
    /// `retry_delay`.
    pub fn new(namespace: &str, retry_delay: Duration, consumers: &[ConsumerSpec]) -> Self {
        Self {
            exchange: namespaced(namespace, EVENTS_EXCHANGE),
            dead_letter_exchange: namespaced(namespace, DEAD_LETTER_EXCHANGE),
            retry_delay,
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
    /// Queue arguments cannot change once a queue exists: a different `retry_delay` makes the
    /// broker refuse the retry queue (406) until the old one is deleted.
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
        let mut main_args = FieldTable::default();
        main_args.insert(
            "x-dead-letter-exchange".into(),
            text(&self.dead_letter_exchange),
        );
        main_args.insert("x-dead-letter-routing-key".into(), text(&queue.queue));
        declare_queue(channel, &queue.queue, main_args, timeout).await?;
        for event_type in &queue.event_types {
            bind(channel, &queue.queue, &self.exchange, event_type, timeout).await?;
        }

        declare_queue(
            channel,
            &queue.dead_letter_queue,
            FieldTable::default(),
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

        let mut retry_args = FieldTable::default();
        let ttl = i64::try_from(self.retry_delay.as_millis()).unwrap_or(i64::MAX);
        retry_args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        // The default exchange ("") routes by queue name, so an expired retry goes back to this
        // consumer's queue only.
        retry_args.insert("x-dead-letter-exchange".into(), text(""));
        retry_args.insert("x-dead-letter-routing-key".into(), text(&queue.queue));
        declare_queue(channel, &queue.retry_queue, retry_args, timeout).await
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

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
    timeout: Duration,
) -> Result<(), TopologyError> {
    bounded(&format!("queue {name}"), timeout, async {
        channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map(drop)
    })
    .await
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
}
