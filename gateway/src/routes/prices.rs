//! `/api/prices/{sku}`: reads pass through to pricing-service; changes need the admin key.

use axum::extract::{Path, State};
use axum::response::Response;
use http::Method;
use shared::client::ClientRequest;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::forward::{JsonBody, relay, segment};
use crate::state::AppState;

/// `GET /api/prices/{sku}` → pricing `GET /prices/{sku}`.
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
