//! `/api/orders`: forwarded to order-service.

use axum::extract::{Path, State};
use axum::response::Response;
use http::{Method, header};
use shared::client::ClientRequest;

use crate::error::ApiError;
use crate::forward::{IdempotencyKey, JsonBody, public_location, relay, segment};
use crate::state::AppState;

/// `POST /api/orders` → order `POST /orders`, the body forwarded byte for byte.
///
/// With an `Idempotency-Key` the client may retry the POST after a transient failure, because
/// order-service answers a repeated key with the order it already placed. Without one, a POST is
/// never retried: a retry after a lost answer could place the order twice.
pub async fn create_order(
    State(state): State<AppState>,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let request = ClientRequest {
        method: Method::POST,
        path: "/orders".to_owned(),
        headers: body.headers(),
        body: Some(body.bytes),
        idempotency_key,
        attempt_timeout: None,
    };
    let upstream = state.order.send(request).await?;
    let location = upstream
        .headers
        .get(header::LOCATION)
        .and_then(public_location);
    let mut response = relay(upstream);
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /api/orders/{id}` → order `GET /orders/{id}`.
pub async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let path = format!("/orders/{}", segment(&id)?);
    Ok(relay(state.order.send(ClientRequest::get(path)).await?))
}

/// `POST /api/orders/{id}/cancel` → order `POST /orders/{id}/cancel`.
///
/// Cancelling is idempotent at order-service (a second cancel answers the cancelled order and
/// publishes nothing), so the request carries a key derived from the order id, which lets the
/// client retry a cancel that hit a transient failure.
pub async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = segment(&id)?;
    let request = ClientRequest {
        method: Method::POST,
        path: format!("/orders/{id}/cancel"),
        headers: http::HeaderMap::new(),
        body: None,
        idempotency_key: Some(format!("cancel-{id}")),
        attempt_timeout: None,
    };
    Ok(relay(state.order.send(request).await?))
}
