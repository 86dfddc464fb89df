//! Dead letters: list what a consumer's DLQ holds and move it back to the consumer ("redrive").
//!
//! Both work on their own short-lived connection, so they can run from the `dlq` command-line
//! tool (`cargo run -p shared --bin dlq -- list <queue>`) or from a test. Queue names are given
//! without the namespace (`inventory.order-events`); the settings' namespace is applied.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;

use super::broker::{bounded, connect};
use super::envelope::{self, HEADER_ATTEMPT, HEADER_CORRELATION_ID};
use super::settings::MessagingSettings;
use super::topology::QueueTopology;

/// Longest body excerpt shown by [`list`]: enough to recognise an event, short enough for a
/// terminal line.
pub const PREVIEW_CHARS: usize = 200;

/// A message parked in a dead-letter queue.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The `type` property (event type).
    pub event_type: Option<String>,
    /// The correlation ID (property or header).
    pub correlation_id: Option<String>,
    /// Why it was dead-lettered last (`rejected`, `expired`, ...), from `x-death`.
    pub reason: Option<String>,
    /// How often it died in the queue of the latest `x-death` entry.
    pub death_count: Option<u64>,
    /// The queue it died in last.
    pub death_queue: Option<String>,
    /// When it was published, RFC 3339.
    pub published_at: Option<String>,
    /// The message's headers as text, except `x-death` (summarised above).
    pub headers: BTreeMap<String, String>,
    /// The first [`PREVIEW_CHARS`] characters of the body.
    pub body_preview: String,
}

/// Why a DLQ operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker could not be reached, refused an operation or did not answer in time.
    #[error("broker: {0}")]
    Broker(String),
    /// A message could not be moved back (it stays in the DLQ).
    #[error("message {message_id:?} could not be redriven: {reason}")]
    Redrive {
        /// The message that stayed behind.
        message_id: Option<String>,
        /// What went wrong.
        reason: String,
    },
}

/// Shows up to `limit` messages of `<queue>.dlq` without removing them.
///
/// The messages are fetched unacknowledged and handed back when the channel closes, so they stay
/// in the DLQ (marked redelivered).
///
/// # Errors
/// [`DlqError::Broker`] when the broker cannot be reached or the queue does not exist.
pub async fn list(
    settings: &MessagingSettings,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    let names = QueueTopology::new(&settings.namespace, queue, Vec::new());
    let timeout = settings.operation_timeout;
    let (connection, channel) = open(settings).await?;
    let mut letters = Vec::new();
    let result = async {
        let count = message_count(&channel, &names.dead_letter_queue, timeout).await?;
        for _ in 0..count.min(limit) {
            let Some(message) = get(&channel, &names.dead_letter_queue, timeout).await? else {
                break;
            };
            letters.push(describe(
                &message.delivery.properties,
                &message.delivery.data,
            ));
        }
        Ok(())
    }
    .await;
    close(connection, timeout).await;
    result.map(|()| letters)
}

/// Moves up to `limit` (default: all) messages from `<queue>.dlq` back to `<queue>`, through the
/// default exchange so that only that consumer sees them again, with `x-attempt` reset. Each
/// message is acked from the DLQ only after the broker confirmed its copy. Returns how many moved.
///
/// Only the messages present when it starts are moved, so a message that fails again and comes
/// straight back cannot keep the redrive going forever.
///
/// # Errors
/// [`DlqError`] when the broker cannot be reached or a copy is not confirmed (that message and
/// the rest stay in the DLQ).
pub async fn redrive(
    settings: &MessagingSettings,
    queue: &str,
    limit: Option<usize>,
) -> Result<usize, DlqError> {
    let names = QueueTopology::new(&settings.namespace, queue, Vec::new());
    let timeout = settings.operation_timeout;
    let (connection, channel) = open(settings).await?;
    let result = async {
        bounded(
            timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .map_err(DlqError::Broker)?;
        // Fail early (and clearly) if the consumer's queue does not exist.
        message_count(&channel, &names.queue, timeout).await?;
        let available = message_count(&channel, &names.dead_letter_queue, timeout).await?;
        let mut moved = 0;
        for _ in 0..limit.map_or(available, |l| l.min(available)) {
            let Some(message) = get(&channel, &names.dead_letter_queue, timeout).await? else {
                break;
            };
            let delivery = message.delivery;
            let properties = reset_attempt(&delivery.properties);
            let confirmed =
                republish(&channel, &names.queue, &delivery.data, properties, timeout).await;
            if let Err(reason) = confirmed {
                let options = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                // Back into the DLQ, where it came from: nothing is lost.
                let _ = tokio::time::timeout(timeout, delivery.nack(options)).await;
                return Err(DlqError::Redrive {
                    message_id: delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.to_string()),
                    reason,
                });
            }
            bounded(timeout, delivery.ack(BasicAckOptions::default()))
                .await
                .map_err(DlqError::Broker)?;
            moved += 1;
        }
        Ok(moved)
    }
    .await;
    close(connection, timeout).await;
    result
}

