//! The HTTP error type: every failure a handler can answer, mapped to problem+json.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;

use crate::store::StoreError;

/// A caller told the database is busy or away comes back after this long: SQLite's write lock and
/// PostgreSQL's row locks are held for milliseconds at a time, so a second is ample; a server
/// that is away is reconnected to by the pool on the next request after its return, so retrying
/// every second finds it within a second. The resilient client honours it.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything a handler can fail with. Internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No price for the SKU.
    #[error("unknown sku {0}")]
    UnknownSku(String),
    /// Well-formed but unacceptable input; the string says why.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error("storage failure")]
    Storage(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match &self {
            Self::UnknownSku(sku) => Problem::new(StatusCode::NOT_FOUND, "Unknown SKU")
                .detail(format!("no price for sku {sku}"))
                .with("sku", sku),
            Self::Invalid(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request").detail(reason)
            }
            Self::Storage(StoreError::Database(cause)) if cause.is_transient() => {
                tracing::warn!(error = %cause, "storage busy");
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Storage busy")
                    .detail("the database is busy or unreachable; retry shortly")
                    .retry_after(BUSY_RETRY_AFTER)
            }
            Self::Storage(cause) => {
                tracing::error!(error = %cause, "storage failure");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
            }
        };
        problem.into_response()
    }
}

#[cfg(test)]
mod tests {
    use shared::db::DatabaseError;

    use super::*;

    fn storage_failure(transient: bool) -> Response {
        let cause = DatabaseError::new("connection refused", transient);
        ApiError::Storage(StoreError::Database(cause)).into_response()
    }

    #[test]
    fn a_transient_storage_failure_is_a_503_with_retry_after() {
        let response = storage_failure(true);

        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn any_other_storage_failure_is_a_500_without_retry_after() {
        let response = storage_failure(false);

        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!response.headers().contains_key(http::header::RETRY_AFTER));
    }
}
