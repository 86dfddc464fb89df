//! Order storage: the [`OrderRepository`] the handlers and the consumer use, and one
//! implementation per backend.
//!
//! | module | backend | chosen when `DATABASE_URL` is |
//! |---|---|---|
//! | [`sqlite`] | an embedded file (or memory), one process | `sqlite://…`, `sqlite::memory:` |
//! | [`postgres`] | a server several replicas share | `postgres://…`, `postgresql://…` |
//!
//! Every state change that other services must hear about is written in the same transaction as
//! its outbox row, so an order is never stored without its event, nor an event published for an
//! order that was not stored. Every event consumed is recorded in the inbox in the same
//! transaction as its effect, so it is applied once however often (and to whichever replica) it
//! is delivered. The flow logic above the trait (`placement`, `messaging`) never knows the
//! backend; what makes replicas correct together lives in each backend's statements.

pub mod postgres;
pub mod sqlite;

pub use postgres::PgOrderRepository;
pub use sqlite::SqliteOrderRepository;

use futures::future::BoxFuture;
use shared::db::DatabaseError;
use shared::events::{EventLine, OrderCancelled, OrderPlaced};
use shared::money::Money;
use shared::{inbox, outbox};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::Order;

/// The SQLite schema, oldest first: this service's tables, then the shared outbox and inbox.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "orders",
        include_str!("../../migrations/sqlite/0001_orders.sql"),
    ),
    (2, "outbox", outbox::MIGRATION),
    (3, "inbox", inbox::MIGRATION),
    (4, "outbox trace context", outbox::TRACE_CONTEXT_MIGRATION),
    (
        5,
        "cached prices",
        include_str!("../../migrations/sqlite/0005_cached_prices.sql"),
    ),
];

/// The PostgreSQL schema, oldest first: the same tables in native types (UUID, TIMESTAMPTZ,
/// BIGINT, BOOLEAN), then the shared outbox (with its trace context) and inbox.
pub const PG_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "orders",
        include_str!("../../migrations/postgres/0001_orders.sql"),
    ),
    (2, "outbox", outbox::postgres::MIGRATION),
    (3, "inbox", inbox::postgres::MIGRATION),
    (
        4,
        "cached prices",
        include_str!("../../migrations/postgres/0004_cached_prices.sql"),
    ),
];

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] DatabaseError),
    /// A stored row does not make sense (a bug or a hand edit).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying shortly may succeed (the server is away, a lock or the pool is busy):
    /// the HTTP answer is then a `503` with `Retry-After`, and a consumer retries the delivery.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Database(cause) if cause.is_transient())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Database(error.into())
    }
}

/// The outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// This request owns the key and builds the order it names.
    Claimed,
    /// Another request owns the key.
    Held {
        /// The owner's request fingerprint.
        fingerprint: String,
        /// The order the owner builds (or built).
        order_id: Uuid,
    },
}

/// The outcome of a cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    /// The order as it is now.
    pub order: Order,
    /// `true` if this call cancelled it (and enqueued `order.cancelled`), `false` if it already was.
    pub newly_cancelled: bool,
}

/// One `price.changed` delivery to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceChange {
    /// The message's ID, recorded in the inbox.
    pub message_id: Uuid,
    /// Product.
    pub sku: String,
    /// New price per unit.
    pub price: Money,
    /// ISO 4217 currency.
    pub currency: String,
    /// The price's version at pricing, increasing per SKU; `0` from a publisher that sends none
    /// (then the last change applied wins, as it always did).
    pub version: u64,
}

/// What applying a [`PriceChange`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceChangeOutcome {
    /// The change is now the cached price of its SKU.
    Applied,
    /// The message was applied before (a redelivery); nothing changed.
    Duplicate,
    /// A newer version of the SKU's price is already cached; the message is recorded as handled
    /// and the older price ignored.
    Superseded,
}

/// What the service needs from storage. Methods return boxed futures so the repository can be
/// used as a trait object (`Arc<dyn OrderRepository>`).
pub trait OrderRepository: Send + Sync + 'static {
    /// Claims `key` for a new order `order_id`, atomically: exactly one concurrent caller gets
    /// [`KeyClaim::Claimed`]. A claim made before `stale_before_ms` (Unix ms) whose order was never
    /// stored is abandoned (its owner crashed) and may be taken over.
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        order_id: Uuid,
        stale_before_ms: i64,
    ) -> BoxFuture<'a, Result<KeyClaim, StoreError>>;

    /// Gives up the claim on `key` made for `order_id` (the attempt failed; a retry may claim it).
    fn release_key<'a>(
        &'a self,
        key: &'a str,
        order_id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Stores a placed order and its `order.placed` outbox row in one transaction.
    fn insert_placed<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The order with `id`, if any.
    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Order>, StoreError>>;

    /// Cancels the order with `id` and enqueues `order.cancelled` in one transaction, once: a
    /// second cancellation changes nothing. `None` if there is no such order.
    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Cancellation>, StoreError>>;

    /// Applies `changes` in queue order in one transaction: each message is recorded in the
    /// inbox, and becomes its SKU's cached price unless it was handled before or an equal or
    /// newer version is cached. One outcome per change, in order.
    fn apply_price_changes<'a>(
        &'a self,
        changes: &'a [PriceChange],
    ) -> BoxFuture<'a, Result<Vec<PriceChangeOutcome>, StoreError>>;

    /// Checks that the database answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The `order.placed` event of `order`.
fn placed_event(order: &Order) -> OrderPlaced {
    OrderPlaced {
        order_id: order.id,
        lines: event_lines(order),
        total: order.total,
        currency: order.currency.clone(),
    }
}

/// The `order.cancelled` event of `order`.
fn cancelled_event(order: &Order) -> OrderCancelled {
    OrderCancelled {
        order_id: order.id,
        lines: event_lines(order),
    }
}

fn event_lines(order: &Order) -> Vec<EventLine> {
    order
        .lines
        .iter()
        .map(|line| EventLine {
            sku: line.sku.clone(),
            qty: line.qty,
            reservation_id: line.reservation_id,
            unit_price: line.unit_price,
        })
        .collect()
}

/// A stored price version as the database's signed 64-bit integer (a version past `i64::MAX`
/// would take pricing longer than the age of the universe to reach).
fn stored_version(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
