//! The service's HTTP errors: one enum, answered as problem+json, never leaking internals.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;

use crate::domain::InvalidOrder;
use crate::placement::PlacementError;
use crate::store::StoreError;

/// A caller told the database is unavailable comes back after this long: a busy lock or pool
/// clears in milliseconds and a lost connection is re-established on the next request, so a
/// second is the shortest wait worth asking for (the resilient client honours it).
const STORAGE_RETRY_AFTER: Duration = Duration::from_secs(1);

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
            Self::Store(error) => store_problem(error),
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
        PlacementError::KeyInUse { retry_after } => {
            Problem::new(StatusCode::CONFLICT, "Idempotency-Key in use")
                .detail("another request with this Idempotency-Key is still placing its order; send it again after Retry-After")
                .retry_after(*retry_after)
        }
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
        PlacementError::Store(error) => store_problem(error),
        PlacementError::Aborted(_) => internal(),
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

/// A database that is away, busy or not migrated yet is a `503` to retry; anything else is a
/// `500` that hides its cause.
fn store_problem(error: &StoreError) -> Problem {
    if error.is_transient() {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Storage unavailable")
            .detail("the database cannot answer right now; retry shortly")
            .retry_after(STORAGE_RETRY_AFTER)
    } else {
        internal()
    }
}

fn internal() -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
}

#[cfg(test)]
mod tests {
    use shared::db::DatabaseError;

    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("problem JSON")
    }

    #[tokio::test]
    async fn an_unavailable_database_is_a_503_to_retry_and_other_store_failures_a_500_that_hides_the_cause()
     {
        let away = || StoreError::Database(DatabaseError::new("connection refused", true));
        let broken =
            || StoreError::Database(sqlx::Error::Protocol("secret internals".to_owned()).into());

        for unavailable in [
            ApiError::Store(away()),
            ApiError::Placement(PlacementError::Store(away())),
        ] {
            let response = unavailable.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
        }
        for failed in [
            ApiError::Store(broken()),
            ApiError::Placement(PlacementError::Store(broken())),
        ] {
            let response = failed.into_response();
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let problem = body(response).await;
            assert!(!problem.to_string().contains("secret"), "{problem}");
        }
    }
}
