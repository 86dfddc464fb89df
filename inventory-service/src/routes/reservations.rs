//! `POST /reserve` and `POST /release`.

use axum::Json;
use axum::extract::State;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Number;
use shared::problem;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::domain::{IdempotencyKey, Quantity, Reservation, stock};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::ReserveStock;

/// The header that makes `POST /reserve` idempotent.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Body of `POST /reserve`. `qty` is a raw JSON number so that `0`, `-1` and `1.5` are each
/// answered with a precise `422` (a string such as `"2"` is rejected by the JSON extractor).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReserveRequest {
    sku: String,
    qty: Number,
    #[serde(default)]
    order_id: Option<Uuid>,
}

/// Answer of `POST /reserve`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReserveResponse {
    sku: String,
    reserved: u32,
    remaining: i64,
    reservation_id: Uuid,
    expires_at: String,
}

impl From<&Reservation> for ReserveResponse {
    fn from(reservation: &Reservation) -> Self {
        Self {
            sku: reservation.sku.clone(),
            reserved: reservation.qty,
            remaining: reservation.remaining_after,
            reservation_id: reservation.id,
            expires_at: reservation.expires_at.format(&Rfc3339).unwrap_or_default(),
        }
    }
}

/// Reserves units of a SKU until the order is placed or the reservation expires. With an
/// `Idempotency-Key`, a replay answers the first successful reservation again and reserves
/// nothing more, even if that reservation has since been released or expired (the answer is
/// about the request, like any idempotent replay). A refused reservation is not remembered: its
/// replay is evaluated afresh. A key reused for a different sku or qty is a client bug and is
/// refused with `422` rather than silently answered with another request's reservation.
pub async fn reserve_stock(
    State(state): State<AppState>,
    headers: HeaderMap,
    problem::Json(body): problem::Json<ReserveRequest>,
) -> Result<Json<ReserveResponse>, ApiError> {
    let qty = Quantity::parse(&body.qty).map_err(ApiError::Invalid)?;
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|value| IdempotencyKey::parse(value.as_bytes()))
        .transpose()
        .map_err(ApiError::Invalid)?;
    let now = OffsetDateTime::now_utc();
    let reserved = state
        .store
        .reserve(ReserveStock {
            sku: body.sku,
            qty,
            order_id: body.order_id,
            idempotency_key,
            now,
            expires_at: now + state.reservation_ttl,
        })
        .await?;
    let reservation = &reserved.reservation;
    if reserved.replayed {
        tracing::info!(reservation_id = %reservation.id, "idempotent replay of a reservation");
    } else {
        tracing::info!(
            reservation_id = %reservation.id,
            sku = reservation.sku,
            qty = reservation.qty,
            remaining = reservation.remaining_after,
            "stock reserved"
        );
        stock::warn_if_low(
            &reservation.sku,
            reservation.remaining_after,
            state.low_stock_threshold,
        );
    }
    Ok(Json(ReserveResponse::from(reservation)))
}

/// Body of `POST /release`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    reservation_id: Uuid,
}

/// Answer of `POST /release`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseResponse {
    reservation_id: Uuid,
    status: &'static str,
}

/// Gives a reservation's units back. Idempotent: releasing a released (or expired) reservation
/// answers the same; a committed one is refused, since its units left with the order.
pub async fn release_reservation(
    State(state): State<AppState>,
    problem::Json(body): problem::Json<ReleaseRequest>,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let status = state.store.release(body.reservation_id).await?;
    tracing::info!(reservation_id = %body.reservation_id, %status, "reservation released");
    Ok(Json(ReleaseResponse {
        reservation_id: body.reservation_id,
        status: "released",
    }))
}
