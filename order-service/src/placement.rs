//! Placing an order (DESIGN §5 flow 1): price every line and reserve the whole order
//! concurrently, compensate on failure, store the order with its `order.placed` event in one
//! transaction.
//!
//! ```text
//! claim Idempotency-Key ─► price all lines ─────────────────────┐ (concurrently)
//!                          reserve all lines: ONE call, all or none┘
//!   any failure? ─► release what was reserved ─► give the key back ─► error
//!                   (reserve had no answer? replay it, same key, to learn what to release;
//!                    a short line or an unknown SKU reserved nothing: nothing to release)
//!   all good     ─► store order + outbox row ─► wake the relay ─► order
//! ```
//!
//! Once begun, the flow runs in its own task: if the caller stops waiting (its deadline passes,
//! it hangs up), the flow still finishes its bookkeeping — releasing reservations, giving the
//! idempotency key back — instead of being dropped halfway between two services.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use shared::client::ClientError;
use shared::correlation;
use shared::deadline::{self, Deadline};
use shared::money::Money;
use shared::outbox::OutboxRelay;
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

use crate::clients::{InventoryClient, PriceLookupError, PricingClient, ReserveError};
use crate::domain::{
    InvalidOrder, Order, OrderLine, OrderRequest, PriceCache, PriceSource, RequestedLine,
};
use crate::store::{KeyClaim, OrderRepository, StoreError, unix_millis};

/// How often a request waiting on another request's idempotency key looks for the finished
/// order. Placing an order takes tens of milliseconds; reading one row by primary key every
/// 20 ms (a local SQLite file, or a PostgreSQL server well under a millisecond away) costs next
/// to nothing and adds at most 20 ms to a duplicate's answer.
const KEY_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long a request waits for another request placing an order with the same idempotency key
/// before answering `409` with `Retry-After` instead. Placing an order takes tens of
/// milliseconds, so a duplicate that has waited a second waits on an owner that is slow or dead
/// (a replica killed mid-order holds its claim until it goes stale). Waiting on until the
/// deadline turned such a duplicate into a `504`, which its callers' breakers count against this
/// service (seen in the replica test: the gateway's breaker for order-service opened); a `409`
/// tells the client to come back, as the IETF Idempotency-Key draft and Stripe do.
const KEY_IN_USE_PATIENCE: Duration = Duration::from_secs(1);

/// The `Retry-After` of that `409`: about when a dead owner's claim can have gone stale, no
/// sooner than a live owner has finished.
const KEY_IN_USE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Time compensation gets to release reservations, independent of the (possibly spent) request
/// deadline: enough for a couple of attempts per release against a slow inventory. Anything not
/// released by then is left to inventory's reservation TTL (flow 4), which is the backstop.
const COMPENSATION_BUDGET: Duration = Duration::from_secs(5);

/// Time kept, when compensation is slow, to send our specific error before the request's deadline
/// passes and the deadline layer answers a generic `504` instead.
const ANSWER_MARGIN: Duration = Duration::from_millis(10);

/// The most a live price lookup may take, retries included, before the line is priced from the
/// cache: two of pricing's 500 ms attempts (see `config.rs`) and a backoff, about a quarter of the
/// 5 s edge budget, leaving the rest for reserving and storing.
const PRICE_LOOKUP_BUDGET: Duration = Duration::from_millis(1200);

