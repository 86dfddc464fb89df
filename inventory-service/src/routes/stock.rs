//! `GET /stock`, `GET /stock/{sku}`, `PUT /stock/{sku}`.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use shared::problem;

use crate::domain::{Stock, validate_sku};
use crate::error::ApiError;
use crate::state::AppState;

/// Every SKU's stock.
pub async fn list_stock(State(state): State<AppState>) -> Result<Json<Vec<Stock>>, ApiError> {
    Ok(Json(state.store.list_stock().await?))
}

/// One SKU's stock.
pub async fn get_stock(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Stock>, ApiError> {
    state
        .store
        .get_stock(&sku)
        .await?
        .map(Json)
        .ok_or(ApiError::UnknownSku(sku))
}

/// Body of `PUT /stock/{sku}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetStock {
    on_hand: i64,
}

/// Sets a SKU's units on hand (restock or stock-take), creating the SKU if new.
pub async fn set_stock(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    problem::Json(body): problem::Json<SetStock>,
) -> Result<Json<Stock>, ApiError> {
    validate_sku(&sku).map_err(ApiError::Invalid)?;
    let stock = state.store.set_on_hand(&sku, body.on_hand).await?;
    tracing::info!(sku, on_hand = stock.on_hand, "stock level set");
    Ok(Json(stock))
}
