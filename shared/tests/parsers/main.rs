//! Property tests of the parsers that read untrusted input: whatever a client or a publisher
//! sends, they answer (accept or refuse), never panic, and accept exactly what the contract says.

use std::time::Duration;

use http::HeaderValue;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use proptest::prelude::*;
use shared::correlation::CorrelationId;
use shared::deadline::Deadline;
use shared::messaging::envelope;

/// What DESIGN §6 allows in a correlation ID.
fn allowed_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

proptest! {
    #[test]
    fn a_correlation_id_is_adopted_exactly_when_it_follows_the_contract(
        raw in prop_oneof!["[A-Za-z0-9._:-]{0,130}", "[ -~]{0,130}", any::<String>()],
    ) {
        let valid = (1..=128).contains(&raw.len()) && raw.bytes().all(allowed_id_byte);
        let parsed = CorrelationId::parse(&raw);
        prop_assert_eq!(parsed.is_some(), valid);
        if let Some(id) = parsed {
            prop_assert_eq!(id.as_str(), raw.as_str());
            // An adopted ID is echoed in a header as it came.
            let echoed = id.to_header_value();
            prop_assert_eq!(echoed.to_str().ok(), Some(raw.as_str()));
        }
    }

    #[test]
    fn any_correlation_header_yields_a_valid_id(
        bytes in prop_oneof![
            "[A-Za-z0-9._:-]{0,130}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..300),
        ],
    ) {
        let mut headers = http::HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            headers.insert(shared::correlation::HEADER.clone(), value);
        }
        let id = CorrelationId::from_headers_or_new(&headers);
        prop_assert!(CorrelationId::parse(id.as_str()).is_some());
    }

    #[test]
    fn a_timeout_header_is_a_whole_number_of_milliseconds_or_nothing(raw in "[ 0-9a-z+-]{0,30}") {
        let Ok(value) = HeaderValue::from_str(&raw) else { return Ok(()) };
        let parsed = Deadline::from_header(&value);
        let number = raw.trim().parse::<u64>().ok();
        prop_assert_eq!(parsed.is_some(), number.is_some());
    }

    #[test]
    fn any_timeout_number_gives_a_deadline_within_it(millis in any::<u64>()) {
        let value = HeaderValue::from(millis);
        let parsed = Deadline::from_header(&value).expect("a number is a deadline");
        prop_assert!(parsed.remaining() <= Duration::from_millis(millis));
    }

    #[test]
    fn an_envelope_body_of_any_bytes_is_decoded_or_refused(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = envelope::decode(&BasicProperties::default(), &body);
    }

    #[test]
    fn an_envelope_with_any_headers_is_decoded_or_refused(
        correlation in any::<String>(),
        attempt in any::<i64>(),
        deadline_ms in any::<i64>(),
        text_deadline in any::<String>(),
        version in any::<u32>(),
    ) {
        let body = serde_json::json!({
            "messageId": uuid::Uuid::new_v4(),
            "type": "order.placed",
            "version": version,
            "timestamp": "2026-12-02T06:00:00Z",
            "correlationId": correlation,
            "data": {"orderId": "x"},
        });
        let mut headers = FieldTable::default();
        headers.insert(envelope::HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
        headers.insert(envelope::HEADER_DEADLINE.into(), AMQPValue::LongLongInt(deadline_ms));
        headers.insert(
            "x-other".into(),
            AMQPValue::LongString(LongString::from(text_deadline.into_bytes())),
        );
        let properties = BasicProperties::default().with_headers(headers);
        let received = envelope::decode(&properties, body.to_string().as_bytes()).expect("a valid envelope");
        prop_assert!(received.message.attempt >= 1);
        prop_assert!(CorrelationId::parse(received.correlation_id.as_str()).is_some());
        // Restoring the publisher's budget must not overflow, whatever it claimed.
        let _ = envelope::deadline(received.budget);
    }

    #[test]
    fn a_text_deadline_header_in_an_envelope_is_read_or_ignored(raw in any::<String>()) {
        let mut headers = FieldTable::default();
        headers.insert(
            envelope::HEADER_DEADLINE.into(),
            AMQPValue::LongString(LongString::from(raw.clone().into_bytes())),
        );
        let body = serde_json::json!({
            "messageId": uuid::Uuid::new_v4(), "type": "t", "version": 1,
            "timestamp": "2026-12-02T06:00:00Z", "data": null,
        });
        let properties = BasicProperties::default().with_headers(headers);
        let received = envelope::decode(&properties, body.to_string().as_bytes()).expect("a valid envelope");
        prop_assert_eq!(received.budget, raw.parse::<u64>().ok().map(Duration::from_millis));
        let _ = envelope::deadline(received.budget);
    }
}
