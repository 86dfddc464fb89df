//! Asynchronous events over RabbitMQ (lapin 4 on tokio).
//!
//! API SKELETON — bodies are being implemented (see the messaging task). Signatures are the contract.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{ConfigError, Env};
use crate::events::Event;
use crate::health::CheckStatus;

/// Broker settings, read from the environment.
#[derive(Debug, Clone)]
pub struct MessagingSettings {
    /// `AMQP_URL`, default `amqp://guest:guest@rabbitmq:5672/%2f`.
    pub amqp_url: String,
    /// `EVENTS_NAMESPACE`, default empty: a prefix for every exchange and queue name, so tests
    /// (and several stacks on one broker) stay isolated.
    pub namespace: String,
    /// Unacked deliveries per consumer (and thus handler concurrency).
    pub prefetch: u16,
    /// Delayed retries before a failing message goes to the DLQ.
    pub max_retries: u32,
    /// Delay of one retry (the retry queue's TTL).
    pub retry_delay: Duration,
    /// Publishes awaiting their confirm at once.
    pub publish_window: usize,
    /// Timeout of every broker operation.
    pub operation_timeout: Duration,
}

impl MessagingSettings {
    /// Reads `AMQP_URL`, `EVENTS_NAMESPACE` and friends.
    ///
    /// # Errors
    /// [`ConfigError`] for malformed values.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        todo!()
    }
}

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
}

impl IncomingMessage {
    /// Decodes the payload as `E`.
    ///
    /// # Errors
    /// [`HandlerError::Permanent`] when the payload does not decode (retrying cannot help).
    pub fn decode<E: Event>(&self) -> Result<E, HandlerError> {
        todo!()
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

/// Handles messages of one consumer queue. Runs with the message's correlation ID in scope.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; `Ok` acks it.
    fn handle(
        &self,
        message: IncomingMessage,
    ) -> futures::future::BoxFuture<'_, Result<(), HandlerError>>;
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
#[derive(Debug, thiserror::Error)]
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
}

impl OutgoingMessage {
    /// Builds a message for `event`, capturing the current correlation ID.
    ///
    /// # Errors
    /// Serialisation failure.
    pub fn new<E: Event>(event: &E) -> Result<Self, serde_json::Error> {
        todo!()
    }
}

/// Publishes with confirms; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {}

impl Publisher {
    /// Publishes `message` and waits for the broker's confirm.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub async fn publish(&self, message: OutgoingMessage) -> Result<(), PublishError> {
        todo!()
    }
}

/// The process's broker connection, owned by a supervisor task.
#[derive(Debug, Clone)]
pub struct Broker {}

impl Broker {
    /// Starts the supervisor: connects (retrying), declares topology, runs `consumers`, rebuilds
    /// everything on failure, stops on `shutdown`.
    pub fn start(
        service: &'static str,
        settings: MessagingSettings,
        consumers: Vec<ConsumerSpec>,
        shutdown: CancellationToken,
    ) -> Self {
        todo!()
    }
    /// A publisher on this connection.
    pub fn publisher(&self) -> Publisher {
        todo!()
    }
    /// Deletes every exchange and queue this broker's topology declared (tests clean up with it).
    ///
    /// # Errors
    /// [`PublishError::Broker`] if the broker cannot be reached.
    pub async fn delete_topology(&self) -> Result<(), PublishError> {
        todo!()
    }
    /// Whether connected and topology declared.
    pub fn is_connected(&self) -> bool {
        todo!()
    }
    /// Critical readiness check: failing while disconnected.
    pub fn health_check(&self) -> CheckStatus {
        todo!()
    }
}
