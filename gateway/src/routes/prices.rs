//! `/api/prices/{sku}`: reads pass through to pricing-service; changes need the admin key.

use axum::extract::{Path, State};
use axum::response::Response;
use http::Method;
use shared::client::ClientRequest;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::forward::{JsonBody, relay, segment};
use crate::openapi::{Price, Problem, SetPrice};
use crate::state::AppState;

/// `GET /api/prices/{sku}` → pricing `GET /prices/{sku}`.
#[utoipa::path(
    get,
    path = "/api/prices/{sku}",
    tag = "prices",
    params(("sku" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "The product's SKU")),
    responses(
        (status = 200, description = "The price", body = Price),
        (status = 404, description = "No such SKU", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn get_price(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    let path = format!("/prices/{}", segment(&sku)?);
    Ok(relay(state.pricing.send(ClientRequest::get(path)).await?))
}

/// `PUT /api/prices/{sku}` (admin) → pricing `PUT /prices/{sku}`, the body forwarded as is.
///
/// The API key is checked by the [`Admin`] extractor and is not forwarded: inside the system the
/// gateway is the caller, and the key should live in as few places as possible.
#[utoipa::path(
    put,
    path = "/api/prices/{sku}",
    tag = "prices",
    security(("apiKey" = [])),
    params(("sku" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "The product's SKU")),
    request_body(content = SetPrice, content_type = "application/json"),
    responses(
        (status = 200, description = "The price was changed", body = Price),
        (status = 201, description = "A new SKU was created with this price", body = Price,
            headers(("Location" = String, description = "The price's URL"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong x-api-key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a valid price, currency or SKU", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn put_price(
    _admin: Admin,
    State(state): State<AppState>,
    Path(sku): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    // PUT is idempotent by definition (the same price set twice is the same state), so the client
    // may retry it without a key.
    let request = ClientRequest {
        method: Method::PUT,
        path: format!("/prices/{}", segment(&sku)?),
        headers: body.headers(),
        body: Some(body.bytes),
        idempotency_key: None,
        attempt_timeout: None,
    };
    Ok(relay(state.pricing.send(request).await?))
}
