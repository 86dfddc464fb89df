//! Stock and reservations: the repository trait, its requests and answers, and the rules both
//! backends share.
//!
//! | module | backend | what makes it correct under concurrency |
//! |---|---|---|
//! | [`sqlite`] | one embedded file per process (the default) | every read-then-write runs in a `BEGIN IMMEDIATE` transaction on the one write connection |
//! | [`postgres`] | a server several replicas share (`DATABASE_URL=postgres://…`) | each statement: conditional updates, unique keys with `ON CONFLICT`, `FOR UPDATE` where a read decides a write |
//!
//! What a state change *means* (which units an order event takes or gives back, what a replayed
//! idempotency key answers, which lines are refused) is decided here, once, by
//! [`placing`], [`cancelling`], [`check_line`], [`replay`], [`replay_order`] and
//! [`order_refusal`]; the backends only read the state and write the decision.

pub mod postgres;
pub mod sqlite;

use futures::future::BoxFuture;
use shared::db::DatabaseError;
use shared::events::EventLine;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{IdempotencyKey, Quantity, Reservation, ReservationStatus, Stock};

pub use postgres::PgInventoryStore;
pub use sqlite::SqliteInventoryStore;

/// The SQLite schema, applied in order by [`shared::db::connect`].
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "stock and reservations",
        include_str!("../../migrations/sqlite/0001_stock_and_reservations.sql"),
    ),
    (
        2,
        "seed catalogue",
        include_str!("../../migrations/sqlite/0002_seed_catalogue.sql"),
    ),
    (3, "consumer inbox", shared::inbox::MIGRATION),
    (
        4,
        "whole-order reservations",
        include_str!("../../migrations/sqlite/0004_whole_order_reservations.sql"),
    ),
];

/// The PostgreSQL schema (the same tables in native types, and the same seed), applied by
/// [`shared::pg::PgDatabase::start`] once across replicas.
pub const PG_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "stock and reservations",
        include_str!("../../migrations/postgres/0001_stock_and_reservations.sql"),
    ),
    (
        2,
        "seed catalogue",
        include_str!("../../migrations/postgres/0002_seed_catalogue.sql"),
    ),
    (3, "consumer inbox", shared::inbox::postgres::MIGRATION),
    (
        4,
        "whole-order reservations",
        include_str!("../../migrations/postgres/0004_whole_order_reservations.sql"),
    ),
];

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No stock row for the SKU.
    #[error("unknown sku {0}")]
    UnknownSku(String),
    /// Fewer units available than requested; nothing was reserved.
    #[error("insufficient stock of {sku}: requested {requested}, available {available}")]
    InsufficientStock {
        /// Product.
        sku: String,
        /// Units asked for.
        requested: u32,
        /// Units that could have been reserved.
        available: i64,
    },
    /// Lines of a whole order whose stock is short; nothing of the order was reserved.
    #[error("insufficient stock for {} line(s) of the order, first {}", .0.len(), .0[0].sku)]
    OrderShort(Vec<Shortage>),
    /// The idempotency key already names a reservation of a different SKU or quantity (or a
    /// whole order of other lines).
    #[error("idempotency key reused for a different reservation")]
    KeyReused,
    /// No such reservation.
    #[error("unknown reservation {0}")]
    UnknownReservation(Uuid),
    /// The reservation was committed by an order; only cancelling the order returns its stock.
    #[error("reservation {0} is committed")]
    Committed(Uuid),
    /// An event line does not match the reservation it names.
    #[error("event line does not match reservation {id}: {reason}")]
    LineMismatch {
        /// The reservation.
        id: Uuid,
        /// What differs.
        reason: String,
    },
    /// A stock level that cannot be set.
    #[error("{0}")]
    InvalidLevel(String),
    /// The database failed (busy, away, I/O, corrupt row).
    #[error(transparent)]
    Database(#[from] DatabaseError),
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

/// A reservation to make.
#[derive(Debug, Clone)]
pub struct ReserveStock {
    /// Product.
    pub sku: String,
    /// Units.
    pub qty: Quantity,
    /// The order it is for, if the caller said.
    pub order_id: Option<Uuid>,
    /// Makes the call idempotent.
    pub idempotency_key: Option<IdempotencyKey>,
    /// When it was asked for.
    pub now: OffsetDateTime,
    /// When it expires unless committed.
    pub expires_at: OffsetDateTime,
}

/// The most lines one whole-order reservation may have: order-service accepts at most 100
/// distinct items per order (`MAX_LINES`), so any order it takes fits in one call, and the bound
/// keeps the transaction (which holds one stock row lock per line on PostgreSQL) short.
pub const MAX_ORDER_LINES: usize = 100;

/// One line of a whole-order reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    /// Product.
    pub sku: String,
    /// Units.
    pub qty: Quantity,
}

