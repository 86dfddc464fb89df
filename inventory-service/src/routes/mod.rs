//! HTTP routes: stock levels and reservations.

mod reservations;
mod stock;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

/// The service's API (health and metrics routes are merged in by the startup code).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/stock", get(stock::list_stock))
        .route("/stock/{sku}", get(stock::get_stock).put(stock::set_stock))
        .route("/reserve", post(reservations::reserve_stock))
        .route("/release", post(reservations::release_reservation))
        .with_state(state)
}
