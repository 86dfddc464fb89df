//! The lean pass-through path: bodies are forwarded as the bytes that arrived (checked to be JSON,
//! never decoded into values and re-encoded), only the headers that matter are copied, and upstream
//! answers are relayed as they are.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, PercentEncode, utf8_percent_encode};
use serde::de::IgnoredAny;
use shared::client::ClientResponse;

use crate::error::{ApiError, MAX_IDEMPOTENCY_KEY_LEN};

/// The header that makes a `POST /api/orders` safe to repeat.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A request body that is syntactically valid JSON, kept as the bytes that arrived together with
/// its `Content-Type`, ready to forward.
///
/// Checking the syntax here answers a malformed body with `400` at the edge without a hop to the
/// service; the *shape* is the owning service's business, so it is not checked here. Reading the
/// body honours the chassis's body limit (`413` problem).
#[derive(Debug, Clone)]
pub struct JsonBody {
    /// The client's `Content-Type`, forwarded so the service can insist on JSON.
    pub content_type: Option<HeaderValue>,
    /// The body, byte for byte.
    pub bytes: Bytes,
}

impl JsonBody {
    /// The headers to forward along with the body.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(1);
        if let Some(content_type) = &self.content_type {
            headers.insert(header::CONTENT_TYPE, content_type.clone());
        }
        headers
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = Bytes::from_request(request, state).await?;
        // `IgnoredAny` walks the syntax without building any value.
        serde_json::from_slice::<IgnoredAny>(&bytes).map_err(ApiError::MalformedJson)?;
        Ok(Self {
            content_type,
            bytes,
        })
    }
}

/// The optional `Idempotency-Key` of a request, validated (1–255 visible ASCII characters).
#[derive(Debug, Clone, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(&IDEMPOTENCY_KEY) else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| is_valid_idempotency_key(k))
            .ok_or(ApiError::InvalidIdempotencyKey)?;
        Ok(Self(Some(key.to_owned())))
    }
}

/// 1–255 visible ASCII characters (no spaces): what order-service stores and accepts, checked
/// here so a bad key is answered at the edge.
fn is_valid_idempotency_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Everything except RFC 3986 unreserved characters is percent-encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes a path parameter for use as one segment of an upstream path.
///
/// Axum hands handlers the *decoded* parameter, so `/api/orders/..%2F..%2Fadmin` arrives as
/// `../../admin`; pasted into an upstream path unencoded, it would reach a route the gateway never
/// meant to expose. Re-encoding keeps it one segment.
///
/// # Errors
/// [`ApiError::NoSuchPath`] for `.` and `..`, which URL parsers resolve as path navigation even
/// when percent-encoded, so no encoding keeps them inside the segment.
pub fn segment(raw: &str) -> Result<PercentEncode<'_>, ApiError> {
    if raw.is_empty() || raw == "." || raw == ".." {
        return Err(ApiError::NoSuchPath);
    }
    Ok(utf8_percent_encode(raw, SEGMENT))
}

/// Relays an upstream success: its status, `Content-Type` and body, nothing else (hop headers,
/// server names and internal addresses stay inside).
pub fn relay(upstream: ClientResponse) -> Response {
    let content_type = upstream.headers.get(header::CONTENT_TYPE).cloned();
    let mut response = (upstream.status, upstream.body).into_response();
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
}

/// Maps order-service's `Location: /orders/{id}` to the public `/api/orders/{id}`. Anything else
/// is dropped rather than relayed, because it could name an internal address.
pub fn public_location(upstream: &HeaderValue) -> Option<HeaderValue> {
    let path = upstream.to_str().ok()?;
    let rest = path.strip_prefix("/orders/")?;
    HeaderValue::from_str(&format!("/api/orders/{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn idempotency_key(value: HeaderValue) -> Result<Option<String>, ApiError> {
        let (mut parts, ()) = http::Request::builder()
            .header(&IDEMPOTENCY_KEY, value)
            .body(())
            .expect("request")
            .into_parts();
        let extracted = block_on(IdempotencyKey::from_request_parts(&mut parts, &()));
        extracted.map(|key| key.0)
    }

    /// The extractor does no I/O, so its future completes on the first poll.
    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    proptest! {
        #[test]
        fn an_idempotency_key_is_accepted_exactly_when_order_service_would_store_it(
            bytes in prop_oneof![
                // Printable text around the length bound, spaces and tabs included…
                "[ -~\t]{0,260}".prop_map(String::into_bytes),
                // …and anything a client can put in a header.
                proptest::collection::vec(any::<u8>(), 0..300),
            ],
        ) {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
            let valid = (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&bytes.len())
                && bytes.iter().all(u8::is_ascii_graphic);
            match idempotency_key(value) {
                Ok(key) => {
                    prop_assert!(valid, "accepted {:?}", bytes);
                    prop_assert_eq!(key.map(String::into_bytes), Some(bytes));
                }
                Err(error) => {
                    prop_assert!(!valid, "refused {:?}", bytes);
                    prop_assert!(matches!(error, ApiError::InvalidIdempotencyKey));
                }
            }
        }
    }

    #[test]
    fn path_parameters_stay_one_segment() {
        let encoded = |raw| segment(raw).map(|s| s.to_string()).ok();
        assert_eq!(encoded("BK-12").as_deref(), Some("BK-12"));
        assert_eq!(encoded("../../admin").as_deref(), Some("..%2F..%2Fadmin"));
        assert_eq!(encoded("a b?c#d").as_deref(), Some("a%20b%3Fc%23d"));
        assert_eq!(encoded(".."), None);
        assert_eq!(encoded("."), None);
        assert_eq!(encoded(""), None);
    }

    #[test]
    fn only_order_locations_are_made_public() {
        let location = public_location(&HeaderValue::from_static("/orders/42")).expect("mapped");
        assert_eq!(location, "/api/orders/42");
        assert!(
            public_location(&HeaderValue::from_static("http://order:4001/orders/42")).is_none()
        );
    }
}
