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

/// A reservation inventory made for one line.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// Its ID, to release or commit it.
    pub reservation_id: Uuid,
    /// The line's product.
    pub sku: String,
}

/// Why an order's lines were not reserved.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// A line's stock is short: nothing of the order was reserved.
    #[error("stock of {sku} is short ({requested} requested)")]
    Short {
        /// The short line (the first, if several are).
        sku: String,
        /// Units asked for.
        requested: u32,
        /// Units available, as inventory reported them.
        available: Option<i64>,
    },
    /// Inventory does not know a line's SKU: nothing of the order was reserved.
    #[error("inventory does not know sku {0}")]
    UnknownSku(String),
    /// Inventory refused the request (another 4xx): nothing was reserved.
    #[error(transparent)]
    Rejected(ClientError),
    /// No definite answer (timeout, connection failure, 5xx, breaker open, a 2xx that does not
    /// decode): the reservations may or may not exist, so compensation must replay the request
    /// (same key) to learn them.
    #[error(transparent)]
    Unknown(ClientError),
}

/// One line of a whole-order `POST /reserve`.
#[derive(Serialize)]
struct ReserveItem<'a> {
    sku: &'a str,
    qty: u32,
}

/// Body of a whole-order `POST /reserve`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReserveOrderBody<'a> {
    order_id: Uuid,
    items: Vec<ReserveItem<'a>>,
}

/// Answer of a whole-order `POST /reserve`.
#[derive(Deserialize)]
struct ReservedOrder {
    reservations: Vec<Reservation>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReleaseBody {
    reservation_id: Uuid,
}

/// The fields of inventory's `409` and `404` problems that name the line and say how short its
/// stock is.
#[derive(Deserialize)]
struct LineProblem {
    sku: Option<String>,
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

    /// The idempotency key of `order_id`'s reservation call: the order ID itself. Deterministic,
    /// so a retry (by the client, or by compensation replaying the call) can never reserve twice.
    /// Inventory keys each line's reservation `<key>:<sku>`, so a line is keyed `order_id:sku`, as
    /// when order-service reserved line by line.
    pub fn reservation_key(order_id: Uuid) -> String {
        order_id.to_string()
    }

    /// `POST /reserve` of every line of `order_id` in one request, all or none, idempotent by
    /// [`Self::reservation_key`]. `lines` are (sku, qty) of distinct SKUs; the answer is one
    /// reservation per line, in the same order.
    ///
    /// # Errors
    /// See [`ReserveError`].
    pub async fn reserve_order(
        &self,
        order_id: Uuid,
        lines: &[(&str, u32)],
    ) -> Result<Vec<Reservation>, ReserveError> {
        let body = ReserveOrderBody {
            order_id,
            items: lines
                .iter()
                .map(|&(sku, qty)| ReserveItem { sku, qty })
                .collect(),
        };
        let request = ClientRequest::post_json("/reserve", &body)
            .idempotency_key(Self::reservation_key(order_id));
        let response = self.http.send(request).await.map_err(|error| {
            // A 409 or 404 names the line it is about; one that names none of this order's lines
            // is not inventory's answer to it, so it is only a refusal.
            let named = line_problem(&error).and_then(|(sku, available)| {
                let &(sku, qty) = lines.iter().find(|(line, _)| *line == sku)?;
                Some((sku.to_owned(), qty, available))
            });
            match (error.status(), named) {
                (Some(StatusCode::CONFLICT), Some((sku, requested, available))) => {
                    ReserveError::Short {
                        sku,
                        requested,
                        available,
                    }
                }
                (Some(StatusCode::NOT_FOUND), Some((sku, ..))) => ReserveError::UnknownSku(sku),
                (Some(status), _) if status.is_client_error() => ReserveError::Rejected(error),
                _ => ReserveError::Unknown(error),
            }
        })?;
        // A 2xx whose body does not decode (or does not answer each line) still reserved: the
        // outcome is known to have happened but its IDs are not, the same position as a timeout.
        let reserved: ReservedOrder = response.json().map_err(ReserveError::Unknown)?;
        let answers_each_line = reserved.reservations.len() == lines.len()
            && reserved
                .reservations
                .iter()
                .zip(lines)
                .all(|(reservation, (sku, _))| reservation.sku == *sku);
        if !answers_each_line {
            return Err(ReserveError::Unknown(ClientError::Decode {
                dependency: self.http.name(),
                source: serde::de::Error::custom(format!(
                    "{} reservations (or other SKUs) for an order of {} lines",
                    reserved.reservations.len(),
                    lines.len()
                )),
            }));
        }
        Ok(reserved.reservations)
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

/// The SKU a problem answer names, and the units available if it says.
fn line_problem(error: &ClientError) -> Option<(String, Option<i64>)> {
    match error {
        ClientError::Status { body, .. } => {
            let problem = serde_json::from_slice::<LineProblem>(body).ok()?;
            Some((problem.sku?, problem.available))
        }
        _ => None,
    }
}