/// A whole order to reserve in one transaction, all lines or none. Built by [`Self::new`], so
/// its lines are 1 to [`MAX_ORDER_LINES`] distinct SKUs.
#[derive(Debug, Clone)]
pub struct ReserveOrder {
    order_id: Uuid,
    lines: Vec<OrderLine>,
    idempotency_key: Option<IdempotencyKey>,
    now: OffsetDateTime,
    expires_at: OffsetDateTime,
}

impl ReserveOrder {
    /// Validates the lines: 1 to [`MAX_ORDER_LINES`], no SKU twice (a caller merges duplicates
    /// first; two reservations of one SKU under one order would share a line key).
    ///
    /// # Errors
    /// A sentence for a `422` problem's detail.
    pub fn new(
        order_id: Uuid,
        lines: Vec<OrderLine>,
        idempotency_key: Option<IdempotencyKey>,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<Self, String> {
        if lines.is_empty() || lines.len() > MAX_ORDER_LINES {
            return Err(format!(
                "items must have 1 to {MAX_ORDER_LINES} lines, got {}",
                lines.len()
            ));
        }
        for (i, line) in lines.iter().enumerate() {
            if lines[..i].iter().any(|earlier| earlier.sku == line.sku) {
                return Err(format!(
                    "sku {} appears more than once in items; merge its lines into one",
                    line.sku
                ));
            }
        }
        Ok(Self {
            order_id,
            lines,
            idempotency_key,
            now,
            expires_at,
        })
    }

    /// The order.
    pub fn order_id(&self) -> Uuid {
        self.order_id
    }

    /// The lines, in request order.
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }

    /// The request's idempotency key, if any.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        self.idempotency_key.as_ref()
    }

    /// When it was asked for.
    pub fn now(&self) -> OffsetDateTime {
        self.now
    }

    /// When its reservations expire unless committed.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }

    /// Line `sku`'s own idempotency key: `<key>:<sku>`, the key a one-line `POST /reserve` for the
    /// same order carries when the order's key is its ID (order-service's `order_id:sku`).
    pub fn line_key(&self, sku: &str) -> Option<String> {
        self.idempotency_key
            .as_ref()
            .map(|key| format!("{}:{sku}", key.as_str()))
    }

    /// Indices of the lines in SKU order: the order a backend that locks rows takes them in.
    pub fn in_sku_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.lines.len()).collect();
        order.sort_unstable_by(|&a, &b| self.lines[a].sku.cmp(&self.lines[b].sku));
        order
    }
}

/// A short line of a whole order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Shortage {
    /// Product.
    pub sku: String,
    /// Units asked for.
    pub requested: u32,
    /// Units that could have been reserved.
    pub available: i64,
}

/// The answer to a whole-order reservation.
#[derive(Debug, Clone)]
pub struct ReservedOrder {
    /// One reservation per line, in request order.
    pub reservations: Vec<Reservation>,
    /// `true` when the key named an earlier whole order and nothing new was reserved.
    pub replayed: bool,
}

/// The answer to a reservation.
#[derive(Debug, Clone)]
pub struct Reserved {
    /// The reservation (made now, or the one the idempotency key named).
    pub reservation: Reservation,
    /// `true` when the key named an earlier reservation and nothing new was reserved.
    pub replayed: bool,
}

/// What handling an order event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The message ID was already in the inbox: nothing was done.
    pub duplicate: bool,
    /// Lines whose reservation changed state.
    pub changed: usize,
    /// Lines committed although their reservation had expired (units re-taken from on hand).
    pub retaken: usize,
    /// Lines left alone because their reservation was already in the target (or a final) state.
    pub unchanged: usize,
}

impl Applied {
    /// The answer for a message ID the inbox already had.
    pub(crate) fn duplicate() -> Self {
        Self {
            duplicate: true,
            ..Self::default()
        }
    }

    /// Counts one line whose reservation was in `from` and moved by `transition` (if any).
    pub(crate) fn count(&mut self, from: ReservationStatus, transition: Option<Transition>) {
        match transition {
            Some(_) => {
                self.changed += 1;
                if from == ReservationStatus::Expired {
                    self.retaken += 1;
                }
            }
            None => self.unchanged += 1,
        }
    }
}

