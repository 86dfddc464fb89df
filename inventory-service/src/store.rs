//! Stock and reservations: the repository trait and its SQLite implementation.
//!
//! Every operation that reads and then writes runs in one `BEGIN IMMEDIATE` transaction on the
//! service's write connection ([`shared::db::Database::begin_write`]): it takes SQLite's write
//! lock up front, so two requests can never both read "enough stock" and both reserve, and a
//! reader never has to upgrade to a writer mid-transaction (the upgrade is what fails with
//! `SQLITE_BUSY` at once, bypassing the busy timeout).

use futures::future::BoxFuture;
use shared::db::{Database, DatabaseError};
use shared::events::EventLine;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{IdempotencyKey, Quantity, Reservation, ReservationStatus, Stock};

/// The schema, applied in order by [`shared::db::connect`].
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "stock and reservations",
        include_str!("../migrations/0001_stock_and_reservations.sql"),
    ),
    (
        2,
        "seed catalogue",
        include_str!("../migrations/0002_seed_catalogue.sql"),
    ),
    (3, "consumer inbox", shared::inbox::MIGRATION),
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
    /// The idempotency key already names a reservation of a different SKU or quantity.
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
    /// The database failed (busy, I/O, corrupt row).
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
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
    /// Sets `on_hand` (restock), creating the SKU if new.
    fn set_on_hand<'a>(
        &'a self,
        sku: &'a str,
        on_hand: i64,
    ) -> BoxFuture<'a, Result<Stock, StoreError>>;
    /// Reserves units atomically; with an idempotency key, at most once per key.
    fn reserve(&self, request: ReserveStock) -> BoxFuture<'_, Result<Reserved, StoreError>>;
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

/// [`InventoryStore`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteInventoryStore {
    db: Database,
}

impl SqliteInventoryStore {
    /// A store over an opened, migrated database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The read pool.
    pub fn pool(&self) -> &SqlitePool {
        self.db.pool()
    }
}

fn millis(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn parse_uuid(raw: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(raw).map_err(|e| corrupt(format!("stored id {raw:?}: {e}")))
}

fn stock_from_row(row: &SqliteRow) -> Result<Stock, sqlx::Error> {
    Ok(Stock::new(
        row.try_get::<String, _>("sku")?,
        row.try_get("on_hand")?,
        row.try_get("reserved")?,
    ))
}

const RESERVATION_COLUMNS: &str =
    "id, sku, qty, order_id, status, remaining_after, expires_at_ms FROM reservations";

fn reservation_from_row(row: &SqliteRow) -> Result<Reservation, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let qty: i64 = row.try_get("qty")?;
    let order_id: Option<String> = row.try_get("order_id")?;
    Ok(Reservation {
        id: parse_uuid(&row.try_get::<String, _>("id")?)?,
        sku: row.try_get("sku")?,
        qty: u32::try_from(qty).map_err(|_| corrupt(format!("stored qty {qty}")))?,
        order_id: order_id.as_deref().map(parse_uuid).transpose()?,
        status: ReservationStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("stored status {status:?}")))?,
        remaining_after: row.try_get("remaining_after")?,
        expires_at: from_millis(row.try_get("expires_at_ms")?),
    })
}