/// `Retry-After` for "pricing unavailable" when the client error does not suggest one: pricing
/// outages seen here are a restart or a breaker cycle, and a second is the shortest useful wait.
const PRICING_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why an order could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The idempotency key was already used for a different order request.
    #[error("the idempotency key was already used with a different request body")]
    KeyReused,
    /// Another request with the same idempotency key is still placing its order.
    #[error("another request with this idempotency key is still being placed")]
    KeyInUse {
        /// When to send it again.
        retry_after: Duration,
    },
    /// Pricing or inventory does not know a SKU.
    #[error("unknown sku {0}")]
    UnknownSku(String),
    /// A line's stock is short.
    #[error("stock of {sku} is short ({requested} requested)")]
    OutOfStock {
        /// The short line.
        sku: String,
        /// Units asked for.
        requested: u32,
        /// Units available, if inventory said.
        available: Option<i64>,
    },
    /// Pricing could not answer and no cached price exists for the SKU.
    #[error("no price for {sku}: pricing is unavailable and nothing is cached")]
    PricingUnavailable {
        /// The unpriced line.
        sku: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The lines are priced in different currencies.
    #[error("the items are priced in different currencies ({0} and {1})")]
    MixedCurrencies(String, String),
    /// The order breaks a domain rule discovered while pricing (its total overflows).
    #[error(transparent)]
    Invalid(#[from] InvalidOrder),
    /// Inventory refused or failed (other than short stock or an unknown SKU).
    #[error("inventory failed: {0}")]
    Inventory(ClientError),
    /// The request's deadline passed before the order could be stored.
    #[error("the request deadline passed")]
    DeadlineExceeded,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The placement task panicked or was cancelled (a bug).
    #[error("placement task failed: {0}")]
    Aborted(String),
}

impl PlacementError {
    /// Which of several line failures to report: the one the client can act on first. A
    /// permanent problem (unknown SKU) beats short stock, which beats a transient outage.
    fn rank(&self) -> u8 {
        match self {
            Self::UnknownSku(_) | Self::Invalid(_) | Self::KeyReused | Self::KeyInUse { .. } => 0,
            Self::OutOfStock { .. } => 1,
            Self::MixedCurrencies(..) => 2,
            Self::PricingUnavailable { .. } => 3,
            Self::Inventory(error) if error.status().is_some() => 3,
            Self::Inventory(_) => 4,
            Self::DeadlineExceeded | Self::Store(_) | Self::Aborted(_) => 5,
        }
    }
}

/// A line's unit price and where it came from.
#[derive(Debug, Clone)]
struct LinePrice {
    price: Money,
    currency: String,
    source: PriceSource,
}

/// Places orders. Cheap to clone.
#[derive(Clone)]
pub struct OrderPlacement {
    repository: Arc<dyn OrderRepository>,
    pricing: PricingClient,
    inventory: InventoryClient,
    prices: PriceCache,
    relay: OutboxRelay,
    claim_ttl: Duration,
}

impl std::fmt::Debug for OrderPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderPlacement")
            .field("claim_ttl", &self.claim_ttl)
            .finish_non_exhaustive()
    }
}

impl OrderPlacement {
    /// The flow over its collaborators. `request_budget` is the longest any request may run; a
    /// key claim older than that plus the compensation budget belongs to a crashed process.
    pub fn new(
        repository: Arc<dyn OrderRepository>,
        pricing: PricingClient,
        inventory: InventoryClient,
        prices: PriceCache,
        relay: OutboxRelay,
        request_budget: Duration,
    ) -> Self {
        Self {
            repository,
            pricing,
            inventory,
            prices,
            relay,
            claim_ttl: request_budget + COMPENSATION_BUDGET,
        }
    }

    /// Places `request`. With an idempotency key, the first request with that key places the
    /// order and every later (or concurrent) one with the same body gets that same order.
    ///
    /// # Errors
    /// See [`PlacementError`].
    pub async fn place(
        &self,
        request: OrderRequest,
        idempotency_key: Option<String>,
    ) -> Result<Order, PlacementError> {
        match idempotency_key {
            None => self.spawn_flow(Uuid::new_v4(), request, None).await,
            Some(key) => self.place_idempotently(request, key).await,
        }
    }

    async fn place_idempotently(
        &self,
        request: OrderRequest,
        key: String,
    ) -> Result<Order, PlacementError> {
        let fingerprint = request.fingerprint();
        let patience = tokio::time::Instant::now() + KEY_IN_USE_PATIENCE;
        loop {
            // A new order ID per claim: if an earlier owner failed, its reservations were keyed
            // by its own order ID and released; reusing that ID would replay released ones.
            let order_id = Uuid::new_v4();
            let stale_before = OffsetDateTime::now_utc() - self.claim_ttl;
            let claim = self
                .repository
                .claim_key(&key, &fingerprint, order_id, unix_millis(stale_before))
                .await?;
            match claim {
                KeyClaim::Claimed => return self.spawn_flow(order_id, request, Some(key)).await,
                KeyClaim::Held {
                    fingerprint: theirs,
                    ..
                } if theirs != fingerprint => return Err(PlacementError::KeyReused),
                KeyClaim::Held { order_id, .. } => {
                    if let Some(order) = self.repository.get(order_id).await? {
                        return Ok(order);
                    }
                }
            }
            // The owner is still working (or failed and is giving the key back): wait and look
            // again, for at most `KEY_IN_USE_PATIENCE` and as long as our own caller waits.
            let next = tokio::time::Instant::now() + KEY_POLL_INTERVAL;
            if next > patience {
                return Err(PlacementError::KeyInUse {
                    retry_after: KEY_IN_USE_RETRY_AFTER,
                });
            }
            match deadline::current() {
                Some(deadline) if deadline.instant() <= next => {
                    return Err(PlacementError::DeadlineExceeded);
                }
                _ => tokio::time::sleep_until(next).await,
            }
        }
    }

