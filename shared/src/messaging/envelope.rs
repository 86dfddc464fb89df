//! The wire format: a JSON envelope around each event, mirrored in the AMQP properties.
//!
//! Body: `{"messageId","type","version","timestamp","correlationId","data":{...}}`. The same
//! facts travel as AMQP properties (`message_id`, `type`, `timestamp`, `app_id`,
//! `correlation_id`) and headers ([`HEADER_CORRELATION_ID`], [`HEADER_SCHEMA_VERSION`],
//! [`HEADER_DEADLINE`], [`HEADER_ATTEMPT`]) so that tools (the management UI, the DLQ tool) can
//! show a message without parsing its body. The W3C trace context travels in the `traceparent`
//! and `tracestate` headers ([`crate::trace_context`]).

use std::time::Duration;

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use opentelemetry::trace::SpanContext;

use super::{IncomingMessage, OutgoingMessage};
use crate::correlation::CorrelationId;
use crate::deadline::Deadline;
use crate::trace_context;

/// Header carrying the correlation ID (also in the `correlation_id` property).
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";
/// Header carrying the payload's schema version.
pub const HEADER_SCHEMA_VERSION: &str = "x-schema-version";
/// Header carrying the remaining request budget in milliseconds when the publish happened
/// inside a request with a deadline (same name as the HTTP header).
pub const HEADER_DEADLINE: &str = "x-request-timeout-ms";
/// Header counting delivery attempts through the retry queue (absent on the first).
pub const HEADER_ATTEMPT: &str = "x-attempt";
/// `content_type` of every message.
pub const CONTENT_TYPE: &str = "application/json";
/// `delivery_mode` 2: the broker writes the message to disk, so it survives a broker restart.
pub const PERSISTENT: u8 = 2;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeOut<'a> {
    message_id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    version: u32,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeIn {
    message_id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    version: u32,
    #[serde(default)]
    correlation_id: Option<String>,
    data: Box<RawValue>,
}

/// Serialises the envelope of `message`.
///
/// # Errors
/// When `message.data` is not valid JSON.
pub fn encode(message: &OutgoingMessage) -> Result<Vec<u8>, serde_json::Error> {
    let data: &RawValue = serde_json::from_slice(&message.data)?;
    serde_json::to_vec(&EnvelopeOut {
        message_id: message.message_id,
        event_type: &message.event_type,
        version: message.version,
        timestamp: OffsetDateTime::now_utc(),
        correlation_id: message.correlation_id.as_deref(),
        data,
    })
}

/// The AMQP properties of `message`: persistent JSON with IDs, type, timestamp, publishing
/// service, correlation ID, trace context (`trace`: the publish span's, or the one forwarded) and
/// (when a request deadline is running) the remaining budget.
pub fn properties(
    app_id: &str,
    message: &OutgoingMessage,
    budget: Option<Duration>,
    trace: Option<&SpanContext>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(trace) = trace {
        trace_context::to_amqp(trace, &mut headers);
    }
    headers.insert(
        HEADER_SCHEMA_VERSION.into(),
        AMQPValue::LongLongInt(i64::from(message.version)),
    );
    if let Some(id) = &message.correlation_id {
        headers.insert(HEADER_CORRELATION_ID.into(), text(id));
    }
    if let Some(budget) = budget {
        let millis = i64::try_from(budget.as_millis()).unwrap_or(i64::MAX);
        headers.insert(HEADER_DEADLINE.into(), AMQPValue::LongLongInt(millis));
    }
    let timestamp = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default();
    let mut properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_message_id(message.message_id.to_string().into())
        .with_type(message.event_type.as_str().into())
        .with_timestamp(timestamp)
        .with_app_id(app_id.into())
        .with_headers(headers);
    if let Some(id) = &message.correlation_id {
        properties = properties.with_correlation_id(short(id));
    }
    properties
}

/// What a consumer recovers from a delivery besides the [`IncomingMessage`].
#[derive(Debug, Clone)]
pub struct Received {
    /// The message for the handler.
    pub message: IncomingMessage,
    /// The correlation ID to restore (minted when the message carried none).
    pub correlation_id: CorrelationId,
    /// The budget the publisher had left, if it published inside a request.
    pub budget: Option<Duration>,
    /// The producer's trace context, if the message carried a valid one.
    pub trace: Option<SpanContext>,
}

/// Why a delivery could not be decoded (it goes to the DLQ without reaching a handler).
#[derive(Debug, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(String);

