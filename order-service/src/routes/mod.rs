//! The service's own routes (health and metrics routes are added by `startup`).

mod orders;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

/// `POST /orders`, `GET /orders/{id}`, `POST /orders/{id}/cancel`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(orders::create_order))
        .route("/orders/{id}", get(orders::get_order))
        .route("/orders/{id}/cancel", post(orders::cancel_order))
        .with_state(state)
}
