//! `/orders`: place, read and cancel orders.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use shared::money::Money;
use shared::problem::Json;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::domain::{Order, OrderLine, OrderRequest};
use crate::error::ApiError;
use crate::state::AppState;

/// The header a client sets to make `POST /orders` safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest accepted `Idempotency-Key`: room for any UUID or ULID scheme, small enough to index.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// `POST /orders` body.
#[derive(Debug, Deserialize)]
pub struct CreateOrder {
    items: Vec<CreateOrderItem>,
}

#[derive(Debug, Deserialize)]
struct CreateOrderItem {
    sku: String,
    qty: u32,
}

/// An order on the wire.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderBody {
    id: Uuid,
    status: &'static str,
    lines: Vec<LineBody>,
    total: Money,
    currency: String,
    priced_from_cache: bool,
    created_at: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LineBody {
    sku: String,
    qty: u32,
    unit_price: Money,
    line_total: Money,
    price_source: &'static str,
    reservation_id: Uuid,
}

impl From<&Order> for OrderBody {
    fn from(order: &Order) -> Self {
        Self {
            id: order.id,
            status: order.status.as_str(),
            lines: order.lines.iter().map(LineBody::from).collect(),
            total: order.total,
            currency: order.currency.clone(),
            priced_from_cache: order.priced_from_cache(),
            // RFC 3339 formatting only fails for years outside 0..=9999.
            created_at: order.created_at.format(&Rfc3339).unwrap_or_default(),
        }
    }
}

impl From<&OrderLine> for LineBody {
    fn from(line: &OrderLine) -> Self {
        Self {
            sku: line.sku.clone(),
            qty: line.qty,
            unit_price: line.unit_price,
            // Checked when the order was placed (its total fits), so this cannot overflow.
            line_total: line.line_total().unwrap_or_default(),
            price_source: line.price_source.as_str(),
            reservation_id: line.reservation_id,
        }
    }
}

/// `POST /orders`: prices and reserves every line, then stores the order → `201` + `Location`.
pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<CreateOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let request = OrderRequest::parse(body.items.into_iter().map(|item| (item.sku, item.qty)))?;
    let order = state.placement.place(request, key).await?;
    let location = HeaderValue::try_from(format!("/orders/{}", order.id))
        .expect("a UUID path is a valid header value");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(OrderBody::from(&order)),
    )
        .into_response())
}

/// `GET /orders/{id}`.
pub async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::OrderNotFound)?;
    let order = state.orders.get(id).await?.ok_or(ApiError::OrderNotFound)?;
    Ok(axum::Json(OrderBody::from(&order)).into_response())
}

/// `POST /orders/{id}/cancel`: idempotent; `order.cancelled` is published once.
pub async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::OrderNotFound)?;
    let cancellation = state
        .orders
        .cancel(id)
        .await?
        .ok_or(ApiError::OrderNotFound)?;
    if cancellation.newly_cancelled {
        state.relay.notify();
        tracing::info!(order_id = %id, "order cancelled");
    }
    Ok(axum::Json(OrderBody::from(&cancellation.order)).into_response())
}

/// The `Idempotency-Key` header, if sent: 1–255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidIdempotencyKey)?;
    let valid = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(Some(key.to_owned()))
    } else {
        Err(ApiError::InvalidIdempotencyKey)
    }
}
