//! `/api/products/{sku}`: price and availability fetched in parallel and merged.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shared::client::{ClientError, ClientRequest, ResilientClient};
use shared::deadline;
use shared::money::Money;

use crate::error::{ApiError, is_refusal};
use crate::forward::segment;
use crate::openapi::Problem;
use crate::state::AppState;

/// The most either lookup may take, retries included, before the product is answered without
/// it: two [`LOOKUP_ATTEMPT_TIMEOUT`]s and a backoff. A shop page shows "price unknown" after a
/// second rather than everything after the whole 5 s edge budget.
const LOOKUP_BUDGET: Duration = Duration::from_millis(1200);

/// A one-row lookup answers in milliseconds; 500 ms (not the client's general 2 s) lets two full
/// attempts fit in [`LOOKUP_BUDGET`], so a hanging side trips its breaker (only full attempts
/// count) and the next products are answered without it at once.
const LOOKUP_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// The part of pricing's answer a product shows.
#[derive(Debug, Deserialize)]
struct Price {
    name: String,
    price: Money,
    currency: String,
}

/// The part of inventory's answer a product shows.
#[derive(Debug, Deserialize)]
struct Stock {
    available: i64,
}

/// A product as the public API shows it: what each side knows, and which side is missing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    sku: String,
    name: Option<String>,
    #[schema(value_type = Option<f64>, minimum = 0)]
    price: Option<Money>,
    currency: Option<String>,
    available: Option<i64>,
    /// The parts that could not be fetched: `price`, `availability`.
    #[schema(value_type = Vec<String>)]
    missing: Vec<&'static str>,
}

/// `GET /api/products/{sku}` → pricing `GET /prices/{sku}` and inventory `GET /stock/{sku}` at once.
///
/// Both calls run concurrently, so the answer takes as long as the slower one, not the sum, and
/// at most [`LOOKUP_BUDGET`]. When one side fails (down, timed out, breaker open, or it does not
/// know the sku) the product is still answered with what the other side knows and `missing`
/// names the gap: a shop page can show a price with "availability unknown" rather than an error.
/// Only when both fail is the answer an error: `404` if neither knows the sku, otherwise the
/// worse upstream failure.
#[utoipa::path(
    get,
    path = "/api/products/{sku}",
    tag = "products",
    params(("sku" = String, Path, description = "The product's SKU")),
    responses(
        (status = 200, description = "What is known about the product; `missing` names the parts that are not", body = Product),
        (status = 404, description = "Neither pricing nor inventory knows the SKU", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn get_product(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Product>, ApiError> {
    let encoded = segment(&sku)?;
    let (price, stock) = deadline::within(LOOKUP_BUDGET, async {
        tokio::join!(
            lookup::<Price>(&state.pricing, format!("/prices/{encoded}")),
            lookup::<Stock>(&state.inventory, format!("/stock/{encoded}")),
        )
    })
    .await;
    let mut product = Product {
        sku,
        name: None,
        price: None,
        currency: None,
        available: None,
        missing: Vec::new(),
    };
    match (price, stock) {
        (Err(price_error), Err(stock_error)) => {
            return Err(both_failed(product.sku, price_error, stock_error));
        }
        (price, stock) => {
            match price {
                Ok(price) => {
                    product.name = Some(price.name);
                    product.price = Some(price.price);
                    product.currency = Some(price.currency);
                }
                Err(error) => {
                    tracing::warn!(%error, "answering the product without its price");
                    product.missing.push("price");
                }
            }
            match stock {
                Ok(stock) => product.available = Some(stock.available),
                Err(error) => {
                    tracing::warn!(%error, "answering the product without its availability");
                    product.missing.push("availability");
                }
            }
        }
    }
    Ok(Json(product))
}

/// One side's answer, with the short attempts of a lookup that has a fallback.
async fn lookup<T: DeserializeOwned>(
    client: &ResilientClient,
    path: String,
) -> Result<T, ClientError> {
    client
        .send(ClientRequest::get(path).attempt_timeout(LOOKUP_ATTEMPT_TIMEOUT))
        .await?
        .json()
}

/// The error to answer when neither side could say anything about `sku`.
fn both_failed(sku: String, price: ClientError, stock: ClientError) -> ApiError {
    let not_found = |e: &ClientError| e.status() == Some(http::StatusCode::NOT_FOUND);
    if not_found(&price) && not_found(&stock) {
        return ApiError::ProductNotFound { sku };
    }
    tracing::warn!(price_error = %price, stock_error = %stock, "product unavailable: both sides failed");
    if severity(&stock) > severity(&price) {
        ApiError::Upstream(stock)
    } else {
        ApiError::Upstream(price)
    }
}

/// Orders failures so the worse one is answered. A refusal (4xx: the request itself is the
/// problem) ranks below any failure of a dependency, and among failures a higher status ranks
/// higher: a `504` means work may still be running somewhere, which a client must treat more
/// carefully than a `503` (nothing happened, come back later) or a `502` (a bad answer).
fn severity(error: &ClientError) -> u16 {
    if is_refusal(error) {
        0
    } else {
        error.to_problem().status
    }
}
