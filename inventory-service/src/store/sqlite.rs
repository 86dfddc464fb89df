//! [`InventoryStore`] on SQLite.
//!
//! Every operation that reads and then writes runs as one transaction on the database's writer
//! thread ([`shared::db::Database::write`]): `BEGIN IMMEDIATE` takes SQLite's write lock up
//! front, so two requests can never both read "enough stock" and both reserve, and a reader
//! never has to upgrade to a writer mid-transaction (the upgrade is what fails with
//! `SQLITE_BUSY` at once, bypassing the busy timeout). The whole transaction is one hand-off to
//! the thread, however many statements it runs; reads that write nothing stay on the pool.
//!
//! Rows are decoded once for both drivers ([`Columns`]): ids as hyphenated TEXT, times as
//! INTEGER milliseconds since the Unix epoch.

use futures::future::BoxFuture;
use rusqlite::{OptionalExtension, Transaction, params};
use shared::db::{Columns, Database, DatabaseError, WriteError};
use shared::events::EventLine;
use sqlx::SqlitePool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Applied, InventoryStore, OrderEvent, ReserveOrder, ReserveStock, Reserved, ReservedOrder,
    StoreError, Transition, below_reserved, cancelling, check_level, check_line, order_refusal,
    placing, refusal, replay, replay_order,
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

/// A stored value that does not decode: a bug or a hand edit, never worth a retry.
fn corrupt(what: String) -> DatabaseError {
    DatabaseError::new(what, false)
}

fn parse_uuid(raw: &str) -> Result<Uuid, DatabaseError> {
    Uuid::parse_str(raw).map_err(|e| corrupt(format!("stored id {raw:?}: {e}")))
}

const STOCK_BY_SKU: &str = "SELECT sku, on_hand, reserved FROM stock WHERE sku = ?";

fn stock_from_row(row: &impl Columns) -> Result<Stock, DatabaseError> {
    Ok(Stock::new(
        row.value::<String>("sku")?,
        row.value("on_hand")?,
        row.value("reserved")?,
    ))
}

const RESERVATION_COLUMNS: &str =
    "id, sku, qty, order_id, status, remaining_after, expires_at_ms FROM reservations";

fn reservation_from_row(row: &impl Columns) -> Result<Reservation, DatabaseError> {
    let status: String = row.value("status")?;
    let qty: i64 = row.value("qty")?;
    let order_id: Option<String> = row.value("order_id")?;
    Ok(Reservation {
        id: parse_uuid(&row.value::<String>("id")?)?,
        sku: row.value("sku")?,
        qty: u32::try_from(qty).map_err(|_| corrupt(format!("stored qty {qty}")))?,
        order_id: order_id.as_deref().map(parse_uuid).transpose()?,
        status: ReservationStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("stored status {status:?}")))?,
        remaining_after: row.value("remaining_after")?,
        expires_at: from_millis(row.value("expires_at_ms")?),
    })
}

fn find_reservation(tx: &Transaction<'_>, id: Uuid) -> Result<Option<Reservation>, DatabaseError> {
    tx.prepare_cached(&format!("SELECT {RESERVATION_COLUMNS} WHERE id = ?"))?
        .query_row([id.to_string()], |row| Ok(reservation_from_row(row)))
        .optional()?
        .transpose()
}

fn set_status(
    tx: &Transaction<'_>,
    id: Uuid,
    status: ReservationStatus,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached("UPDATE reservations SET status = ? WHERE id = ?")?
        .execute(params![status.as_str(), id.to_string()])?;
    Ok(())
}

/// Adds `reserved_delta` and `on_hand_delta` to a SKU's levels.
fn adjust_stock(
    tx: &Transaction<'_>,
    sku: &str,
    on_hand_delta: i64,
    reserved_delta: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "UPDATE stock SET on_hand = on_hand + ?, reserved = reserved + ? WHERE sku = ?",
    )?
    .execute(params![on_hand_delta, reserved_delta, sku])?;
    Ok(())
}

/// Marks the reservation an event line names committed if it is still held and matches the
/// line; `false` (nothing changed) otherwise.
fn commit_held(tx: &Transaction<'_>, line: &EventLine) -> Result<bool, rusqlite::Error> {
    let changed = tx
        .prepare_cached(
            "UPDATE reservations SET status = 'committed' \
             WHERE id = ? AND sku = ? AND qty = ? AND status = 'reserved'",
        )?
        .execute(params![
            line.reservation_id.to_string(),
            line.sku,
            i64::from(line.qty)
        ])?;
    Ok(changed == 1)
}

