//! HTTP routes: prices.

mod prices;

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

/// The service's API (health and metrics routes are merged in by the startup code).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/prices", get(prices::list_prices))
        .route(
            "/prices/{sku}",
            get(prices::get_price).put(prices::set_price),
        )
        .with_state(state)
}
