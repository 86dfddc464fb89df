//! The public API (DESIGN §3): one file per resource, all forwarding to the internal services.

pub(crate) mod orders;
pub(crate) mod prices;
pub(crate) mod products;

use axum::Router;
use axum::routing::{get, post};
use http::StatusCode;
use shared::problem::Problem;

use crate::state::AppState;

pub use orders::{cancel_order, create_order, get_order};
pub use prices::{get_price, put_price};
pub use products::get_product;

/// The gateway's routes (without the chassis middleware, health routes or fallback).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/orders", post(create_order))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/orders/{id}/cancel", post(cancel_order))
        .route("/api/products/{sku}", get(get_product))
        .route("/api/prices/{sku}", get(get_price).put(put_price))
        .route("/openapi.json", get(crate::openapi::document))
        // Added last so it covers every route above: a known path with the wrong method is a
        // problem document too, like every other error the gateway answers.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
        .detail("this path does not support this method")
}