/// Loads the reservation an event line names and checks that the line describes it.
fn reservation_for_line(tx: &Transaction<'_>, line: &EventLine) -> Result<Reservation, StoreError> {
    let reservation = find_reservation(tx, line.reservation_id)?
        .ok_or(StoreError::UnknownReservation(line.reservation_id))?;
    check_line(&reservation, line)?;
    Ok(reservation)
}

/// Writes `transition` of `reservation`: its new status and its SKU's levels.
fn apply(
    tx: &Transaction<'_>,
    reservation: &Reservation,
    transition: Transition,
) -> Result<(), rusqlite::Error> {
    adjust_stock(
        tx,
        &reservation.sku,
        transition.on_hand,
        transition.reserved,
    )?;
    set_status(tx, reservation.id, transition.to)
}

/// Why a reservation transaction made no new reservation. Either way it is rolled back, giving
/// back the units its first statements may have taken; a replay (of one line, `T = Reserved`, or
/// of a whole order) is still an answer.
enum NotReserved<T = Reserved> {
    /// The idempotency key names an earlier reservation, the answer to this request.
    Replayed(T),
    /// The request is refused, or the database failed.
    Failed(StoreError),
}

impl<T> From<StoreError> for NotReserved<T> {
    fn from(error: StoreError) -> Self {
        Self::Failed(error)
    }
}

impl<T> From<DatabaseError> for NotReserved<T> {
    fn from(error: DatabaseError) -> Self {
        Self::Failed(error.into())
    }
}

impl<T> From<rusqlite::Error> for NotReserved<T> {
    fn from(error: rusqlite::Error) -> Self {
        Self::Failed(error.into())
    }
}

