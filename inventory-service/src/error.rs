//! The HTTP error type: every failure a handler can answer, mapped to problem+json.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;
use uuid::Uuid;

use crate::store::{Shortage, StoreError};

/// A caller told the database is busy (or briefly away) comes back after this long: SQLite's
/// write lock and PostgreSQL's row locks are held for milliseconds at a time, so a second is
/// ample, and the resilient client honours it; a server that stays away keeps answering `503`.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything a handler can fail with. Internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such SKU.
    #[error("unknown sku {0}")]
    UnknownSku(String),
    /// No such reservation.
    #[error("unknown reservation {0}")]
    UnknownReservation(Uuid),
    /// Not enough units available.
    #[error("insufficient stock of {sku}")]
    InsufficientStock {
        /// Product.
        sku: String,
        /// Units asked for.
        requested: u32,
        /// Units available.
        available: i64,
    },
    /// Lines of a whole order with too few units available (never empty); nothing reserved.
    #[error("insufficient stock for an order")]
    OrderShort(Vec<Shortage>),
    /// A committed reservation cannot be released.
    #[error("reservation {0} is committed")]
    Committed(Uuid),
    /// Well-formed but unacceptable input; the string says why.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error("storage failure")]
    Storage(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::UnknownSku(sku) => Self::UnknownSku(sku),
            StoreError::UnknownReservation(id) => Self::UnknownReservation(id),
            StoreError::InsufficientStock {
                sku,
                requested,
                available,
            } => Self::InsufficientStock {
                sku,
                requested,
                available,
            },
            StoreError::OrderShort(shortages) => Self::OrderShort(shortages),
            StoreError::Committed(id) => Self::Committed(id),
            StoreError::KeyReused => Self::Invalid(
                "this Idempotency-Key was already used for a different sku or qty \
                 (or a whole order with other lines)"
                    .to_owned(),
            ),
            StoreError::InvalidLevel(reason) => Self::Invalid(reason),
            other @ (StoreError::LineMismatch { .. } | StoreError::Database(_)) => {
                Self::Storage(other)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match &self {
            Self::UnknownSku(sku) => Problem::new(StatusCode::NOT_FOUND, "Unknown SKU")
                .detail(format!("no stock is kept for sku {sku}"))
                .with("sku", sku),
            Self::UnknownReservation(id) => {
                Problem::new(StatusCode::NOT_FOUND, "Unknown reservation")
                    .detail(format!("no reservation {id}"))
            }
            Self::InsufficientStock {
                sku,
                requested,
                available,
            } => Problem::new(StatusCode::CONFLICT, "Insufficient stock")
                .detail(format!(
                    "requested {requested} of {sku} but only {available} available"
                ))
                .with("sku", sku)
                .with("requested", requested)
                .with("available", available),
            // The one-line 409's shape (`sku`, `requested`, `available` of the first short line, so
            // a caller that reads those keeps working) plus every short line in `shortages`.
            Self::OrderShort(shortages) => {
                let first = shortages.first().cloned().unwrap_or(Shortage {
                    sku: String::new(),
                    requested: 0,
                    available: 0,
                });
                let skus: Vec<&str> = shortages.iter().map(|s| s.sku.as_str()).collect();
                Problem::new(StatusCode::CONFLICT, "Insufficient stock")
                    .detail(format!(
                        "nothing was reserved: stock is short for {}; requested {} of {} but \
                         only {} available",
                        skus.join(", "),
                        first.requested,
                        first.sku,
                        first.available
                    ))
                    .with("sku", &first.sku)
                    .with("requested", first.requested)
                    .with("available", first.available)
                    .with("shortages", shortages)
            }
            Self::Committed(id) => Problem::new(StatusCode::CONFLICT, "Reservation committed")
                .detail(format!(
                    "reservation {id} belongs to a placed order; cancel the order to return its stock"
                )),
            Self::Invalid(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request").detail(reason)
            }
            Self::Storage(StoreError::Database(cause)) if cause.is_transient() => {
                tracing::warn!(error = %cause, "storage busy");
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Storage busy")
                    .detail("the database is busy; retry shortly")
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
    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("problem JSON")
    }

    #[tokio::test]
    async fn a_shortage_is_a_409_naming_sku_requested_and_available() {
        let response = ApiError::InsufficientStock {
            sku: "HD-44".to_owned(),
            requested: 4,
            available: 3,
        }
        .into_response();

        assert_eq!(response.status(), StatusCode::CONFLICT);
        let problem = body(response).await;
        assert_eq!(problem["sku"], "HD-44");
        assert_eq!(problem["requested"], 4);
        assert_eq!(problem["available"], 3);
    }

    #[tokio::test]
    async fn a_busy_database_is_a_503_to_retry_and_other_failures_a_500_that_hides_the_cause() {
        let busy = ApiError::Storage(StoreError::Database(sqlx::Error::PoolTimedOut.into()));
        let broken = ApiError::Storage(StoreError::Database(
            sqlx::Error::Protocol("secret internals".to_owned()).into(),
        ));

        let busy = busy.into_response();
        let broken = broken.into_response();

        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let problem = body(broken).await;
        assert!(!problem.to_string().contains("secret"), "{problem}");
    }

    #[tokio::test]
    async fn a_database_server_that_went_away_or_is_not_migrated_yet_is_a_503_to_retry() {
        let lost = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let not_migrated = shared::db::DatabaseError::new("database not migrated yet", true);

        for cause in [lost.into(), not_migrated] {
            let response = ApiError::from(StoreError::Database(cause)).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
        }
    }
}
