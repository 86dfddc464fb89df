//! `GET /prices`, `GET /prices/{sku}`, `PUT /prices/{sku}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use shared::money::Money;
use shared::problem;

use crate::domain::{Price, validate_currency, validate_sku};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::SetPrice;

/// Every price.
pub async fn list_prices(State(state): State<AppState>) -> Result<Json<Vec<Price>>, ApiError> {
    Ok(Json(state.store.list_prices().await?))
}

/// One SKU's price.
pub async fn get_price(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Price>, ApiError> {
    state
        .store
        .get_price(&sku)
        .await?
        .map(Json)
        .ok_or(ApiError::UnknownSku(sku))
}

/// Body of `PUT /prices/{sku}`. [`Money`] itself rejects negative amounts and sub-cent
/// precision, which the JSON extractor turns into a `422`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetPriceRequest {
    price: Money,
    #[serde(default)]
    currency: Option<String>,
}

/// Sets a price (`200`), or creates the SKU named after itself (`201`), and publishes
/// `price.changed` through the outbox. Setting the same price again publishes again, which is
/// harmless: consumers apply it idempotently.
pub async fn set_price(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    problem::Json(body): problem::Json<SetPriceRequest>,
) -> Result<Response, ApiError> {
    validate_sku(&sku).map_err(ApiError::Invalid)?;
    if let Some(currency) = &body.currency {
        validate_currency(currency).map_err(ApiError::Invalid)?;
    }
    let set = state
        .store
        .set_price(SetPrice {
            sku,
            price: body.price,
            currency: body.currency,
        })
        .await?;
    // Only after the commit: the relay must find the row when it wakes.
    state.relay.notify();
    let price = set.price;
    tracing::info!(sku = price.sku, price = %price.price, currency = price.currency, created = set.created, "price set");
    if set.created {
        let location = HeaderValue::from_str(&format!("/prices/{}", price.sku))
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok((
            StatusCode::CREATED,
            [(header::LOCATION, location)],
            Json(price),
        )
            .into_response())
    } else {
        Ok(Json(price).into_response())
    }
}
