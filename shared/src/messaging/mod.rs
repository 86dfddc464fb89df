//! Asynchronous events over RabbitMQ (lapin 4 on tokio): one supervised connection per process,
//! confirmed publishing, acknowledged consuming with delayed retries and dead letters.
//!
//! | file | what it holds |
//! |---|---|
//! | [`settings`] | [`MessagingSettings`] from the environment, each default explained |
//! | [`topology`] | every exchange, queue and binding, declared in one idempotent function |
//! | [`envelope`] | the JSON envelope and the AMQP properties and headers mirroring it |
//! | `broker` | [`Broker`]: the supervisor that connects, declares, runs and rebuilds everything |
//! | `publisher` | [`Publisher`]: `mandatory`, persistent publishes that count only when confirmed |
//! | `consumer` | manual acks, bounded prefetch, batches acked together, retry through the retry queue, then the DLQ |
//! | [`dlq`] | listing and redriving dead letters (also the `dlq` command-line tool) |
//!
//! Delivery is at least once: a message may arrive twice (a lost ack, a redrive, a relay that
//! re-sends after a failed confirm), so consumers deduplicate by [`IncomingMessage::message_id`]
//! in their [`inbox`](crate::inbox), inside the transaction that applies the effect.

mod broker;
mod consumer;
pub mod dlq;
pub mod envelope;
pub mod metrics;
mod publisher;
pub mod settings;
pub mod topology;

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::correlation::CorrelationId;
use crate::events::Event;

pub use broker::Broker;
pub use consumer::MAX_BATCH;
pub use publisher::Publisher;
pub use settings::{MessagingSettings, QueueType};
pub use topology::Topology;

/// A message as handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    /// Unique message ID (for deduplication in the consumer's inbox).
    pub message_id: Uuid,
    /// Event type (`order.placed`).
    pub event_type: String,
    /// Schema version.
    pub version: u32,
    /// The payload (the envelope's `data`) as JSON.
    pub data: Bytes,
    /// Delivery attempt, 1 for the first.
    pub attempt: u32,
    /// The correlation ID the message carried (minted when it carried none). The consumer runs
    /// [`Handler::handle`] with it in scope; a batch handler restores it per message with
    /// [`IncomingMessage::in_scope`].
    pub correlation_id: CorrelationId,
}

impl IncomingMessage {
    /// Decodes the payload as `E`.
    ///
    /// # Errors
    /// [`HandlerError::Permanent`] when the payload does not decode, is of another event type or
    /// of a newer schema version than this build knows (retrying cannot help).
    pub fn decode<E: Event>(&self) -> Result<E, HandlerError> {
        if self.event_type != E::TYPE {
            return Err(HandlerError::Permanent(format!(
                "expected a {} event, got {}",
                E::TYPE,
                self.event_type
            )));
        }
        if self.version > E::VERSION {
            return Err(HandlerError::Permanent(format!(
                "{} schema version {} is newer than the supported {}",
                E::TYPE,
                self.version,
                E::VERSION
            )));
        }
        serde_json::from_slice(&self.data).map_err(|e| {
            HandlerError::Permanent(format!("{} payload does not decode: {e}", E::TYPE))
        })
    }

    /// Runs `f` with this message's correlation ID in scope, so that what it logs belongs to the
    /// request that caused the message (a batch handler's per-message log lines).
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        crate::correlation::sync_scope(self.correlation_id.clone(), f)
    }
}

/// What a handler's failure means for the message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later (database busy, dependency down): retried after a delay, then DLQ.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (undecodable, violates an invariant): straight to the DLQ.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A handler's future.
pub type HandlerFuture<'a> = futures::future::BoxFuture<'a, Result<(), HandlerError>>;

/// Handles messages of one consumer queue.
///
/// The consumer applies the deliveries waiting on its queue in order. When two or more are
/// waiting and the handler has a batch method, it offers them to [`Handler::handle_batch`] at
/// once; otherwise, and whenever a batch fails, it calls [`Handler::handle`] for each message,
/// with the message's correlation ID in scope.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; `Ok` acks it.
    ///
    /// # Errors
    /// [`HandlerError::Transient`] to retry the message after a delay, [`HandlerError::Permanent`]
    /// to dead-letter it.
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_>;

    /// Applies `messages` (two or more, in queue order) all or nothing, typically in one write
    /// transaction holding every effect and every inbox row; `Ok` acks them all at once. `None`,
    /// the default, means this handler takes one message at a time.
    ///
    /// A batch runs without a correlation ID in scope (it has one per message; see
    /// [`IncomingMessage::in_scope`]).
    ///
    /// # Errors
    /// Any failure must leave nothing applied: the consumer then hands the same messages to
    /// [`Handler::handle`] one by one, so the one at fault is retried or dead-lettered alone and
    /// every other is applied once.
    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        let _ = messages;
        None
    }
}

