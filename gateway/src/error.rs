//! The gateway's errors and how each one is answered (problem+json, never internals).

use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use shared::client::ClientError;
use shared::problem::{self, Problem};

/// Why the gateway could not answer with an upstream's success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `x-api-key` missing or wrong on an admin route.
    #[error("missing or wrong API key")]
    Unauthorized,
    /// The request body could not be read (too large, connection dropped).
    #[error("unreadable request body: {0}")]
    Body(#[from] BytesRejection),
    /// The request body is not JSON.
    #[error("malformed JSON body: {0}")]
    MalformedJson(#[source] serde_json::Error),
    /// `Idempotency-Key` is not a short printable string.
    #[error("invalid Idempotency-Key header")]
    InvalidIdempotencyKey,
    /// A path parameter that cannot name anything (`.` or `..`).
    #[error("path parameter cannot name a resource")]
    NoSuchPath,
    /// Neither pricing nor inventory knows the sku.
    #[error("no product {sku}")]
    ProductNotFound {
        /// The sku asked for.
        sku: String,
    },
    /// A dependency failed or refused the request.
    #[error(transparent)]
    Upstream(#[from] ClientError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized => Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized")
                .detail("this operation needs a valid x-api-key header")
                .into_response(),
            Self::Body(rejection) => body_problem(&rejection).into_response(),
            Self::MalformedJson(error) => Problem::new(StatusCode::BAD_REQUEST, "Malformed JSON")
                // serde's message names the position of the error, never server internals.
                .detail(error.to_string())
                .into_response(),
            Self::InvalidIdempotencyKey => {
                Problem::new(StatusCode::BAD_REQUEST, "Invalid Idempotency-Key")
                    .detail(format!(
                        "the Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
                    ))
                    .into_response()
            }
            Self::NoSuchPath => Problem::new(StatusCode::NOT_FOUND, "Not found")
                .detail("no route matches this path")
                .into_response(),
            Self::ProductNotFound { sku } => {
                Problem::new(StatusCode::NOT_FOUND, "Product not found")
                    .detail(format!("no product has sku {sku}"))
                    .with("sku", sku)
                    .into_response()
            }
            Self::Upstream(error) => upstream_response(&error),
        }
    }
}

/// Idempotency keys are stored by order-service; a bound keeps that storage small. A UUID is 36.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

fn body_problem(rejection: &BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large").detail(format!(
            "request bodies are limited to {} bytes",
            shared::server::DEFAULT_BODY_LIMIT
        ))
    } else {
        Problem::new(rejection.status(), "Unreadable request body").detail(rejection.body_text())
    }
}

/// Whether `error` is a dependency refusing our caller's request (a 4xx: unknown order, short
/// stock, invalid price) rather than failing. `429` is the exception: a busy internal service is
/// not the caller's doing, so it is treated as the dependency being unavailable.
pub fn is_refusal(error: &ClientError) -> bool {
    error
        .status()
        .is_some_and(|s| s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS)
}

/// A refusal is the answer to our caller's request, so it passes through with its status and
/// problem document (the upstream already tagged it with the same correlation ID). Anything else is
/// the dependency failing, which the caller sees as `502`/`503`/`504` from
/// [`ClientError::to_problem`], with the cause only in our log.
fn upstream_response(error: &ClientError) -> Response {
    match error {
        ClientError::Status { status, body, .. } if is_refusal(error) => {
            if is_json_object(body) {
                let mut response = (*status, body.clone()).into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(problem::CONTENT_TYPE),
                );
                response
            } else {
                // Not a problem document (a bare 405, say): answer with one of our own instead.
                Problem::new(*status, status.canonical_reason().unwrap_or("Client error"))
                    .into_response()
            }
        }
        _ => {
            tracing::warn!(%error, "upstream call failed");
            error.to_problem().into_response()
        }
    }
}

fn is_json_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body).is_ok()
}
