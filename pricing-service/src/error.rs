//! The HTTP error type: every failure a handler can answer, mapped to problem+json.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use shared::problem::Problem;

use crate::store::StoreError;

/// Everything a handler can fail with. Internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No price for the SKU.
    #[error("unknown sku {0}")]
    UnknownSku(String),
    /// Well-formed but unacceptable input; the string says why.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error("storage failure")]
    Storage(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match &self {
            Self::UnknownSku(sku) => Problem::new(StatusCode::NOT_FOUND, "Unknown SKU")
                .detail(format!("no price for sku {sku}"))
                .with("sku", sku),
            Self::Invalid(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request").detail(reason)
            }
            Self::Storage(cause) => {
                tracing::error!(error = %cause, "storage failure");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
            }
        };
        problem.into_response()
    }
}
