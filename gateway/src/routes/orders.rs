//! `/api/orders`: forwarded to order-service.

use axum::extract::{Path, State};
use axum::response::Response;
use http::{Method, header};
use shared::client::ClientRequest;

use crate::error::ApiError;
use crate::forward::{IdempotencyKey, JsonBody, public_location, relay, segment};
use crate::openapi::{Order, OrderRequest, Problem};
use crate::state::AppState;

/// `POST /api/orders` → order `POST /orders`, the body forwarded byte for byte.
///
/// With an `Idempotency-Key` the client may retry the POST after a transient failure, because
/// order-service answers a repeated key with the order it already placed. Without one, a POST is
/// never retried: a retry after a lost answer could place the order twice.
#[utoipa::path(
    post,
    path = "/api/orders",
    tag = "orders",
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255, min_length = 1, pattern = "^[!-~]+$",
            description = "Makes the POST safe to repeat: the same key answers the same order"),
    ),
    request_body(content = OrderRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The order was placed", body = Order,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 400, description = "Malformed JSON or an invalid Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not enough stock for a line, or another request with the same Idempotency-Key is still being placed (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a valid order (unknown or invalid SKU, zero or too large quantity), or the Idempotency-Key was used for a different order", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
#[utoipa::path(
    get,
    path = "/api/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", description = "The order's id")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
#[utoipa::path(
    post,
    path = "/api/orders/{id}/cancel",
    tag = "orders",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", description = "The order's id")),
    responses(
        (status = 200, description = "The cancelled order (also when it was cancelled before)", body = Order),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