/// A consumer: its queue (`<service>.<purpose>`), the event types it binds, and its handler.
#[derive(Clone)]
pub struct ConsumerSpec {
    /// Queue name, e.g. `inventory.order-events`.
    pub queue: String,
    /// Routing keys (event types) bound to the queue.
    pub event_types: Vec<&'static str>,
    /// The handler.
    pub handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for ConsumerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerSpec")
            .field("queue", &self.queue)
            .field("event_types", &self.event_types)
            .finish_non_exhaustive()
    }
}

/// Why a publish failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// Not connected (and did not reconnect in time).
    #[error("not connected to the broker")]
    Disconnected,
    /// The broker nacked the message.
    #[error("the broker refused the message")]
    Nacked,
    /// No queue is bound for the routing key (`mandatory` returned it).
    #[error("no queue bound for routing key {0}")]
    Unroutable(String),
    /// Timed out waiting for the confirm.
    #[error("timed out waiting for the broker")]
    Timeout,
    /// Other broker error.
    #[error("broker error: {0}")]
    Broker(String),
}

impl PublishError {
    /// A short, stable name of the failure, for span attributes and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Nacked => "nacked",
            Self::Unroutable(_) => "unroutable",
            Self::Timeout => "timeout",
            Self::Broker(_) => "broker_error",
        }
    }
}

/// An outgoing message ready to publish (already serialised; the outbox stores these).
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Unique message ID.
    pub message_id: Uuid,
    /// Event type, used as routing key.
    pub event_type: String,
    /// Schema version.
    pub version: u32,
    /// Correlation ID of the request that caused it.
    pub correlation_id: Option<String>,
    /// Payload JSON.
    pub data: Bytes,
    /// The trace context the message was created in (sent as `traceparent`/`tracestate`; the
    /// publish span is its child).
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

impl OutgoingMessage {
    /// Builds a message for `event` with a fresh ID, capturing the current correlation ID and
    /// trace context.
    ///
    /// # Errors
    /// Serialisation failure.
    pub fn new<E: Event>(event: &E) -> Result<Self, serde_json::Error> {
        Ok(Self {
            message_id: Uuid::new_v4(),
            event_type: E::TYPE.to_owned(),
            version: E::VERSION,
            correlation_id: crate::correlation::current().map(|id| id.as_str().to_owned()),
            data: Bytes::from(serde_json::to_vec(event)?),
            trace: crate::trace_context::current(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlation::{self, CorrelationId};
    use crate::events::{OrderCancelled, PriceChanged};
    use crate::money::Money;

    fn price_changed() -> PriceChanged {
        PriceChanged {
            sku: "BK-12".to_owned(),
            price: Money(3990),
            currency: "EUR".to_owned(),
            version: 1,
        }
    }

    #[tokio::test]
    async fn an_outgoing_message_captures_the_current_correlation_id() {
        let id = CorrelationId::parse("req-7").expect("valid");
        let message = correlation::scope(id, async { OutgoingMessage::new(&price_changed()) })
            .await
            .expect("serialises");
        assert_eq!(message.correlation_id.as_deref(), Some("req-7"));
        assert_eq!(message.event_type, "price.changed");
        let outside = OutgoingMessage::new(&price_changed()).expect("serialises");
        assert_eq!(outside.correlation_id, None);
        assert_ne!(outside.message_id, message.message_id);
    }

    #[test]
    fn decoding_as_the_wrong_event_type_is_a_permanent_failure() {
        let outgoing = OutgoingMessage::new(&price_changed()).expect("serialises");
        let incoming = IncomingMessage {
            message_id: outgoing.message_id,
            event_type: outgoing.event_type,
            version: 1,
            data: outgoing.data,
            attempt: 1,
            correlation_id: CorrelationId::new(),
        };
        assert_eq!(
            incoming.decode::<PriceChanged>().ok(),
            Some(price_changed())
        );
        assert!(matches!(
            incoming.decode::<OrderCancelled>(),
            Err(HandlerError::Permanent(_))
        ));
    }
}