/// Storage of stock levels and reservations.
///
/// Methods return boxed futures so the store can live behind `Arc<dyn InventoryStore>`.
pub trait InventoryStore: Send + Sync + 'static {
    /// Checks the database answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Every SKU's stock, by SKU.
    fn list_stock(&self) -> BoxFuture<'_, Result<Vec<Stock>, StoreError>>;
    /// One SKU's stock, `None` if unknown.
    fn get_stock<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Stock>, StoreError>>;
    /// Sets `on_hand` (restock), creating the SKU if new; never below the units reserved.
    fn set_on_hand<'a>(
        &'a self,
        sku: &'a str,
        on_hand: i64,
    ) -> BoxFuture<'a, Result<Stock, StoreError>>;
    /// Reserves units atomically; with an idempotency key, at most once per key.
    fn reserve(&self, request: ReserveStock) -> BoxFuture<'_, Result<Reserved, StoreError>>;
    /// Reserves every line of an order in one transaction, all or none; with an idempotency
    /// key, at most once per key (each line also under its own [`ReserveOrder::line_key`]).
    fn reserve_order(
        &self,
        request: ReserveOrder,
    ) -> BoxFuture<'_, Result<ReservedOrder, StoreError>>;
    /// Releases a reservation (idempotent); returns its final status.
    fn release(&self, id: Uuid) -> BoxFuture<'_, Result<ReservationStatus, StoreError>>;
    /// Expires every reservation still held past its time; returns how many.
    fn expire_due(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// `order.placed`: commits each line's reservation, once per message ID.
    fn commit_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>>;
    /// `order.cancelled`: releases each line's units, once per message ID.
    fn cancel_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>>;
    /// Applies several order events (each with its message ID, in queue order) in one
    /// transaction, each once per message ID, all or none: on any error nothing is applied and
    /// nothing recorded. Answers what each did, in the same order.
    fn apply_order_events(
        &self,
        events: Vec<(Uuid, OrderEvent)>,
    ) -> BoxFuture<'_, Result<Vec<Applied>, StoreError>>;
}

/// An order event as inventory applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    /// `order.placed`: commit the lines' reservations.
    Placed(Vec<EventLine>),
    /// `order.cancelled`: give the lines' units back.
    Cancelled(Vec<EventLine>),
}

/// A reservation's move to a new status and what it does to its SKU's levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    /// The reservation's new status.
    pub to: ReservationStatus,
    /// Added to the SKU's `on_hand`.
    pub on_hand: i64,
    /// Added to the SKU's `reserved`.
    pub reserved: i64,
}

/// What `order.placed` does to `reservation`, or `None` to leave it alone.
pub(crate) fn placing(reservation: &Reservation) -> Option<Transition> {
    let qty = i64::from(reservation.qty);
    match reservation.status {
        // The units leave the warehouse: off `reserved` and off `on_hand`.
        ReservationStatus::Reserved => Some(Transition {
            to: ReservationStatus::Committed,
            on_hand: -qty,
            reserved: -qty,
        }),
        ReservationStatus::Expired => {
            // The order was accepted while the reservation lapsed (a slow publish, a broker
            // outage): the customer was promised the units, so take them from on hand again
            // rather than lose the order.
            tracing::warn!(
                reservation_id = %reservation.id,
                sku = reservation.sku,
                qty,
                "committing an expired reservation: units re-taken from stock"
            );
            Some(Transition {
                to: ReservationStatus::Committed,
                on_hand: -qty,
                reserved: 0,
            })
        }
        ReservationStatus::Committed => None,
        ReservationStatus::Released => {
            // Released explicitly (the order's cancel overtook its placement): the units were
            // given back on purpose, so placing must not take them again.
            tracing::warn!(
                reservation_id = %reservation.id,
                sku = reservation.sku,
                "order placed for a released reservation: left released"
            );
            None
        }
    }
}

/// What `order.cancelled` does to `reservation`, or `None` when its units are already back.
pub(crate) fn cancelling(reservation: &Reservation) -> Option<Transition> {
    let qty = i64::from(reservation.qty);
    match reservation.status {
        ReservationStatus::Reserved => Some(Transition {
            to: ReservationStatus::Released,
            on_hand: 0,
            reserved: -qty,
        }),
        // The order's units left with it; cancelling puts them back on the shelf.
        ReservationStatus::Committed => Some(Transition {
            to: ReservationStatus::Released,
            on_hand: qty,
            reserved: 0,
        }),
        ReservationStatus::Released | ReservationStatus::Expired => None,
    }
}