impl<T> NotReserved<T> {
    /// The store's answer to a rolled-back reservation transaction.
    fn answer(outcome: Result<T, WriteError<Self>>) -> Result<T, StoreError> {
        match outcome {
            Ok(reserved) | Err(WriteError::Aborted(Self::Replayed(reserved))) => Ok(reserved),
            Err(WriteError::Aborted(Self::Failed(error))) => Err(error),
            Err(WriteError::Database(error)) => Err(error.into()),
        }
    }
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
            let row = sqlx::query(STOCK_BY_SKU)
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
        let sku = sku.to_owned();
        Box::pin(async move {
            check_level(on_hand)?;
            self.db
                .write(move |tx| {
                    let reserved: i64 = tx
                        .prepare_cached("SELECT reserved FROM stock WHERE sku = ?")?
                        .query_row([&sku], |row| row.get("reserved"))
                        .optional()?
                        .unwrap_or(0);
                    if on_hand < reserved {
                        return Err(below_reserved(on_hand, reserved));
                    }
                    tx.prepare_cached(
                        "INSERT INTO stock (sku, on_hand, reserved) VALUES (?, ?, 0) \
                         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand",
                    )?
                    .execute(params![sku, on_hand])?;
                    Ok(Stock::new(sku, on_hand, reserved))
                })
                .await
                .map_err(WriteError::flatten)
        })
    }

    fn reserve(&self, request: ReserveStock) -> BoxFuture<'_, Result<Reserved, StoreError>> {
        Box::pin(async move {
            // One write transaction for the whole decision, so a concurrent request with the same
            // key waits for the lock and then finds this reservation. The common case costs two
            // statements: take the units if enough are available, then record the reservation.
            // This is the hottest write of the order path.
            NotReserved::answer(self.db.write(move |tx| reserve_in(tx, request)).await)
        })
    }

    fn reserve_order(
        &self,
        request: ReserveOrder,
    ) -> BoxFuture<'_, Result<ReservedOrder, StoreError>> {
        Box::pin(async move {
            // The whole order is one hand-off to the writer thread and one transaction, however
            // many lines: the statements are in-process calls, the transaction's commit is the
            // cost, and the order pays it once instead of once per line.
            NotReserved::answer(
                self.db
                    .write(move |tx| reserve_order_in(tx, &request))
                    .await,
            )
        })
    }

    fn release(&self, id: Uuid) -> BoxFuture<'_, Result<ReservationStatus, StoreError>> {
        Box::pin(async move {
            self.db
                .write(move |tx| {
                    let reservation =
                        find_reservation(tx, id)?.ok_or(StoreError::UnknownReservation(id))?;
                    match reservation.status {
                        ReservationStatus::Committed => Err(StoreError::Committed(id)),
                        // Already given back (by an earlier release, a cancel or the sweeper).
                        status @ (ReservationStatus::Released | ReservationStatus::Expired) => {
                            Ok(status)
                        }
                        ReservationStatus::Reserved => {
                            adjust_stock(tx, &reservation.sku, 0, -i64::from(reservation.qty))?;
                            set_status(tx, id, ReservationStatus::Released)?;
                            Ok(ReservationStatus::Released)
                        }
                    }
                })
                .await
                .map_err(WriteError::flatten)
        })
    }

    fn expire_due(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let now = millis(now);
            let expired = self
                .db
                .write(move |tx| {
                    // Set-based: give each SKU back the sum of its due reservations, then mark
                    // them, in one transaction so the two statements see the same set.
                    tx.prepare_cached(
                        "UPDATE stock SET reserved = reserved - ( \
                             SELECT COALESCE(SUM(qty), 0) FROM reservations r \
                             WHERE r.sku = stock.sku AND r.status = 'reserved' \
                             AND r.expires_at_ms <= ?1) \
                         WHERE sku IN (SELECT sku FROM reservations \
                                       WHERE status = 'reserved' AND expires_at_ms <= ?1)",
                    )?
                    .execute([now])?;
                    tx.prepare_cached(
                        "UPDATE reservations SET status = 'expired' \
                         WHERE status = 'reserved' AND expires_at_ms <= ?",
                    )?
                    .execute([now])
                })
                .await
                .map_err(DatabaseError::from)?;
            Ok(u64::try_from(expired).unwrap_or(u64::MAX))
        })
    }

    fn commit_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            self.db
                .write(move |tx| commit_lines(tx, message_id, &lines))
                .await
                .map_err(WriteError::flatten)
        })
    }

    fn cancel_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            self.db
                .write(move |tx| cancel_lines(tx, message_id, &lines))
                .await
                .map_err(WriteError::flatten)
        })
    }

    fn apply_order_events(
        &self,
        events: Vec<(Uuid, OrderEvent)>,
    ) -> BoxFuture<'_, Result<Vec<Applied>, StoreError>> {
        Box::pin(async move {
            // One transaction for the whole batch: one BEGIN and one COMMIT (and, on disk, one
            // WAL sync point) however many events; an error rolls all of it back.
            self.db
                .write(move |tx| {
                    events
                        .iter()
                        .map(|(message_id, event)| match event {
                            OrderEvent::Placed(lines) => commit_lines(tx, *message_id, lines),
                            OrderEvent::Cancelled(lines) => cancel_lines(tx, *message_id, lines),
                        })
                        .collect()
                })
                .await
                .map_err(WriteError::flatten)
        })
    }
}