async fn find_reservation(
    conn: &mut SqliteConnection,
    id: Uuid,
) -> Result<Option<Reservation>, sqlx::Error> {
    sqlx::query(&format!("SELECT {RESERVATION_COLUMNS} WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(reservation_from_row)
        .transpose()
}

async fn set_status(
    conn: &mut SqliteConnection,
    id: Uuid,
    status: ReservationStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reservations SET status = ? WHERE id = ?")
        .bind(status.as_str())
        .bind(id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds `reserved_delta` and `on_hand_delta` to a SKU's levels.
async fn adjust_stock(
    conn: &mut SqliteConnection,
    sku: &str,
    on_hand_delta: i64,
    reserved_delta: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE stock SET on_hand = on_hand + ?, reserved = reserved + ? WHERE sku = ?")
        .bind(on_hand_delta)
        .bind(reserved_delta)
        .bind(sku)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks the reservation an event line names committed if it is still held and matches the
/// line; `false` (nothing changed) otherwise.
async fn commit_held(conn: &mut SqliteConnection, line: &EventLine) -> Result<bool, sqlx::Error> {
    let changed = sqlx::query(
        "UPDATE reservations SET status = 'committed' \
         WHERE id = ? AND sku = ? AND qty = ? AND status = 'reserved'",
    )
    .bind(line.reservation_id.to_string())
    .bind(&line.sku)
    .bind(i64::from(line.qty))
    .execute(conn)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

/// Loads the reservation an event line names and checks that the line describes it.
async fn reservation_for_line(
    conn: &mut SqliteConnection,
    line: &EventLine,
) -> Result<Reservation, StoreError> {
    let reservation = find_reservation(conn, line.reservation_id)
        .await?
        .ok_or(StoreError::UnknownReservation(line.reservation_id))?;
    if reservation.sku != line.sku || reservation.qty != line.qty {
        return Err(StoreError::LineMismatch {
            id: reservation.id,
            reason: format!(
                "line has {} × {}, reservation holds {} × {}",
                line.qty, line.sku, reservation.qty, reservation.sku
            ),
        });
    }
    Ok(reservation)
}

impl InventoryStore for SqliteInventoryStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(self.db.pool()).await?;
            Ok(())
        })
    }

    fn list_stock(&self) -> BoxFuture<'_, Result<Vec<Stock>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT sku, on_hand, reserved FROM stock ORDER BY sku")
                .fetch_all(self.db.pool())
                .await?;
            Ok(rows.iter().map(stock_from_row).collect::<Result<_, _>>()?)
        })
    }

    fn get_stock<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Stock>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = ?")
                .bind(sku)
                .fetch_optional(self.db.pool())
                .await?;
            Ok(row.as_ref().map(stock_from_row).transpose()?)
        })
    }

    fn set_on_hand<'a>(
        &'a self,
        sku: &'a str,
        on_hand: i64,
    ) -> BoxFuture<'a, Result<Stock, StoreError>> {
        Box::pin(async move {
            if on_hand < 0 {
                return Err(StoreError::InvalidLevel(format!(
                    "onHand must not be negative, got {on_hand}"
                )));
            }
            let mut tx = self.db.begin_write().await?;
            let reserved: i64 = sqlx::query("SELECT reserved FROM stock WHERE sku = ?")
                .bind(sku)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("reserved"))
                .transpose()?
                .unwrap_or(0);
            if on_hand < reserved {
                return Err(StoreError::InvalidLevel(format!(
                    "onHand {on_hand} is below the {reserved} units currently reserved"
                )));
            }
            sqlx::query(
                "INSERT INTO stock (sku, on_hand, reserved) VALUES (?, ?, 0) \
                 ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand",
            )
            .bind(sku)
            .bind(on_hand)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Stock::new(sku, on_hand, reserved))
        })
    }

    fn reserve(&self, request: ReserveStock) -> BoxFuture<'_, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let qty = request.qty.get();
            // One write transaction for the whole decision, so a concurrent request with the same
            // key waits for the lock and then finds this reservation. The common case costs two
            // statements: take the units if enough are available, then record the reservation.
            // Every statement is a round trip to sqlx's SQLite worker thread, and this is the
            // hottest write of the order path.
            let mut tx = self.db.begin_write().await?;
            let taken = sqlx::query(
                "UPDATE stock SET reserved = reserved + ?1 \
                 WHERE sku = ?2 AND on_hand - reserved >= ?1 \
                 RETURNING on_hand - reserved AS remaining",
            )
            .bind(i64::from(qty))
            .bind(&request.sku)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = taken {
                let reservation = Reservation {
                    id: Uuid::new_v4(),
                    sku: request.sku.clone(),
                    qty,
                    order_id: request.order_id,
                    status: ReservationStatus::Reserved,
                    remaining_after: row.try_get("remaining")?,
                    // Stored in milliseconds: answer what a replay will read back.
                    expires_at: from_millis(millis(request.expires_at)),
                };
                // The UNIQUE key turns a replay into "nothing inserted" instead of a second
                // reservation; it is answered below, and the units taken above are given back when
                // the transaction is rolled back.
                let inserted = sqlx::query(
                    "INSERT INTO reservations (id, sku, qty, order_id, idempotency_key, status, \
                     remaining_after, created_at_ms, expires_at_ms) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(reservation.id.to_string())
                .bind(&reservation.sku)
                .bind(i64::from(qty))
                .bind(reservation.order_id.map(|id| id.to_string()))
                .bind(request.idempotency_key.as_ref().map(IdempotencyKey::as_str))
                .bind(reservation.status.as_str())
                .bind(reservation.remaining_after)
                .bind(millis(request.now))
                .bind(millis(reservation.expires_at))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 1 {
                    tx.commit().await?;
                    return Ok(Reserved {
                        reservation,
                        replayed: false,
                    });
                }
            }
            // Nothing new is reserved: a replay of an earlier key, an unknown SKU or short stock.
            // Still inside the transaction (whose UPDATE, if any, is rolled back when it drops),
            // so the answer describes the same state the UPDATE saw.
            if let Some(key) = &request.idempotency_key {
                let earlier = sqlx::query(&format!(
                    "SELECT {RESERVATION_COLUMNS} WHERE idempotency_key = ?"
                ))
                .bind(key.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = earlier {
                    let reservation = reservation_from_row(&row)?;
                    if reservation.sku != request.sku || reservation.qty != qty {
                        return Err(StoreError::KeyReused);
                    }
                    return Ok(Reserved {
                        reservation,
                        replayed: true,
                    });
                }
            }
            let stock = sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = ?")
                .bind(&request.sku)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(stock_from_row)
                .transpose()?
                .ok_or_else(|| StoreError::UnknownSku(request.sku.clone()))?;
            Err(StoreError::InsufficientStock {
                sku: request.sku,
                requested: qty,
                available: stock.available.max(0),
            })
        })
    }

    fn release(&self, id: Uuid) -> BoxFuture<'_, Result<ReservationStatus, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let reservation = find_reservation(&mut tx, id)
                .await?
                .ok_or(StoreError::UnknownReservation(id))?;
            match reservation.status {
                ReservationStatus::Committed => Err(StoreError::Committed(id)),
                // Already given back (by an earlier release, a cancel or the sweeper).
                status @ (ReservationStatus::Released | ReservationStatus::Expired) => Ok(status),
                ReservationStatus::Reserved => {
                    adjust_stock(&mut tx, &reservation.sku, 0, -i64::from(reservation.qty)).await?;
                    set_status(&mut tx, id, ReservationStatus::Released).await?;
                    tx.commit().await?;
                    Ok(ReservationStatus::Released)
                }
            }
        })
    }

    fn expire_due(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let now = millis(now);
            let mut tx = self.db.begin_write().await?;
            // Set-based: give each SKU back the sum of its due reservations, then mark them, in
            // one transaction so the two statements see the same set.
            sqlx::query(
                "UPDATE stock SET reserved = reserved - ( \
                     SELECT COALESCE(SUM(qty), 0) FROM reservations r \
                     WHERE r.sku = stock.sku AND r.status = 'reserved' AND r.expires_at_ms <= ?1) \
                 WHERE sku IN (SELECT sku FROM reservations \
                               WHERE status = 'reserved' AND expires_at_ms <= ?1)",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let expired = sqlx::query(
                "UPDATE reservations SET status = 'expired' \
                 WHERE status = 'reserved' AND expires_at_ms <= ?",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(expired)
        })
    }

    fn commit_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let applied = commit_lines(&mut tx, message_id, &lines).await?;
            tx.commit().await?;
            Ok(applied)
        })
    }

    fn cancel_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let applied = cancel_lines(&mut tx, message_id, &lines).await?;
            tx.commit().await?;
            Ok(applied)
        })
    }

    fn apply_order_events(
        &self,
        events: Vec<(Uuid, OrderEvent)>,
    ) -> BoxFuture<'_, Result<Vec<Applied>, StoreError>> {
        Box::pin(async move {
            // One transaction for the whole batch: one BEGIN and one COMMIT (and, on disk, one
            // WAL sync point) however many events; an error drops `tx`, rolling all of it back.
            let mut tx = self.db.begin_write().await?;
            let mut results = Vec::with_capacity(events.len());
            for (message_id, event) in &events {
                results.push(match event {
                    OrderEvent::Placed(lines) => commit_lines(&mut tx, *message_id, lines).await?,
                    OrderEvent::Cancelled(lines) => {
                        cancel_lines(&mut tx, *message_id, lines).await?
                    }
                });
            }
            tx.commit().await?;
            Ok(results)
        })
    }
}

