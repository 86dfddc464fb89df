//! The HTTP error type: every failure a handler can answer, mapped to problem+json.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;
use uuid::Uuid;

use crate::store::StoreError;

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
            StoreError::Committed(id) => Self::Committed(id),
            StoreError::KeyReused => Self::Invalid(
                "this Idempotency-Key was already used for a different sku or qty".to_owned(),
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
            Self::Committed(id) => Problem::new(StatusCode::CONFLICT, "Reservation committed")
                .detail(format!(
                    "reservation {id} belongs to a placed order; cancel the order to return its stock"
                )),
            Self::Invalid(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request").detail(reason)
            }
            Self::Storage(cause) => {
                tracing::error!(error = %cause, "storage failure");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
            }
        };
        problem.into_response()
    }
}
