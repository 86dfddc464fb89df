//! [`InventoryStore`] on SQLite.
//!
//! Every operation that reads and then writes runs in one `BEGIN IMMEDIATE` transaction on the
//! service's write connection ([`shared::db::Database::begin_write`]): it takes SQLite's write
//! lock up front, so two requests can never both read "enough stock" and both reserve, and a
//! reader never has to upgrade to a writer mid-transaction (the upgrade is what fails with
//! `SQLITE_BUSY` at once, bypassing the busy timeout).

use futures::future::BoxFuture;
use shared::db::Database;
use shared::events::EventLine;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Applied, InventoryStore, OrderEvent, ReserveStock, Reserved, StoreError, Transition,
    below_reserved, cancelling, check_level, check_line, placing, refusal, replay,
};
use crate::domain::{IdempotencyKey, Reservation, ReservationStatus, Stock};

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
    check_line(&reservation, line)?;
    Ok(reservation)
}

/// Writes `transition` of `reservation`: its new status and its SKU's levels.
async fn apply(
    conn: &mut SqliteConnection,
    reservation: &Reservation,
    transition: Transition,
) -> Result<(), sqlx::Error> {
    adjust_stock(
        &mut *conn,
        &reservation.sku,
        transition.on_hand,
        transition.reserved,
    )
    .await?;
    set_status(conn, reservation.id, transition.to).await
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
            check_level(on_hand)?;
            let mut tx = self.db.begin_write().await?;
            let reserved: i64 = sqlx::query("SELECT reserved FROM stock WHERE sku = ?")
                .bind(sku)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("reserved"))
                .transpose()?
                .unwrap_or(0);
            if on_hand < reserved {
                return Err(below_reserved(on_hand, reserved));
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
                    return replay(reservation_from_row(&row)?, &request);
                }
            }
            let stock = sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = ?")
                .bind(&request.sku)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(stock_from_row)
                .transpose()?;
            Err(refusal(request, stock))
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
        return Ok(Applied::duplicate());
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
        let transition = placing(&reservation);
        if let Some(transition) = transition {
            apply(&mut *tx, &reservation, transition).await?;
        }
        applied.count(reservation.status, transition);
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
        return Ok(Applied::duplicate());
    }
    let mut applied = Applied::default();
    for line in lines {
        let reservation = reservation_for_line(&mut *tx, line).await?;
        let transition = cancelling(&reservation);
        if let Some(transition) = transition {
            apply(&mut *tx, &reservation, transition).await?;
        }
        applied.count(reservation.status, transition);
    }
    Ok(applied)
}
