//! Typed calls to pricing and inventory over the shared resilient client.
//!
//! The resilient client owns timeouts, retries, the breaker, correlation and deadline headers;
//! this module only knows the two APIs (paths, bodies) and turns their answers into outcomes the
//! order flow can decide on.

use http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::client::{ClientError, ClientRequest, ResilientClient};
use shared::money::Money;
use uuid::Uuid;

/// A price as pricing reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    /// Price per unit.
    pub price: Money,
    /// ISO 4217 currency.
    pub currency: String,
}

/// Why a price lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum PriceLookupError {
    /// Pricing does not know the SKU.
    #[error("pricing does not know the sku")]
    UnknownSku,
    /// Pricing could not answer (down, slow, breaker open, 5xx, or an unexpected answer).
    #[error(transparent)]
    Unavailable(ClientError),
}

/// Client of pricing-service.
#[derive(Debug, Clone)]
pub struct PricingClient {
    http: ResilientClient,
}

impl PricingClient {
    /// Wraps the resilient client built for pricing.
    pub fn new(http: ResilientClient) -> Self {
        Self { http }
    }

    /// The underlying client (for readiness and metrics).
    pub fn http(&self) -> &ResilientClient {
        &self.http
    }

    /// `GET /prices/{sku}`. `sku` must be a validated catalogue code (URL-safe).
    ///
    /// # Errors
    /// See [`PriceLookupError`].
    pub async fn price(&self, sku: &str) -> Result<Price, PriceLookupError> {
        let response = self
            .http
            .send(ClientRequest::get(format!("/prices/{sku}")))
            .await
            .map_err(|error| match error.status() {
                Some(StatusCode::NOT_FOUND) => PriceLookupError::UnknownSku,
                _ => PriceLookupError::Unavailable(error),
            })?;
        response.json().map_err(PriceLookupError::Unavailable)
    }
}

/// A reservation inventory made.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// Its ID, to release or commit it.
    pub reservation_id: Uuid,
}

/// Why a reservation was not made.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Not enough stock: nothing was reserved.
    #[error("stock is short ({requested} requested)")]
    Short {
        /// Units asked for.
        requested: u32,
        /// Units available, as inventory reported them.
        available: Option<i64>,
    },
    /// Inventory does not know the SKU: nothing was reserved.
    #[error("inventory does not know the sku")]
    UnknownSku,
    /// Inventory refused the request (another 4xx): nothing was reserved.
    #[error(transparent)]
    Rejected(ClientError),
    /// No definite answer (timeout, connection failure, 5xx, breaker open): the reservation may
    /// or may not exist, so compensation must look it up by its idempotency key.
    #[error(transparent)]
    Unknown(ClientError),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReserveBody<'a> {
    sku: &'a str,
    qty: u32,
    order_id: Uuid,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReleaseBody {
    reservation_id: Uuid,
}

/// The fields of inventory's `409` problem that say how short the stock is.
#[derive(Deserialize)]
struct ShortStock {
    available: Option<i64>,
}

/// Client of inventory-service.
#[derive(Debug, Clone)]
pub struct InventoryClient {
    http: ResilientClient,
}

impl InventoryClient {
    /// Wraps the resilient client built for inventory.
    pub fn new(http: ResilientClient) -> Self {
        Self { http }
    }

    /// The underlying client (for readiness and metrics).
    pub fn http(&self) -> &ResilientClient {
        &self.http
    }

    /// The idempotency key of `sku`'s reservation for `order_id`. Deterministic, so a retry (by
    /// the client, or by compensation looking the reservation up) can never reserve twice.
    pub fn reservation_key(order_id: Uuid, sku: &str) -> String {
        format!("{order_id}:{sku}")
    }

    /// `POST /reserve` for one line of `order_id`, idempotent by [`Self::reservation_key`].
    ///
    /// # Errors
    /// See [`ReserveError`].
    pub async fn reserve(
        &self,
        order_id: Uuid,
        sku: &str,
        qty: u32,
    ) -> Result<Reservation, ReserveError> {
        let request = ClientRequest::post_json("/reserve", &ReserveBody { sku, qty, order_id })
            .idempotency_key(Self::reservation_key(order_id, sku));
        let response = self
            .http
            .send(request)
            .await
            .map_err(|error| match error.status() {
                Some(StatusCode::CONFLICT) => ReserveError::Short {
                    requested: qty,
                    available: short_stock_available(&error),
                },
                Some(StatusCode::NOT_FOUND) => ReserveError::UnknownSku,
                Some(status) if status.is_client_error() => ReserveError::Rejected(error),
                _ => ReserveError::Unknown(error),
            })?;
        // A 2xx whose body does not decode still reserved: the outcome is known to have happened
        // but its ID is not, which is the same position as a timeout.
        response.json().map_err(ReserveError::Unknown)
    }

    /// `POST /release` (idempotent at inventory, so the client may retry it).
    ///
    /// # Errors
    /// The client's error if inventory did not confirm the release.
    pub async fn release(&self, reservation_id: Uuid) -> Result<(), ClientError> {
        let request = ClientRequest::post_json("/release", &ReleaseBody { reservation_id })
            .idempotency_key(format!("release:{reservation_id}"));
        self.http.send(request).await.map(drop)
    }
}

fn short_stock_available(error: &ClientError) -> Option<i64> {
    match error {
        ClientError::Status { body, .. } => serde_json::from_slice::<ShortStock>(body)
            .ok()
            .and_then(|s| s.available),
        _ => None,
    }
}
