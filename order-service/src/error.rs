//! The service's HTTP errors: one enum, answered as problem+json, never leaking internals.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;

use crate::domain::InvalidOrder;
use crate::placement::PlacementError;
use crate::store::StoreError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The order request breaks a rule.
    #[error(transparent)]
    InvalidOrder(#[from] InvalidOrder),
    /// The `Idempotency-Key` header is unusable.
    #[error("invalid Idempotency-Key header")]
    InvalidIdempotencyKey,
    /// No order with that ID (or the ID is not one).
    #[error("order not found")]
    OrderNotFound,
    /// Placing the order failed.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    fn to_problem(&self) -> Problem {
        match self {
            Self::InvalidOrder(invalid) => invalid_order(invalid),
            Self::InvalidIdempotencyKey => {
                Problem::new(StatusCode::BAD_REQUEST, "Invalid Idempotency-Key").detail(
                    "Idempotency-Key must be 1-255 visible ASCII characters (a UUID is ideal)",
                )
            }
            Self::OrderNotFound => Problem::new(StatusCode::NOT_FOUND, "Order not found"),
            Self::Placement(error) => placement_problem(error),
            Self::Store(_) => internal(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.to_problem();
        if problem.status_code().is_server_error() {
            // The cause stays in the log (with the correlation ID the client can quote).
            tracing::error!(error = %self, status = problem.status, "request failed");
        }
        problem.into_response()
    }
}

fn placement_problem(error: &PlacementError) -> Problem {
    match error {
        PlacementError::KeyReused => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Idempotency-Key reused")
                .detail("this Idempotency-Key was already used for a different order")
        }
        PlacementError::UnknownSku(sku) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Unknown sku")
                .detail(format!("there is no product {sku}"))
                .with("sku", sku)
        }
        PlacementError::OutOfStock {
            sku,
            requested,
            available,
        } => Problem::new(StatusCode::CONFLICT, "Insufficient stock")
            .detail(format!(
                "not enough {sku} in stock; the order was not placed"
            ))
            .with("sku", sku)
            .with("requested", requested)
            .with("available", available),
        PlacementError::PricingUnavailable { sku, retry_after } => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Pricing unavailable")
                .detail(format!(
                    "no price for {sku} can be found right now; the order was not placed"
                ))
                .with("sku", sku)
                // Names the failed dependency (and so sets `x-failed-dependency`): the gateway
                // must not count this answer against order-service's own health.
                .with("dependency", "pricing")
                .retry_after(*retry_after)
        }
        PlacementError::MixedCurrencies(a, b) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Mixed currencies").detail(format!(
                "the items are priced in {a} and {b}; order them separately"
            ))
        }
        PlacementError::Invalid(invalid) => invalid_order(invalid),
        PlacementError::Inventory(error) => error.to_problem(),
        PlacementError::DeadlineExceeded => {
            Problem::new(StatusCode::GATEWAY_TIMEOUT, "Deadline exceeded")
                .detail("the order could not be placed within the request's time budget")
        }
        PlacementError::Store(_) | PlacementError::Aborted(_) => internal(),
    }
}

fn invalid_order(invalid: &InvalidOrder) -> Problem {
    let problem =
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid order").detail(invalid.to_string());
    match invalid.sku() {
        Some(sku) => problem.with("sku", sku),
        None => problem,
    }
}

fn internal() -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
}