/// Decodes a delivery's body and headers.
///
/// # Errors
/// [`DecodeError`] when the body is not a valid envelope.
pub fn decode(properties: &BasicProperties, body: &[u8]) -> Result<Received, DecodeError> {
    let envelope: EnvelopeIn =
        serde_json::from_slice(body).map_err(|e| DecodeError(e.to_string()))?;
    let headers = properties.headers().as_ref();
    let header = |name: &str| headers.and_then(|h| h.inner().get(name));
    let correlation_id = envelope
        .correlation_id
        .as_deref()
        .and_then(CorrelationId::parse)
        .or_else(|| {
            properties
                .correlation_id()
                .as_ref()
                .and_then(|id| CorrelationId::parse(id.as_str()))
        })
        .unwrap_or_default();
    let attempt = header(HEADER_ATTEMPT)
        .and_then(as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1);
    let budget = header(HEADER_DEADLINE)
        .and_then(as_u64)
        .map(Duration::from_millis);
    Ok(Received {
        message: IncomingMessage {
            message_id: envelope.message_id,
            event_type: envelope.event_type,
            version: envelope.version,
            data: Bytes::from(envelope.data.get().as_bytes().to_vec()),
            attempt,
            correlation_id: correlation_id.clone(),
        },
        correlation_id,
        budget,
        trace: trace_context::from_amqp(headers),
    })
}

/// `properties` with the [`HEADER_ATTEMPT`] header set to `attempt` (everything else kept).
pub fn with_attempt(properties: &BasicProperties, attempt: u32) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        HEADER_ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    properties.clone().with_headers(headers)
}

/// The deadline to restore for a handler: the publisher's remaining budget, counted from now.
///
/// The budget bounds one handling attempt: an event still has to be handled after the request
/// that caused it has ended, so the budget is a hint for outbound calls, never a reason to drop.
pub fn deadline(budget: Option<Duration>) -> Option<Deadline> {
    budget.map(Deadline::after)
}

/// A header or property value as text (for tools).
pub fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => as_u64(other).map_or_else(|| format!("{other:?}"), |n| n.to_string()),
    }
}

/// A numeric header value, whatever integer width the publisher chose.
pub fn as_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn short(value: &str) -> ShortString {
    ShortString::from(value)
}

/// An RFC 3339 rendering of a unix timestamp property (for tools).
pub fn timestamp_text(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing() -> OutgoingMessage {
        OutgoingMessage {
            message_id: Uuid::new_v4(),
            event_type: "price.changed".to_owned(),
            version: 1,
            correlation_id: Some("req-42".to_owned()),
            data: Bytes::from_static(br#"{"sku":"BK-12","price":3990}"#),
            trace: None,
        }
    }

    #[test]
    fn an_envelope_round_trips_with_its_correlation_id_and_attempt() {
        let message = outgoing();
        let body = encode(&message).expect("valid JSON");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["type"], "price.changed");
        assert_eq!(json["messageId"], message.message_id.to_string());
        assert_eq!(json["correlationId"], "req-42");
        assert_eq!(json["data"]["sku"], "BK-12");
        assert!(json["timestamp"].is_string());

        let props = with_attempt(
            &properties("pricing", &message, Some(Duration::from_millis(900)), None),
            3,
        );
        let received = decode(&props, &body).expect("decodes");
        assert_eq!(received.message.message_id, message.message_id);
        assert_eq!(received.message.attempt, 3);
        assert_eq!(&received.message.data[..], &message.data[..]);
        assert_eq!(received.correlation_id.as_str(), "req-42");
        assert_eq!(received.budget, Some(Duration::from_millis(900)));
    }

    #[test]
    fn a_body_that_is_not_an_envelope_does_not_decode() {
        let props = BasicProperties::default();
        assert!(decode(&props, b"not json").is_err());
        assert!(
            decode(
                &props,
                br#"{"messageId":"nope","type":"x","version":1,"data":{}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_message_without_attempt_header_is_the_first_attempt() {
        let message = outgoing();
        let body = encode(&message).expect("valid JSON");
        let received =
            decode(&properties("pricing", &message, None, None), &body).expect("decodes");
        assert_eq!(received.message.attempt, 1);
        assert_eq!(received.budget, None);
        assert!(received.trace.is_none());
    }

    #[test]
    fn the_trace_context_travels_in_the_headers_and_survives_a_retry_copy() {
        let message = outgoing();
        let body = encode(&message).expect("valid JSON");
        let mut carrier = std::collections::HashMap::new();
        carrier.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let trace = trace_context::extract(&carrier).expect("valid");
        let props = with_attempt(&properties("order", &message, None, Some(&trace)), 2);
        let received = decode(&props, &body).expect("decodes");
        let restored = received.trace.expect("carried");
        assert_eq!(restored.trace_id(), trace.trace_id());
        assert_eq!(restored.span_id(), trace.span_id());
        assert!(restored.is_sampled());
    }
}