/// `order.placed` inside the caller's transaction: records `message_id` in the inbox and
/// commits each line's reservation, or does nothing when the inbox already had it.
async fn commit_lines(
    tx: &mut SqliteConnection,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    if !shared::inbox::record(&mut *tx, message_id).await? {
        return Ok(Applied {
            duplicate: true,
            ..Applied::default()
        });
    }
    let mut applied = Applied::default();
    for line in lines {
        let qty = i64::from(line.qty);
        // The common case in two statements: the line's reservation is still held, so
        // mark it committed and take its units off both levels. Anything else (expired,
        // already committed, released, not matching the line) takes the slow path.
        if commit_held(&mut *tx, line).await? {
            adjust_stock(&mut *tx, &line.sku, -qty, -qty).await?;
            applied.changed += 1;
            continue;
        }
        let reservation = reservation_for_line(&mut *tx, line).await?;
        match reservation.status {
            // Not after `commit_held` in this transaction; kept so the match says what
            // committing a held reservation means.
            ReservationStatus::Reserved => {
                adjust_stock(&mut *tx, &reservation.sku, -qty, -qty).await?;
                applied.changed += 1;
            }
            ReservationStatus::Expired => {
                // The order was accepted while the reservation lapsed (a slow publish,
                // a broker outage): the customer was promised the units, so take them
                // from on hand again rather than lose the order.
                tracing::warn!(
                    reservation_id = %reservation.id,
                    sku = reservation.sku,
                    qty,
                    "committing an expired reservation: units re-taken from stock"
                );
                adjust_stock(&mut *tx, &reservation.sku, -qty, 0).await?;
                applied.changed += 1;
                applied.retaken += 1;
            }
            ReservationStatus::Committed => {
                applied.unchanged += 1;
                continue;
            }
            ReservationStatus::Released => {
                // Released explicitly (the order's cancel overtook its placement): the
                // units were given back on purpose, so placing must not take them again.
                tracing::warn!(
                    reservation_id = %reservation.id,
                    sku = reservation.sku,
                    "order placed for a released reservation: left released"
                );
                applied.unchanged += 1;
                continue;
            }
        }
        set_status(&mut *tx, reservation.id, ReservationStatus::Committed).await?;
    }
    Ok(applied)
}