    /// Runs the flow in its own task carrying the caller's correlation ID, deadline and span,
    /// and waits for it. See the module documentation for why it is a separate task.
    async fn spawn_flow(
        &self,
        order_id: Uuid,
        request: OrderRequest,
        key: Option<String>,
    ) -> Result<Order, PlacementError> {
        let this = self.clone();
        let correlation_id = correlation::current();
        let request_deadline = deadline::current();
        let flow = async move {
            let flow = this.run(order_id, request, key);
            match request_deadline {
                Some(d) => deadline::scope(d, flow).await,
                None => flow.await,
            }
        };
        let task = async move {
            match correlation_id {
                Some(id) => correlation::scope(id, flow).await,
                None => flow.await,
            }
        };
        tokio::spawn(task.instrument(tracing::Span::current()))
            .await
            .map_err(|e| PlacementError::Aborted(e.to_string()))?
    }

    async fn run(
        &self,
        order_id: Uuid,
        request: OrderRequest,
        key: Option<String>,
    ) -> Result<Order, PlacementError> {
        let result = self.price_reserve_store(order_id, &request).await;
        if let (Err(_), Some(key)) = (&result, key)
            && let Err(error) = self.repository.release_key(&key, order_id).await
        {
            // The claim then goes stale after `claim_ttl` and a retry takes it over.
            tracing::error!(%order_id, %error, "cannot give the idempotency key back");
        }
        result
    }

    async fn price_reserve_store(
        &self,
        order_id: Uuid,
        request: &OrderRequest,
    ) -> Result<Order, PlacementError> {
        let lines = request.lines();
        let pricing = join_all(lines.iter().map(|line| self.price_line(&line.sku)));
        let items = sku_qty(lines);
        let reserving = self.inventory.reserve_order(order_id, &items);
        // Wait for both, even after one fails: compensation must know the reservations that
        // were made, and a dropped in-flight reserve could complete unseen.
        let (prices, reservation) = futures::join!(pricing, reserving);

        let mut reserved = Vec::new();
        let mut outcome_unknown = false;
        let mut failure: Option<PlacementError> = None;
        let mut record = |error: PlacementError| {
            if failure.as_ref().is_none_or(|f| error.rank() < f.rank()) {
                failure = Some(error);
            }
        };
        match reservation {
            Ok(reservations) => reserved = reservations.iter().map(|r| r.reservation_id).collect(),
            // All or none at inventory: a refusal reserved nothing, so there is nothing to
            // release.
            Err(ReserveError::Short {
                sku,
                requested,
                available,
            }) => record(PlacementError::OutOfStock {
                sku,
                requested,
                available,
            }),
            Err(ReserveError::UnknownSku(sku)) => record(PlacementError::UnknownSku(sku)),
            Err(ReserveError::Rejected(error)) => record(PlacementError::Inventory(error)),
            Err(ReserveError::Unknown(error)) => {
                outcome_unknown = true;
                record(PlacementError::Inventory(error));
            }
        }
        let mut priced = Vec::with_capacity(lines.len());
        for price in prices {
            match price {
                Ok(price) => priced.push(price),
                Err(error) => record(error),
            }
        }
        if let Some(currency) = priced
            .iter()
            .find(|p| p.currency != priced[0].currency)
            .map(|p| p.currency.clone())
        {
            record(PlacementError::MixedCurrencies(
                priced[0].currency.clone(),
                currency,
            ));
        }

        let outcome = match failure {
            Some(error) => Err(error),
            None => self.store(order_id, lines, priced, &reserved).await,
        };
        if let Err(error) = &outcome {
            let unknown = outcome_unknown.then(|| lines.to_vec());
            self.compensate_within_deadline(order_id, reserved, unknown, error)
                .await;
        }
        outcome
    }

    /// Assembles and stores the order; every line is priced and reserved by now.
    async fn store(
        &self,
        order_id: Uuid,
        lines: &[RequestedLine],
        prices: Vec<LinePrice>,
        reserved: &[Uuid],
    ) -> Result<Order, PlacementError> {
        let currency = prices
            .first()
            .map(|p| p.currency.clone())
            .unwrap_or_default();
        let lines = lines
            .iter()
            .zip(prices)
            .zip(reserved)
            .map(|((line, price), reservation_id)| OrderLine {
                sku: line.sku.clone(),
                qty: line.qty,
                unit_price: price.price,
                price_source: price.source,
                reservation_id: *reservation_id,
            })
            .collect();
        let order = Order::placed(order_id, lines, currency, OffsetDateTime::now_utc())?;
        // The caller has given up: storing now would create an order the client was told failed
        // (and, without an idempotency key, would duplicate on the client's retry).
        if deadline::current().is_some_and(Deadline::is_expired) {
            return Err(PlacementError::DeadlineExceeded);
        }
        self.repository.insert_placed(&order).await?;
        self.relay.notify();
        tracing::info!(
            %order_id,
            lines = order.lines.len(),
            total = %order.total,
            currency = %order.currency,
            priced_from_cache = order.priced_from_cache(),
            "order placed"
        );
        Ok(order)
    }