async fn open(settings: &MessagingSettings) -> Result<(Connection, Channel), DlqError> {
    let timeout = settings.operation_timeout;
    let connection = connect(&settings.amqp_url, "dlq-tool", timeout)
        .await
        .map_err(DlqError::Broker)?;
    let channel = bounded(timeout, connection.create_channel())
        .await
        .map_err(DlqError::Broker)?;
    Ok((connection, channel))
}

async fn close(connection: Connection, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, connection.close(200, "OK".into())).await;
}

async fn message_count(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Result<usize, DlqError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = bounded(
        timeout,
        channel.queue_declare(queue.into(), passive, FieldTable::default()),
    )
    .await
    .map_err(|e| DlqError::Broker(format!("queue {queue}: {e}")))?;
    Ok(usize::try_from(declared.message_count()).unwrap_or(usize::MAX))
}

async fn get(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Result<Option<lapin::message::BasicGetMessage>, DlqError> {
    bounded(
        timeout,
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .map_err(DlqError::Broker)
}

async fn republish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), String> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = bounded(
        timeout,
        channel.basic_publish("".into(), queue.into(), options, body, properties),
    )
    .await?;
    match bounded(timeout, confirm).await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(format!("queue {queue} does not exist")),
        Confirmation::Nack(_) => Err("the broker nacked the copy".to_owned()),
        Confirmation::NotRequested => Err("publisher confirms are not enabled".to_owned()),
    }
}

fn reset_attempt(properties: &BasicProperties) -> BasicProperties {
    let headers = properties.headers().clone().unwrap_or_default();
    let kept: BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != HEADER_ATTEMPT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}

fn describe(properties: &BasicProperties, body: &[u8]) -> DeadLetter {
    let headers = properties.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).map(envelope::value_text);
    // `x-death` lists the latest death first.
    let latest_death = headers
        .inner()
        .get("x-death")
        .and_then(|deaths| match deaths {
            AMQPValue::FieldArray(entries) => {
                entries.as_slice().iter().find_map(|entry| match entry {
                    AMQPValue::FieldTable(table) => Some(table.clone()),
                    _ => None,
                })
            }
            _ => None,
        });
    let death = |name: &str| {
        latest_death
            .as_ref()
            .and_then(|t| t.inner().get(name).cloned())
    };
    DeadLetter {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        event_type: properties.kind().as_ref().map(|t| t.to_string()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| header(HEADER_CORRELATION_ID)),
        reason: death("reason").map(|v| envelope::value_text(&v)),
        death_count: death("count").and_then(|v| envelope::as_u64(&v)),
        death_queue: death("queue").map(|v| envelope::value_text(&v)),
        published_at: properties.timestamp().map(envelope::timestamp_text),
        headers: headers
            .inner()
            .iter()
            .filter(|(key, _)| key.as_str() != "x-death")
            .map(|(key, value)| (key.to_string(), envelope::value_text(value)))
            .collect(),
        body_preview: String::from_utf8_lossy(body)
            .chars()
            .take(PREVIEW_CHARS)
            .collect(),
    }
}