/// A reservation inside the caller's transaction. Anything but a new reservation is an `Err`,
/// so the transaction is rolled back.
fn reserve_in(tx: &Transaction<'_>, request: ReserveStock) -> Result<Reserved, NotReserved> {
    let qty = request.qty.get();
    let remaining = take_units(tx, &request.sku, qty)?;
    if let Some(remaining) = remaining {
        let reservation = Reservation {
            id: Uuid::new_v4(),
            sku: request.sku.clone(),
            qty,
            order_id: request.order_id,
            status: ReservationStatus::Reserved,
            remaining_after: remaining,
            // Stored in milliseconds: answer what a replay will read back.
            expires_at: from_millis(millis(request.expires_at)),
        };
        // The UNIQUE key turns a replay into "nothing inserted" instead of a second
        // reservation; it is answered below, and the units taken above are given back when the
        // transaction is rolled back.
        let inserted = tx
            .prepare_cached(
                "INSERT INTO reservations (id, sku, qty, order_id, idempotency_key, status, \
                 remaining_after, created_at_ms, expires_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )?
            .execute(params![
                reservation.id.to_string(),
                reservation.sku,
                i64::from(qty),
                reservation.order_id.map(|id| id.to_string()),
                request.idempotency_key.as_ref().map(IdempotencyKey::as_str),
                reservation.status.as_str(),
                reservation.remaining_after,
                millis(request.now),
                millis(reservation.expires_at),
            ])?;
        if inserted == 1 {
            return Ok(Reserved {
                reservation,
                replayed: false,
            });
        }
    }
    // Nothing new is reserved: a replay of an earlier key, an unknown SKU or short stock. Still
    // inside the transaction (whose UPDATE, if any, is rolled back), so the answer describes the
    // same state the UPDATE saw.
    if let Some(key) = &request.idempotency_key {
        let earlier = tx
            .prepare_cached(&format!(
                "SELECT {RESERVATION_COLUMNS} WHERE idempotency_key = ?"
            ))?
            .query_row([key.as_str()], |row| Ok(reservation_from_row(row)))
            .optional()?
            .transpose()?;
        if let Some(earlier) = earlier {
            return Err(match replay(earlier, &request) {
                Ok(replayed) => NotReserved::Replayed(replayed),
                Err(error) => NotReserved::Failed(error),
            });
        }
    }
    let stock = tx
        .prepare_cached(STOCK_BY_SKU)?
        .query_row([&request.sku], |row| Ok(stock_from_row(row)))
        .optional()?
        .transpose()?;
    Err(NotReserved::Failed(refusal(request, stock)))
}

/// Takes `qty` units of `sku` if that many are available; `None` when it is short or unknown.
fn take_units(tx: &Transaction<'_>, sku: &str, qty: u32) -> Result<Option<i64>, rusqlite::Error> {
    tx.prepare_cached(
        "UPDATE stock SET reserved = reserved + ?1 \
         WHERE sku = ?2 AND on_hand - reserved >= ?1 \
         RETURNING on_hand - reserved AS remaining",
    )?
    .query_row(params![i64::from(qty), sku], |row| row.get("remaining"))
    .optional()
}

/// A whole-order reservation inside the caller's transaction, all lines or none. Anything but
/// a new reservation of every line is an `Err`, so the transaction is rolled back.
///
/// The lines are taken in request order: the writer thread runs one transaction at a time, so
/// there is no lock order to keep (PostgreSQL's store takes them in SKU order).
fn reserve_order_in(
    tx: &Transaction<'_>,
    request: &ReserveOrder,
) -> Result<ReservedOrder, NotReserved<ReservedOrder>> {
    let lines = request.lines();
    let mut remaining = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match take_units(tx, &line.sku, line.qty.get())? {
            Some(left) => remaining.push(left),
            None => return Err(order_not_reserved(tx, request, Some(i))),
        }
    }
    if let Some(key) = request.idempotency_key() {
        // The order's own row: its PRIMARY KEY turns a replay (or the key reused for other SKUs)
        // into "nothing inserted", answered below before this transaction inserts anything.
        let claimed = tx
            .prepare_cached(
                "INSERT INTO order_reservations (idempotency_key, order_id, lines, created_at_ms) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
            )?
            .execute(params![
                key.as_str(),
                request.order_id().to_string(),
                i64::try_from(lines.len()).unwrap_or(i64::MAX),
                millis(request.now()),
            ])?;
        if claimed == 0 {
            return Err(order_not_reserved(tx, request, None));
        }
    }
    let mut reservations = Vec::with_capacity(lines.len());
    let mut insert = tx.prepare_cached(
        "INSERT INTO reservations (id, sku, qty, order_id, idempotency_key, status, \
         remaining_after, created_at_ms, expires_at_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (idempotency_key) DO NOTHING",
    )?;
    for (line, remaining_after) in lines.iter().zip(remaining) {
        let reservation = Reservation {
            id: Uuid::new_v4(),
            sku: line.sku.clone(),
            qty: line.qty.get(),
            order_id: Some(request.order_id()),
            status: ReservationStatus::Reserved,
            remaining_after,
            // Stored in milliseconds: answer what a replay will read back.
            expires_at: from_millis(millis(request.expires_at())),
        };
        let inserted = insert.execute(params![
            reservation.id.to_string(),
            reservation.sku,
            i64::from(reservation.qty),
            request.order_id().to_string(),
            request.line_key(&line.sku),
            reservation.status.as_str(),
            reservation.remaining_after,
            millis(request.now()),
            millis(reservation.expires_at),
        ])?;
        if inserted == 0 {
            // The line's key names a reservation that no whole order under this key made (the
            // order's row was free): a one-line request used it. Refused, not merged.
            return Err(NotReserved::Failed(StoreError::KeyReused));
        }
        reservations.push(reservation);
    }
    Ok(ReservedOrder {
        reservations,
        replayed: false,
    })
}

