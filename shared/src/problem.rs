//! Errors on the wire: `application/problem+json` (RFC 9457) with the correlation ID in the body.
//!
//! Every service turns its error enum into a [`Problem`], so clients see one error shape across the
//! whole system and can quote the `correlationId` when they report an issue.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::correlation;

/// The media type of problem documents.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// Response header naming the dependency behind a `5xx`: set when a problem carries a
/// `dependency` member (see [`crate::client::ClientError::to_problem`]). It tells our callers that
/// this service is healthy and its *dependency* failed, so their circuit breakers do not count the
/// answer against this service and their clients do not retry what this service already retried.
pub static FAILED_DEPENDENCY: http::HeaderName =
    http::HeaderName::from_static("x-failed-dependency");

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` means "see the status code".
    #[serde(rename = "type")]
    pub kind: String,
    /// A short, human-readable summary that does not change between occurrences.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// An explanation specific to this occurrence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The correlation ID of the request, to quote when reporting the problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Extension members (for example `sku` for a stock shortage).
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
    /// Sent as the `Retry-After` header when set.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// A problem with `status` and `title`, tagged with the current correlation ID.
    pub fn new(status: StatusCode, title: impl Into<String>) -> Self {
        Self {
            kind: "about:blank".to_owned(),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            correlation_id: correlation::current().map(|id| id.as_str().to_owned()),
            extensions: Map::new(),
            retry_after: None,
        }
    }

    /// Adds an occurrence-specific explanation.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds an extension member.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        self.extensions.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
        self
    }

    /// Asks the client to wait before retrying (rounded up to whole seconds on the wire).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The status as a [`StatusCode`].
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(Value::String(dependency)) = self.extensions.get("dependency")
            && let Ok(value) = HeaderValue::from_str(dependency)
        {
            headers.insert(FAILED_DEPENDENCY.clone(), value);
        }
        if let Some(after) = retry_after {
            // Retry-After is whole seconds; round up so a client never comes back too early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// A JSON body extractor whose rejections are problem documents rather than plain text:
/// malformed JSON → `400`, well-formed JSON of the wrong shape → `422`, wrong content type → `415`,
/// a body over the size limit → `413`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> Problem {
    let (status, title) = match rejection {
        JsonRejection::JsonDataError(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "Invalid request body")
        }
        JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "Malformed JSON"),
        JsonRejection::MissingJsonContentType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected Content-Type: application/json",
        ),
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            (StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")
        }
        _ => (rejection.status(), "Unreadable request body"),
    };
    // serde's messages name the offending field and position, never server internals.
    Problem::new(status, title).detail(rejection.body_text())
}

/// Answers `404` for any path a router does not know.
pub async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "Not found").detail("no route matches this path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_problem_carries_its_status_type_and_retry_after() {
        let id = correlation::CorrelationId::new();
        let response = correlation::scope(id.clone(), async {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Pricing unavailable")
                .retry_after(Duration::from_millis(1500))
                .with("dependency", "pricing")
                .into_response()
        })
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[&FAILED_DEPENDENCY], "pricing");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let json: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["status"], 503);
        assert_eq!(json["dependency"], "pricing");
        assert_eq!(json["correlationId"], id.as_str());
    }
}
