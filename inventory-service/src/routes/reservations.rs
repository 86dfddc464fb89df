//! `POST /reserve` (one line, or a whole order) and `POST /release`.

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
use crate::store::{OrderLine, ReserveOrder, ReserveStock, ReservedOrder};

/// The header that makes `POST /reserve` idempotent.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Body of `POST /reserve`, in one of two shapes told apart by the `items` field:
///
/// - one line (DESIGN §4, unchanged): `{"sku", "qty", "orderId"?}`, no `items`;
/// - a whole order: `{"orderId", "items": [{"sku", "qty"}, ...]}`, no top-level `sku` or `qty`.
///
/// A body with `items` and a top-level `sku` or `qty`, or with none of the three, is neither and
/// is answered `422` saying so. `qty` is a raw JSON number so that `0`, `-1` and `1.5` are each
/// answered with a precise `422` (a string such as `"2"` is rejected by the JSON extractor).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReserveRequest {
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    qty: Option<Number>,
    #[serde(default)]
    order_id: Option<Uuid>,
    #[serde(default)]
    items: Option<Vec<ReserveItem>>,
}

/// One line of a whole-order body.
#[derive(Debug, Deserialize)]
pub struct ReserveItem {
    sku: String,
    qty: Number,
}

/// Which shape a `POST /reserve` body has.
enum ReserveBody {
    Line {
        sku: String,
        qty: Number,
        order_id: Option<Uuid>,
    },
    Order {
        order_id: Uuid,
        items: Vec<ReserveItem>,
    },
}

/// What a body that is neither shape is told.
const SHAPES: &str = r#"a body is either one line {"sku","qty","orderId"?} or a whole order {"orderId","items":[{"sku","qty"},...]}"#;

impl ReserveRequest {
    fn shape(self) -> Result<ReserveBody, String> {
        match (self.items, self.sku, self.qty) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(format!(
                "items cannot be combined with a top-level sku or qty: {SHAPES}"
            )),
            (Some(items), None, None) => match self.order_id {
                Some(order_id) => Ok(ReserveBody::Order { order_id, items }),
                None => Err(format!("a whole order needs its orderId: {SHAPES}")),
            },
            (None, Some(sku), Some(qty)) => Ok(ReserveBody::Line {
                sku,
                qty,
                order_id: self.order_id,
            }),
            (None, Some(_), None) => Err("missing field `qty`".to_owned()),
            (None, None, Some(_)) => Err("missing field `sku`".to_owned()),
            (None, None, None) => Err(format!("neither sku and qty nor items: {SHAPES}")),
        }
    }
}

/// Answer of `POST /reserve` for one line (and each line of a whole order's answer).
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

/// Answer of `POST /reserve` for a whole order: one reservation per line, in request order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReserveOrderResponse {
    order_id: Uuid,
    reservations: Vec<ReserveResponse>,
}

/// The answer of either shape.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ReserveAnswer {
    /// One line.
    Line(ReserveResponse),
    /// A whole order.
    Order(ReserveOrderResponse),
}

/// `POST /reserve`: one line (see [`reserve_line`]) or a whole order (see [`reserve_order`]),
/// by the body's shape ([`ReserveRequest`]).
pub async fn reserve_stock(
    State(state): State<AppState>,
    headers: HeaderMap,
    problem::Json(body): problem::Json<ReserveRequest>,
) -> Result<Json<ReserveAnswer>, ApiError> {
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|value| IdempotencyKey::parse(value.as_bytes()))
        .transpose()
        .map_err(ApiError::Invalid)?;
    let answer = match body.shape().map_err(ApiError::Invalid)? {
        ReserveBody::Line { sku, qty, order_id } => {
            ReserveAnswer::Line(reserve_line(&state, sku, &qty, order_id, idempotency_key).await?)
        }
        ReserveBody::Order { order_id, items } => {
            ReserveAnswer::Order(reserve_order(&state, order_id, items, idempotency_key).await?)
        }
    };
    Ok(Json(answer))
}

/// Reserves units of a SKU until the order is placed or the reservation expires. With an
/// `Idempotency-Key`, a replay answers the first successful reservation again and reserves
/// nothing more, even if that reservation has since been released or expired (the answer is
/// about the request, like any idempotent replay). A refused reservation is not remembered: its
/// replay is evaluated afresh. A key reused for a different sku or qty is a client bug and is
/// refused with `422` rather than silently answered with another request's reservation.
async fn reserve_line(
    state: &AppState,
    sku: String,
    qty: &Number,
    order_id: Option<Uuid>,
    idempotency_key: Option<IdempotencyKey>,
) -> Result<ReserveResponse, ApiError> {
    let qty = Quantity::parse(qty).map_err(ApiError::Invalid)?;
    let now = OffsetDateTime::now_utc();
    let reserved = state
        .store
        .reserve(ReserveStock {
            sku,
            qty,
            order_id,
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
    Ok(ReserveResponse::from(reservation))
}

/// Reserves every line of an order in one transaction, all or none: a short line is `409`
/// naming every short line (nothing reserved), an unknown SKU `404` naming it (nothing
/// reserved). Each line's reservation carries its own key, `<Idempotency-Key>:<sku>` (with the
/// order's ID as the key, what a one-line call for the line carries). A replay of the key answers
/// the first order's reservations again and reserves nothing more; the key reused for other lines
/// (or a line key a one-line call took) is `422`.
async fn reserve_order(
    state: &AppState,
    order_id: Uuid,
    items: Vec<ReserveItem>,
    idempotency_key: Option<IdempotencyKey>,
) -> Result<ReserveOrderResponse, ApiError> {
    let lines = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let qty = Quantity::parse(&item.qty).map_err(|e| format!("items[{i}]: {e}"))?;
            Ok(OrderLine { sku: item.sku, qty })
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(ApiError::Invalid)?;
    let now = OffsetDateTime::now_utc();
    let request = ReserveOrder::new(
        order_id,
        lines,
        idempotency_key,
        now,
        now + state.reservation_ttl,
    )
    .map_err(ApiError::Invalid)?;
    let ReservedOrder {
        reservations,
        replayed,
    } = state.store.reserve_order(request).await?;
    if replayed {
        tracing::info!(%order_id, lines = reservations.len(), "idempotent replay of an order's reservations");
    } else {
        tracing::info!(%order_id, lines = reservations.len(), "stock reserved for an order");
        for reservation in &reservations {
            stock::warn_if_low(
                &reservation.sku,
                reservation.remaining_after,
                state.low_stock_threshold,
            );
        }
    }
    Ok(ReserveOrderResponse {
        order_id,
        reservations: reservations.iter().map(ReserveResponse::from).collect(),
    })
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
