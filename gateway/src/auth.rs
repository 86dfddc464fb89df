//! The admin check: routes that change state for everyone (prices) need the `ADMIN_API_KEY`.

use axum::extract::FromRequestParts;
use http::HeaderName;
use http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

/// The header carrying the admin key.
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Proof that the request carried the admin key. As an extractor it runs before the body is read,
/// so an unauthenticated caller gets `401` without the gateway reading or forwarding anything.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts.headers.get(&API_KEY).map(http::HeaderValue::as_bytes);
        match presented {
            Some(key) if state.admin_api_key.matches(key) => Ok(Self),
            _ => {
                tracing::warn!(
                    key_present = presented.is_some(),
                    "admin request rejected: missing or wrong API key"
                );
                Err(ApiError::Unauthorized)
            }
        }
    }
}