/// `order.cancelled` inside the caller's transaction: records `message_id` in the inbox and
/// gives each line's units back, or does nothing when the inbox already had it.
async fn cancel_lines(
    tx: &mut SqliteConnection,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    if !shared::inbox::record(&mut *tx, message_id).await? {
        return Ok(Applied {
            duplicate: true,
            ..Applied::default()
        });
    }
    let mut applied = Applied::default();
    for line in lines {
        let reservation = reservation_for_line(&mut *tx, line).await?;
        let qty = i64::from(reservation.qty);
        match reservation.status {
            ReservationStatus::Reserved => {
                adjust_stock(&mut *tx, &reservation.sku, 0, -qty).await?;
            }
            ReservationStatus::Committed => {
                adjust_stock(&mut *tx, &reservation.sku, qty, 0).await?;
            }
            ReservationStatus::Released | ReservationStatus::Expired => {
                applied.unchanged += 1;
                continue;
            }
        }
        set_status(&mut *tx, reservation.id, ReservationStatus::Released).await?;
        applied.changed += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use serde_json::Number;
    use shared::money::Money;

    use super::*;

    async fn store() -> SqliteInventoryStore {
        let pool = shared::db::connect("sqlite::memory:", MIGRATIONS)
            .await
            .expect("the database opens");
        SqliteInventoryStore::new(pool)
    }

    /// Reserves `qty` of `sku`, expiring `expires_in` from now (negative: already due).
    async fn reserve(
        store: &SqliteInventoryStore,
        sku: &str,
        qty: u32,
        expires_in: time::Duration,
    ) -> Reservation {
        let now = OffsetDateTime::now_utc();
        store
            .reserve(ReserveStock {
                sku: sku.to_owned(),
                qty: Quantity::parse(&Number::from(qty)).expect("valid qty"),
                order_id: None,
                idempotency_key: None,
                now,
                expires_at: now + expires_in,
            })
            .await
            .expect("reserved")
            .reservation
    }

    fn line(reservation: &Reservation) -> EventLine {
        EventLine {
            sku: reservation.sku.clone(),
            qty: reservation.qty,
            reservation_id: reservation.id,
            unit_price: Money(100),
        }
    }

    async fn stock(store: &SqliteInventoryStore, sku: &str) -> Stock {
        store
            .get_stock(sku)
            .await
            .expect("reads")
            .expect("known sku")
    }

    #[tokio::test]
    async fn expiry_gives_back_only_reservations_past_their_time() {
        let store = store().await;
        reserve(&store, "BK-12", 2, time::Duration::seconds(-1)).await;
        reserve(&store, "BK-12", 3, time::Duration::minutes(10)).await;

        let expired = store
            .expire_due(OffsetDateTime::now_utc())
            .await
            .expect("sweeps");

        assert_eq!(expired, 1);
        assert_eq!(stock(&store, "BK-12").await, Stock::new("BK-12", 100, 3));
    }

    #[tokio::test]
    async fn committing_an_expired_reservation_takes_its_units_from_on_hand_again() {
        let store = store().await;
        let lapsed = reserve(&store, "HD-44", 2, time::Duration::seconds(-1)).await;
        store
            .expire_due(OffsetDateTime::now_utc())
            .await
            .expect("sweeps");

        let applied = store
            .commit_order(Uuid::new_v4(), vec![line(&lapsed)])
            .await
            .expect("commits");

        assert_eq!(applied.retaken, 1);
        assert_eq!(stock(&store, "HD-44").await, Stock::new("HD-44", 1, 0));
    }

    #[tokio::test]
    async fn an_order_placed_after_its_cancellation_leaves_the_released_units_alone() {
        let store = store().await;
        let reservation = reserve(&store, "MG-07", 4, time::Duration::minutes(10)).await;
        store
            .cancel_order(Uuid::new_v4(), vec![line(&reservation)])
            .await
            .expect("cancels");

        let applied = store
            .commit_order(Uuid::new_v4(), vec![line(&reservation)])
            .await
            .expect("handled");

        assert_eq!(applied.unchanged, 1);
        assert_eq!(stock(&store, "MG-07").await, Stock::new("MG-07", 50, 0));
    }

    #[tokio::test]
    async fn a_line_that_misdescribes_its_reservation_changes_nothing_and_is_not_recorded() {
        let store = store().await;
        let reservation = reserve(&store, "TS-33", 2, time::Duration::minutes(10)).await;
        let message_id = Uuid::new_v4();
        let wrong = EventLine {
            qty: 3,
            ..line(&reservation)
        };

        let refused = store.commit_order(message_id, vec![wrong]).await;
        assert!(matches!(refused, Err(StoreError::LineMismatch { .. })));
        assert_eq!(stock(&store, "TS-33").await, Stock::new("TS-33", 25, 2));

        // The inbox row was rolled back with the effect: a corrected redelivery does the work.
        let applied = store
            .commit_order(message_id, vec![line(&reservation)])
            .await
            .expect("commits");
        assert!(!applied.duplicate);
        assert_eq!(stock(&store, "TS-33").await, Stock::new("TS-33", 23, 0));
    }

    #[tokio::test]
    async fn a_batch_of_order_events_is_applied_together_or_not_at_all() {
        let store = store().await;
        let first = reserve(&store, "BK-12", 1, time::Duration::minutes(10)).await;
        let second = reserve(&store, "BK-12", 2, time::Duration::minutes(10)).await;
        let wrong = EventLine {
            qty: 5,
            ..line(&second)
        };
        let (placed, cancelled) = (Uuid::new_v4(), Uuid::new_v4());

        let refused = store
            .apply_order_events(vec![
                (placed, OrderEvent::Placed(vec![line(&first)])),
                (cancelled, OrderEvent::Cancelled(vec![wrong])),
            ])
            .await;
        assert!(matches!(refused, Err(StoreError::LineMismatch { .. })));
        assert_eq!(stock(&store, "BK-12").await, Stock::new("BK-12", 100, 3));

        let applied = store
            .apply_order_events(vec![
                (placed, OrderEvent::Placed(vec![line(&first)])),
                (cancelled, OrderEvent::Cancelled(vec![line(&second)])),
                (placed, OrderEvent::Placed(vec![line(&first)])),
            ])
            .await
            .expect("applies");
        assert_eq!(applied.len(), 3);
        assert_eq!(applied[0].changed, 1);
        assert_eq!(applied[1].changed, 1);
        assert!(applied[2].duplicate, "the same message ID is applied once");
        assert_eq!(stock(&store, "BK-12").await, Stock::new("BK-12", 99, 0));
    }

    #[tokio::test]
    async fn releasing_a_committed_reservation_is_refused() {
        let store = store().await;
        let reservation = reserve(&store, "ST-01", 1, time::Duration::minutes(10)).await;
        store
            .commit_order(Uuid::new_v4(), vec![line(&reservation)])
            .await
            .expect("commits");

        let refused = store.release(reservation.id).await;

        assert!(matches!(refused, Err(StoreError::Committed(id)) if id == reservation.id));
        assert_eq!(stock(&store, "ST-01").await, Stock::new("ST-01", 499, 0));
    }

    #[tokio::test]
    async fn a_replay_answers_its_first_reservation_even_once_the_stock_has_run_short() {
        let store = store().await;
        let now = OffsetDateTime::now_utc();
        let keyed = |qty: u32| ReserveStock {
            sku: "HD-44".to_owned(),
            qty: Quantity::parse(&Number::from(qty)).expect("valid qty"),
            order_id: None,
            idempotency_key: Some(IdempotencyKey::parse(b"order-1:HD-44").expect("valid key")),
            now,
            expires_at: now + time::Duration::minutes(10),
        };
        let first = store.reserve(keyed(2)).await.expect("reserved");
        // Only 1 of the 3 hoodies is left: a new reservation of 2 would be refused.
        let replay = store.reserve(keyed(2)).await.expect("replayed");

        assert!(replay.replayed);
        assert_eq!(replay.reservation.id, first.reservation.id);
        assert_eq!(replay.reservation.remaining_after, 1);
        assert!(matches!(
            store.reserve(keyed(1)).await,
            Err(StoreError::KeyReused)
        ));
        assert_eq!(stock(&store, "HD-44").await, Stock::new("HD-44", 3, 2));
    }
}