/// Checks that an event line describes the reservation it names.
///
/// # Errors
/// [`StoreError::LineMismatch`] saying what differs.
pub(crate) fn check_line(reservation: &Reservation, line: &EventLine) -> Result<(), StoreError> {
    if reservation.sku != line.sku || reservation.qty != line.qty {
        return Err(StoreError::LineMismatch {
            id: reservation.id,
            reason: format!(
                "line has {} × {}, reservation holds {} × {}",
                line.qty, line.sku, reservation.qty, reservation.sku
            ),
        });
    }
    Ok(())
}

/// The answer to `request` when its idempotency key already names `earlier`.
///
/// # Errors
/// [`StoreError::KeyReused`] when `earlier` is for another SKU or quantity.
pub(crate) fn replay(earlier: Reservation, request: &ReserveStock) -> Result<Reserved, StoreError> {
    if earlier.sku != request.sku || earlier.qty != request.qty.get() {
        return Err(StoreError::KeyReused);
    }
    Ok(Reserved {
        reservation: earlier,
        replayed: true,
    })
}

/// The answer to a whole-order `request` whose key already names an earlier whole order of
/// `earlier_lines` lines, of which `found` are the reservations stored under the request's line
/// keys (in any order).
///
/// # Errors
/// [`StoreError::KeyReused`] unless the earlier order had exactly the request's lines: the same
/// SKUs with the same quantities.
pub(crate) fn replay_order(
    request: &ReserveOrder,
    earlier_lines: usize,
    mut found: Vec<Reservation>,
) -> Result<ReservedOrder, StoreError> {
    if earlier_lines != request.lines.len() || found.len() != request.lines.len() {
        return Err(StoreError::KeyReused);
    }
    let mut reservations = Vec::with_capacity(found.len());
    for line in &request.lines {
        let at = found
            .iter()
            .position(|r| r.sku == line.sku && r.qty == line.qty.get())
            .ok_or(StoreError::KeyReused)?;
        reservations.push(found.swap_remove(at));
    }
    Ok(ReservedOrder {
        reservations,
        replayed: true,
    })
}

/// Why a whole-order `request` reserved nothing. `failed` is the index of the line whose
/// conditional update took nothing; `untried` the indices of the lines the transaction had not
/// reached yet; `stocks` the stock of those lines (and of `failed`), as read after the failure.
/// Lines the transaction had already reserved were available and are not named.
///
/// An unknown SKU wins over short stock, since it is permanent (`failed`'s first, else the first
/// in request order); otherwise every short line is named, in request order, `failed` always
/// among them.
pub(crate) fn order_refusal(
    request: &ReserveOrder,
    failed: usize,
    untried: &[usize],
    stocks: &[Stock],
) -> StoreError {
    let stock_of = |i: usize| {
        stocks
            .iter()
            .find(|stock| stock.sku == request.lines[i].sku)
    };
    let mut unreserved: Vec<usize> = untried.iter().copied().chain([failed]).collect();
    unreserved.sort_unstable();
    if stock_of(failed).is_none() {
        return StoreError::UnknownSku(request.lines[failed].sku.clone());
    }
    if let Some(&unknown) = unreserved.iter().find(|&&i| stock_of(i).is_none()) {
        return StoreError::UnknownSku(request.lines[unknown].sku.clone());
    }
    let shortages = unreserved
        .into_iter()
        .filter_map(|i| {
            let (line, stock) = (&request.lines[i], stock_of(i)?);
            let requested = line.qty.get();
            (i == failed || stock.available < i64::from(requested)).then(|| Shortage {
                sku: line.sku.clone(),
                requested,
                available: stock.available.max(0),
            })
        })
        .collect();
    StoreError::OrderShort(shortages)
}

/// Why `request` reserved nothing, given its SKU's stock as it was then.
pub(crate) fn refusal(request: ReserveStock, stock: Option<Stock>) -> StoreError {
    match stock {
        None => StoreError::UnknownSku(request.sku),
        Some(stock) => StoreError::InsufficientStock {
            sku: request.sku,
            requested: request.qty.get(),
            available: stock.available.max(0),
        },
    }
}

/// Refuses a negative stock level.
///
/// # Errors
/// [`StoreError::InvalidLevel`].
pub(crate) fn check_level(on_hand: i64) -> Result<(), StoreError> {
    if on_hand < 0 {
        return Err(StoreError::InvalidLevel(format!(
            "onHand must not be negative, got {on_hand}"
        )));
    }
    Ok(())
}

/// The refusal of an `on_hand` below what reservations hold.
pub(crate) fn below_reserved(on_hand: i64, reserved: i64) -> StoreError {
    StoreError::InvalidLevel(format!(
        "onHand {on_hand} is below the {reserved} units currently reserved"
    ))
}

#[cfg(test)]
mod tests;