/// Why a whole order reserved nothing, read inside its transaction before anything was inserted
/// (so what it reads is the state its updates met): the replay of an earlier order under the same
/// key, else the refusal of line `failed` (`None`: no line was short, the key was taken).
fn order_not_reserved(
    tx: &Transaction<'_>,
    request: &ReserveOrder,
    failed: Option<usize>,
) -> NotReserved<ReservedOrder> {
    match order_answer(tx, request, failed) {
        Ok(replayed) => NotReserved::Replayed(replayed),
        Err(error) => NotReserved::Failed(error),
    }
}

fn order_answer(
    tx: &Transaction<'_>,
    request: &ReserveOrder,
    failed: Option<usize>,
) -> Result<ReservedOrder, StoreError> {
    if let Some(key) = request.idempotency_key() {
        let earlier_lines: Option<i64> = tx
            .prepare_cached("SELECT lines FROM order_reservations WHERE idempotency_key = ?")?
            .query_row([key.as_str()], |row| row.get("lines"))
            .optional()?;
        if let Some(earlier_lines) = earlier_lines {
            let mut find = tx.prepare_cached(&format!(
                "SELECT {RESERVATION_COLUMNS} WHERE idempotency_key = ?"
            ))?;
            let mut found = Vec::new();
            for line in request.lines() {
                let earlier = find
                    .query_row([request.line_key(&line.sku)], |row| {
                        Ok(reservation_from_row(row))
                    })
                    .optional()?
                    .transpose()?;
                found.extend(earlier);
            }
            return replay_order(
                request,
                usize::try_from(earlier_lines).unwrap_or(usize::MAX),
                found,
            );
        }
    }
    let Some(failed) = failed else {
        return Err(StoreError::KeyReused);
    };
    // The lines from `failed` on were not reserved by this transaction: their stock is as the
    // updates met it.
    let untried: Vec<usize> = (failed + 1..request.lines().len()).collect();
    let mut read = tx.prepare_cached(STOCK_BY_SKU)?;
    let mut stocks = Vec::new();
    for &i in untried.iter().chain([&failed]) {
        let stock = read
            .query_row([&request.lines()[i].sku], |row| Ok(stock_from_row(row)))
            .optional()?
            .transpose()?;
        stocks.extend(stock);
    }
    Err(order_refusal(request, failed, &untried, &stocks))
}

/// `order.placed` inside the caller's transaction: records `message_id` in the inbox and
/// commits each line's reservation, or does nothing when the inbox already had it.
fn commit_lines(
    tx: &Transaction<'_>,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    if !shared::inbox::sqlite::record(tx, message_id)? {
        return Ok(Applied::duplicate());
    }
    let mut applied = Applied::default();
    for line in lines {
        let qty = i64::from(line.qty);
        // The common case in two statements: the line's reservation is still held, so mark it
        // committed and take its units off both levels. Anything else (expired, already
        // committed, released, not matching the line) takes the slow path.
        if commit_held(tx, line)? {
            adjust_stock(tx, &line.sku, -qty, -qty)?;
            applied.changed += 1;
            continue;
        }
        let reservation = reservation_for_line(tx, line)?;
        let transition = placing(&reservation);
        if let Some(transition) = transition {
            apply(tx, &reservation, transition)?;
        }
        applied.count(reservation.status, transition);
    }
    Ok(applied)
}

/// `order.cancelled` inside the caller's transaction: records `message_id` in the inbox and
/// gives each line's units back, or does nothing when the inbox already had it.
fn cancel_lines(
    tx: &Transaction<'_>,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    if !shared::inbox::sqlite::record(tx, message_id)? {
        return Ok(Applied::duplicate());
    }
    let mut applied = Applied::default();
    for line in lines {
        let reservation = reservation_for_line(tx, line)?;
        let transition = cancelling(&reservation);
        if let Some(transition) = transition {
            apply(tx, &reservation, transition)?;
        }
        applied.count(reservation.status, transition);
    }
    Ok(applied)
}