    /// Prices one line live, refreshing the cache; falls back to the cache when pricing cannot
    /// answer (but not when it says the SKU does not exist).
    async fn price_line(&self, sku: &str) -> Result<LinePrice, PlacementError> {
        // A cached price is an acceptable answer, so a live lookup may not spend the budget that
        // the reservations and the store need: it gets at most PRICE_LOOKUP_BUDGET.
        let error = match deadline::within(PRICE_LOOKUP_BUDGET, self.pricing.price(sku)).await {
            Ok(live) => {
                self.prices.put(sku, live.price, &live.currency);
                return Ok(LinePrice {
                    price: live.price,
                    currency: live.currency,
                    source: PriceSource::Live,
                });
            }
            Err(PriceLookupError::UnknownSku) => {
                return Err(PlacementError::UnknownSku(sku.to_owned()));
            }
            Err(PriceLookupError::Unavailable(error)) => error,
        };
        match self.prices.get(sku) {
            Some(cached) => {
                tracing::warn!(
                    sku,
                    %error,
                    price = %cached.price,
                    age_ms = u64::try_from(cached.age().as_millis()).unwrap_or(u64::MAX),
                    "pricing unavailable; pricing the line from the cache"
                );
                Ok(LinePrice {
                    price: cached.price,
                    currency: cached.currency,
                    source: PriceSource::Cache,
                })
            }
            None => Err(PlacementError::PricingUnavailable {
                sku: sku.to_owned(),
                retry_after: error
                    .to_problem()
                    .retry_after
                    .unwrap_or(PRICING_RETRY_AFTER),
            }),
        }
    }

    /// Runs [`Self::compensate`] in its own task, with its own budget, so it completes even after
    /// the caller has gone, and waits for it only while the request's deadline leaves time: a
    /// slow inventory delays the releases, never the answer.
    async fn compensate_within_deadline(
        &self,
        order_id: Uuid,
        reserved: Vec<Uuid>,
        unknown: Option<Vec<RequestedLine>>,
        cause: &PlacementError,
    ) {
        let this = self.clone();
        let cause = cause.to_string();
        let correlation_id = correlation::current();
        let releases = async move {
            let compensation = this.compensate(order_id, reserved, unknown, &cause);
            match correlation_id {
                Some(id) => correlation::scope(id, compensation).await,
                None => compensation.await,
            }
        };
        let task = tokio::spawn(releases.instrument(tracing::Span::current()));
        let patience = deadline::current().map_or(COMPENSATION_BUDGET, |d| {
            d.remaining().saturating_sub(ANSWER_MARGIN)
        });
        if tokio::time::timeout(patience, task).await.is_err() {
            tracing::info!(%order_id, "answering before compensation finished; it goes on in the background");
        }
    }

    /// Releases every reservation this attempt made. When the reserve call had no definite
    /// answer (`unknown` holds the order's lines), its reservations are learnt first by replaying
    /// the call with the same idempotency key (which answers the original reservations if they
    /// were made, or makes them now, to be released at once) and then released.
    async fn compensate(
        &self,
        order_id: Uuid,
        reserved: Vec<Uuid>,
        unknown: Option<Vec<RequestedLine>>,
        cause: &str,
    ) {
        if reserved.is_empty() && unknown.is_none() {
            return;
        }
        tracing::warn!(
            %order_id,
            %cause,
            reserved = reserved.len(),
            outcome_unknown = unknown.is_some(),
            "order failed; releasing its reservations (compensation)"
        );
        let compensation = async {
            let mut reserved = reserved;
            if let Some(lines) = &unknown {
                match self
                    .inventory
                    .reserve_order(order_id, &sku_qty(lines))
                    .await
                {
                    Ok(found) => reserved.extend(found.iter().map(|r| r.reservation_id)),
                    Err(ReserveError::Unknown(error)) => tracing::warn!(
                        %order_id,
                        %error,
                        "cannot find out whether the order's reservations exist; leaving them to expire"
                    ),
                    // Definitely nothing reserved under this key.
                    Err(_) => {}
                }
            }
            join_all(reserved.into_iter().map(|id| self.release(id))).await;
        };
        // A fresh budget: the request's own deadline may be what failed the order.
        deadline::scope(Deadline::after(COMPENSATION_BUDGET), compensation).await;
    }

    async fn release(&self, reservation_id: Uuid) {
        match self.inventory.release(reservation_id).await {
            Ok(()) => tracing::info!(%reservation_id, "reservation released"),
            Err(error) => tracing::warn!(
                %reservation_id,
                %error,
                "cannot release a reservation; leaving it to expire"
            ),
        }
    }
}

/// The (sku, qty) pairs inventory's whole-order reserve takes; the lines are already merged, one
/// per SKU, as it requires.
fn sku_qty(lines: &[RequestedLine]) -> Vec<(&str, u32)> {
    lines
        .iter()
        .map(|line| (line.sku.as_str(), line.qty))
        .collect()
}
