//! [`InventoryStore`] on PostgreSQL, for replicas that share one database.
//!
//! Replicas share no memory, so what SQLite's single writer gives for free is carried here by
//! each statement, at PostgreSQL's default READ COMMITTED and without application locks:
//!
//! - An `UPDATE` that meets a row another transaction holds waits for it, then re-evaluates its
//!   `WHERE` against the row as that transaction committed it, not the snapshot it started from.
//!   A conditional update (`… WHERE on_hand - reserved >= $1`, `… WHERE status = 'reserved'`)
//!   therefore decides and writes in one step: of two replicas racing, the second sees the
//!   first's result and does nothing.
//! - A unique key (`reservations.idempotency_key`, the inbox's `message_id`) makes a second
//!   insert of the same value wait for the first transaction; `ON CONFLICT DO NOTHING` then
//!   answers "already there".
//! - Where a read decides a write (an order event whose reservation is not simply held), the read
//!   is `FOR UPDATE`, so nothing changes the row between the decision and the write.
//!
//! Every operation is one transaction (or one statement), so a failure half-way leaves nothing
//! half-written.
//!
//! **Lock order: stock rows first, in SKU order, then reservations.** A reservation takes its
//! stock row first by nature (the conditional update), and a whole order's conditional updates
//! run one per line in SKU order ([`take_units`]), so two orders over overlapping SKUs queue on
//! the first SKU they share instead of each holding a row the other waits for; everything else that moves a reservation
//! and then its stock (an order event, a release, the sweeper) locks the stock rows it will touch
//! first, with [`lock_stock`]. Without that order, a consumer batch holding a SKU's stock row and
//! waiting for a reservation that a sweeper holds while the sweeper waits for that stock row is a
//! deadlock; PostgreSQL breaks it only after `deadlock_timeout` (1 s), and with one hot SKU every
//! other order waits out that second behind the row (measured in the replica test: statements of
//! 1 s, reservations answered 504, breakers opened). A deadlock that remains possible is still
//! safe: the server rolls one transaction back (`40P01`), a transient error that a client sees as
//! `503` with `Retry-After` and a consumer retries.
//!
//! Every connection is taken through [`PgDatabase::ready_pool`]: until the migrations have been
//! applied (the server was away at startup) an operation fails with a transient error, and once
//! the server is back the pool reconnects without a restart.

use futures::future::BoxFuture;
use shared::db::DatabaseError;
use shared::events::EventLine;
use shared::pg::PgDatabase;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Applied, InventoryStore, OrderEvent, ReserveOrder, ReserveStock, Reserved, ReservedOrder,
    StoreError, Transition, below_reserved, cancelling, check_level, check_line, order_refusal,
    placing, refusal, replay, replay_order,
};
use crate::domain::{IdempotencyKey, Reservation, ReservationStatus, Stock};

/// [`InventoryStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgInventoryStore {
    db: PgDatabase,
}

impl PgInventoryStore {
    /// A store over `db` (migrated with [`super::PG_MIGRATIONS`], now or in the background).
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }

    /// The pool once migrated, else a transient error saying why.
    fn pool(&self) -> Result<&PgPool, StoreError> {
        Ok(self.db.ready_pool()?)
    }
}

/// PostgreSQL keeps microseconds: a new reservation answers the instant a replay reads back.
fn to_micros(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
        .unwrap_or(at)
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn stock_from_row(row: &PgRow) -> Result<Stock, sqlx::Error> {
    Ok(Stock::new(
        row.try_get::<String, _>("sku")?,
        row.try_get("on_hand")?,
        row.try_get("reserved")?,
    ))
}

const RESERVATION_COLUMNS: &str =
    "id, sku, qty, order_id, status, remaining_after, expires_at FROM reservations";

fn parse_status(raw: &str) -> Result<ReservationStatus, sqlx::Error> {
    ReservationStatus::parse(raw).ok_or_else(|| corrupt(format!("stored status {raw:?}")))
}

fn reservation_from_row(row: &PgRow) -> Result<Reservation, sqlx::Error> {
    let qty: i64 = row.try_get("qty")?;
    Ok(Reservation {
        id: row.try_get("id")?,
        sku: row.try_get("sku")?,
        qty: u32::try_from(qty).map_err(|_| corrupt(format!("stored qty {qty}")))?,
        order_id: row.try_get("order_id")?,
        status: parse_status(&row.try_get::<String, _>("status")?)?,
        remaining_after: row.try_get("remaining_after")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// Locks the stock rows of `skus` until the transaction ends, in SKU order (see the module's lock
/// order), so that this transaction waits for others before it holds any reservation.
async fn lock_stock(tx: &mut PgConnection, skus: &[&str]) -> Result<(), sqlx::Error> {
    let mut skus: Vec<&str> = skus.to_vec();
    skus.sort_unstable();
    skus.dedup();
    sqlx::query("SELECT 1 FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE")
        .bind(&skus)
        .execute(tx)
        .await?;
    Ok(())
}

/// Takes `qty` units of `sku` if that many are available (the conditional update); `None` when
/// it is short or unknown. Atomic across replicas: the statement locks the stock row, and a
/// replica whose UPDATE waited for that lock re-evaluates `on_hand - reserved >= $1` against the
/// committed row, so two replicas never both read "enough" and take the last units twice.
async fn take_units(
    tx: &mut PgConnection,
    sku: &str,
    qty: u32,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE stock SET reserved = reserved + $1 \
         WHERE sku = $2 AND on_hand - reserved >= $1 \
         RETURNING on_hand - reserved AS remaining",
    )
    .bind(i64::from(qty))
    .bind(sku)
    .fetch_optional(tx)
    .await
}

async fn find_stock(pool: &PgPool, sku: &str) -> Result<Option<Stock>, sqlx::Error> {
    sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(stock_from_row)
        .transpose()
}

/// Loads the reservation an event line names, locked until the transaction ends, and checks that
/// the line describes it.
async fn lock_reservation_for_line(
    tx: &mut PgConnection,
    line: &EventLine,
) -> Result<Reservation, StoreError> {
    // FOR UPDATE: the status read here decides the write that follows. The row lock holds it
    // until commit; a release or a sweeper reaching the row meanwhile waits, then re-checks its
    // own `status = 'reserved'` against what this transaction committed.
    let reservation = sqlx::query(&format!(
        "SELECT {RESERVATION_COLUMNS} WHERE id = $1 FOR UPDATE"
    ))
    .bind(line.reservation_id)
    .fetch_optional(tx)
    .await?
    .as_ref()
    .map(reservation_from_row)
    .transpose()?
    .ok_or(StoreError::UnknownReservation(line.reservation_id))?;
    check_line(&reservation, line)?;
    Ok(reservation)
}

/// Writes `transition` of a reservation locked by [`lock_reservation_for_line`]: its new status
/// and its SKU's levels, in one statement.
async fn apply(
    tx: &mut PgConnection,
    reservation: &Reservation,
    transition: Transition,
) -> Result<(), sqlx::Error> {
    // Atomic across replicas: the reservation row is already locked by this transaction, and
    // the stock update adds deltas (`on_hand + $3`) to the row as committed, never a level read
    // earlier, so concurrent changes to the same SKU add up.
    sqlx::query(
        "WITH moved AS (UPDATE reservations SET status = $2 WHERE id = $1) \
         UPDATE stock SET on_hand = on_hand + $3, reserved = reserved + $4 WHERE sku = $5",
    )
    .bind(reservation.id)
    .bind(transition.to.as_str())
    .bind(transition.on_hand)
    .bind(transition.reserved)
    .bind(&reservation.sku)
    .execute(tx)
    .await?;
    Ok(())
}

impl InventoryStore for PgInventoryStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db.ping().await?;
            Ok(())
        })
    }

    fn list_stock(&self) -> BoxFuture<'_, Result<Vec<Stock>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT sku, on_hand, reserved FROM stock ORDER BY sku")
                .fetch_all(self.pool()?)
                .await?;
            Ok(rows.iter().map(stock_from_row).collect::<Result<_, _>>()?)
        })
    }

    fn get_stock<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Stock>, StoreError>> {
        Box::pin(async move { Ok(find_stock(self.pool()?, sku).await?) })
    }

    fn set_on_hand<'a>(
        &'a self,
        sku: &'a str,
        on_hand: i64,
    ) -> BoxFuture<'a, Result<Stock, StoreError>> {
        Box::pin(async move {
            check_level(on_hand)?;
            let pool = self.pool()?;
            // Atomic across replicas: a new SKU and a known one are one statement. ON CONFLICT
            // locks the existing row and evaluates its WHERE against `reserved` as committed, so
            // a reservation racing this restock is either counted (and may refuse the level) or
            // waits and then reserves against the new level; `on_hand` never drops below it.
            let set = sqlx::query(
                "INSERT INTO stock (sku, on_hand, reserved) VALUES ($1, $2, 0) \
                 ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand \
                 WHERE stock.reserved <= excluded.on_hand \
                 RETURNING sku, on_hand, reserved",
            )
            .bind(sku)
            .bind(on_hand)
            .fetch_optional(pool)
            .await?;
            match set {
                Some(row) => Ok(stock_from_row(&row)?),
                // Refused by the WHERE: the row exists and holds more than `on_hand`.
                None => {
                    let reserved = find_stock(pool, sku)
                        .await?
                        .map_or(0, |stock| stock.reserved);
                    Err(below_reserved(on_hand, reserved))
                }
            }
        })
    }

    fn reserve(&self, request: ReserveStock) -> BoxFuture<'_, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let qty = request.qty.get();
            let pool = self.pool()?;
            let mut tx = pool.begin().await?;
            let taken = take_units(&mut tx, &request.sku, qty).await?;
            if let Some(remaining_after) = taken {
                let reservation = Reservation {
                    id: Uuid::new_v4(),
                    sku: request.sku.clone(),
                    qty,
                    order_id: request.order_id,
                    status: ReservationStatus::Reserved,
                    remaining_after,
                    expires_at: to_micros(request.expires_at),
                };
                // Atomic across replicas: UNIQUE (idempotency_key) makes a second replica's
                // insert of the same key wait for the first transaction and then insert nothing;
                // that replica answers the first reservation below, and rolling back gives back
                // the units it took above.
                let inserted = sqlx::query(
                    "INSERT INTO reservations (id, sku, qty, order_id, idempotency_key, status, \
                     remaining_after, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(reservation.id)
                .bind(&reservation.sku)
                .bind(i64::from(qty))
                .bind(reservation.order_id)
                .bind(request.idempotency_key.as_ref().map(IdempotencyKey::as_str))
                .bind(reservation.status.as_str())
                .bind(reservation.remaining_after)
                .bind(request.now)
                .bind(reservation.expires_at)
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
            // Nothing new is reserved: a replay of an earlier key, an unknown SKU or short
            // stock. Give back what the UPDATE took (and its row lock) before reading the answer.
            tx.rollback().await?;
            if let Some(key) = &request.idempotency_key {
                // A statement of its own, so a snapshot of its own: it sees the reservation the
                // replica that won the key committed while this one waited.
                let earlier = sqlx::query(&format!(
                    "SELECT {RESERVATION_COLUMNS} WHERE idempotency_key = $1"
                ))
                .bind(key.as_str())
                .fetch_optional(pool)
                .await?;
                if let Some(row) = earlier {
                    return replay(reservation_from_row(&row)?, &request);
                }
            }
            let stock = find_stock(pool, &request.sku).await?;
            Err(refusal(request, stock))
        })
    }

    fn reserve_order(
        &self,
        request: ReserveOrder,
    ) -> BoxFuture<'_, Result<ReservedOrder, StoreError>> {
        Box::pin(async move {
            let pool = self.pool()?;
            let lines = request.lines();
            let mut tx = pool.begin().await?;
            // The lock order: one conditional update per line, in SKU order, whatever the
            // request's order. Two orders sharing SKUs then meet first on the lowest SKU they
            // share, and the second waits there holding only rows the first will never ask for;
            // in request order, "A then B" and "B then A" would each hold one and wait for the
            // other until deadlock_timeout (1 s) broke it. One statement per line rather than one
            // set-based UPDATE because a multi-row UPDATE locks its rows in scan order, which is
            // not SKU order.
            let in_sku_order = request.in_sku_order();
            let mut remaining = vec![0; lines.len()];
            let mut failed = None;
            for (tried, &i) in in_sku_order.iter().enumerate() {
                match take_units(&mut tx, &lines[i].sku, lines[i].qty.get()).await? {
                    Some(left) => remaining[i] = left,
                    None => {
                        failed = Some((i, in_sku_order[tried + 1..].to_vec()));
                        break;
                    }
                }
            }
            if failed.is_none() {
                let reservations: Vec<Reservation> = lines
                    .iter()
                    .zip(&remaining)
                    .map(|(line, &remaining_after)| Reservation {
                        id: Uuid::new_v4(),
                        sku: line.sku.clone(),
                        qty: line.qty.get(),
                        order_id: Some(request.order_id()),
                        status: ReservationStatus::Reserved,
                        remaining_after,
                        expires_at: to_micros(request.expires_at()),
                    })
                    .collect();
                if insert_order(&mut tx, &request, &reservations).await? {
                    tx.commit().await?;
                    return Ok(ReservedOrder {
                        reservations,
                        replayed: false,
                    });
                }
            }
            // Nothing new is reserved: a replay of an earlier order, a taken key, an unknown SKU
            // or short stock. Give back what the updates took (and their row locks) before
            // reading the answer; each read below is a statement with a snapshot of its own.
            tx.rollback().await?;
            if let Some(key) = request.idempotency_key() {
                let earlier_lines: Option<i32> = sqlx::query_scalar(
                    "SELECT lines FROM order_reservations WHERE idempotency_key = $1",
                )
                .bind(key.as_str())
                .fetch_optional(pool)
                .await?;
                if let Some(earlier_lines) = earlier_lines {
                    let keys: Vec<Option<String>> = lines
                        .iter()
                        .map(|line| request.line_key(&line.sku))
                        .collect();
                    let found = sqlx::query(&format!(
                        "SELECT {RESERVATION_COLUMNS} WHERE idempotency_key = ANY($1)"
                    ))
                    .bind(&keys)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(reservation_from_row)
                    .collect::<Result<_, _>>()?;
                    return replay_order(
                        &request,
                        usize::try_from(earlier_lines).unwrap_or(usize::MAX),
                        found,
                    );
                }
            }
            let Some((failed, untried)) = failed else {
                // The order's key was free but a line's key was taken, by a one-line request.
                return Err(StoreError::KeyReused);
            };
            let skus: Vec<&str> = untried
                .iter()
                .chain([&failed])
                .map(|&i| lines[i].sku.as_str())
                .collect();
            let stocks =
                sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = ANY($1)")
                    .bind(&skus)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(stock_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
            Err(order_refusal(&request, failed, &untried, &stocks))
        })
    }

    fn release(&self, id: Uuid) -> BoxFuture<'_, Result<ReservationStatus, StoreError>> {
        Box::pin(async move {
            let pool = self.pool()?;
            let mut tx = pool.begin().await?;
            // The lock order: the reservation's stock row before the reservation.
            let sku: Option<String> =
                sqlx::query_scalar("SELECT sku FROM reservations WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(sku) = &sku {
                lock_stock(&mut tx, &[sku.as_str()]).await?;
            }
            // Atomic across replicas: the reservation moves only from 'reserved'; a second
            // replica releasing the same one waits for the first's lock, re-checks the status,
            // finds 'released' and returns nothing, so the stock update (fed only by the rows the
            // first moved) gives the units back once.
            let released = sqlx::query(
                "WITH released AS ( \
                     UPDATE reservations SET status = 'released' \
                     WHERE id = $1 AND status = 'reserved' \
                     RETURNING sku, qty) \
                 UPDATE stock SET reserved = stock.reserved - released.qty \
                 FROM released WHERE stock.sku = released.sku",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            if released == 1 {
                return Ok(ReservationStatus::Released);
            }
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
            let status = status
                .as_deref()
                .map(parse_status)
                .transpose()?
                .ok_or(StoreError::UnknownReservation(id))?;
            match status {
                ReservationStatus::Committed => Err(StoreError::Committed(id)),
                // Already given back (by an earlier release, a cancel or a sweeper).
                ReservationStatus::Released | ReservationStatus::Expired => Ok(status),
                // No status leads back to 'reserved', so the statement above matched the row;
                // answer "try again" rather than a success that gave nothing back.
                ReservationStatus::Reserved => Err(StoreError::Database(DatabaseError::new(
                    format!("reservation {id} is still held after releasing it"),
                    true,
                ))),
            }
        })
    }

    fn expire_due(&self, now: OffsetDateTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool()?.begin().await?;
            // The lock order: the stock rows of the SKUs with reservations due, before those
            // reservations. A reservation of another SKU that falls due meanwhile waits for the
            // next sweep (`sku = ANY($2)` below).
            let due: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT sku FROM reservations \
                 WHERE status = 'reserved' AND expires_at <= $1",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            if due.is_empty() {
                return Ok(0);
            }
            let skus: Vec<&str> = due.iter().map(String::as_str).collect();
            lock_stock(&mut tx, &skus).await?;
            // Atomic across replicas: one statement, whose stock update is fed by the rows its
            // reservation update moved. Every replica sweeps; a sweeper reaching a reservation
            // another sweeper (or a commit, or a release) holds waits for that transaction, and
            // READ COMMITTED then re-checks `status = 'reserved'` against the committed row: a
            // reservation already expired is skipped, so its units are given back once.
            let expired: i64 = sqlx::query_scalar(
                "WITH expired AS ( \
                     UPDATE reservations SET status = 'expired' \
                     WHERE status = 'reserved' AND expires_at <= $1 AND sku = ANY($2) \
                     RETURNING sku, qty), \
                 given_back AS ( \
                     UPDATE stock SET reserved = stock.reserved - due.qty \
                     FROM (SELECT sku, SUM(qty)::BIGINT AS qty FROM expired GROUP BY sku) AS due \
                     WHERE stock.sku = due.sku) \
                 SELECT count(*) FROM expired",
            )
            .bind(now)
            .bind(&skus)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(u64::try_from(expired).unwrap_or(0))
        })
    }

    fn commit_order(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool()?.begin().await?;
            lock_stock(&mut tx, &skus_of(&lines)).await?;
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
            let mut tx = self.pool()?.begin().await?;
            lock_stock(&mut tx, &skus_of(&lines)).await?;
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
            // One transaction for the whole batch; an error drops `tx`, rolling all of it back
            // (the inbox rows with the effects, so a redelivery does the work).
            let mut tx = self.pool()?.begin().await?;
            let lines: Vec<&EventLine> = events
                .iter()
                .flat_map(|(_, event)| match event {
                    OrderEvent::Placed(lines) | OrderEvent::Cancelled(lines) => lines.iter(),
                })
                .collect();
            let skus: Vec<&str> = lines.iter().map(|line| line.sku.as_str()).collect();
            lock_stock(&mut tx, &skus).await?;
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

/// Records a whole order's reservations (and, under an idempotency key, the order's own row) in
/// one statement; `false` when the key or a line's key was already taken, so nothing may be kept.
///
/// Atomic across replicas: the order's PRIMARY KEY makes a second replica's insert of the same
/// key wait for the first transaction and then insert nothing, and the reservations are inserted
/// only if the order's row was (`EXISTS (SELECT 1 FROM claimed)`); each line's UNIQUE key does
/// the same for a key a one-line request took.
async fn insert_order(
    tx: &mut PgConnection,
    request: &ReserveOrder,
    reservations: &[Reservation],
) -> Result<bool, sqlx::Error> {
    let ids: Vec<Uuid> = reservations.iter().map(|r| r.id).collect();
    let skus: Vec<&str> = reservations.iter().map(|r| r.sku.as_str()).collect();
    let qtys: Vec<i64> = reservations.iter().map(|r| i64::from(r.qty)).collect();
    let remaining: Vec<i64> = reservations.iter().map(|r| r.remaining_after).collect();
    let keys: Vec<Option<String>> = reservations
        .iter()
        .map(|r| request.line_key(&r.sku))
        .collect();
    let inserted = sqlx::query(
        "WITH claimed AS ( \
             INSERT INTO order_reservations (idempotency_key, order_id, lines, created_at) \
             SELECT $1, $2, $3, $4 WHERE $1::TEXT IS NOT NULL \
             ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING 1) \
         INSERT INTO reservations (id, sku, qty, order_id, idempotency_key, status, \
                                   remaining_after, created_at, expires_at) \
         SELECT line.id, line.sku, line.qty, $2, line.key, 'reserved', line.remaining, $4, $5 \
         FROM unnest($6::UUID[], $7::TEXT[], $8::BIGINT[], $9::BIGINT[], $10::TEXT[]) \
              AS line (id, sku, qty, remaining, key) \
         WHERE $1::TEXT IS NULL OR EXISTS (SELECT 1 FROM claimed) \
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(request.idempotency_key().map(IdempotencyKey::as_str))
    .bind(request.order_id())
    .bind(i32::try_from(reservations.len()).unwrap_or(i32::MAX))
    .bind(request.now())
    .bind(to_micros(request.expires_at()))
    .bind(&ids)
    .bind(&skus)
    .bind(&qtys)
    .bind(&remaining)
    .bind(&keys)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(usize::try_from(inserted).is_ok_and(|n| n == reservations.len()))
}

/// The SKUs `lines` touch, for [`lock_stock`].
fn skus_of(lines: &[EventLine]) -> Vec<&str> {
    lines.iter().map(|line| line.sku.as_str()).collect()
}

/// `order.placed` inside the caller's transaction: records `message_id` in the inbox and
/// commits each line's reservation, or does nothing when the inbox already had it.
async fn commit_lines(
    tx: &mut PgConnection,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    // Atomic across replicas: the inbox's primary key makes a replica handling the same message
    // wait for this transaction, then skip the effect (see `shared::inbox::postgres`).
    if !shared::inbox::postgres::record(&mut *tx, message_id).await? {
        return Ok(Applied::duplicate());
    }
    let mut applied = Applied::default();
    for line in lines {
        // The common case in one statement: the line's reservation is still held. Atomic
        // across replicas: it moves only from 'reserved' (re-checked after any row lock wait,
        // so a release or a sweeper that got there first wins), and the stock update takes the
        // units of exactly the row it moved. Anything else takes the locked slow path.
        let committed = sqlx::query(
            "WITH committed AS ( \
                 UPDATE reservations SET status = 'committed' \
                 WHERE id = $1 AND sku = $2 AND qty = $3 AND status = 'reserved' \
                 RETURNING sku, qty) \
             UPDATE stock SET on_hand = stock.on_hand - committed.qty, \
                              reserved = stock.reserved - committed.qty \
             FROM committed WHERE stock.sku = committed.sku",
        )
        .bind(line.reservation_id)
        .bind(&line.sku)
        .bind(i64::from(line.qty))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if committed == 1 {
            applied.changed += 1;
            continue;
        }
        let reservation = lock_reservation_for_line(&mut *tx, line).await?;
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
    tx: &mut PgConnection,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<Applied, StoreError> {
    // Atomic across replicas: as in `commit_lines`, the inbox row applies the message once.
    if !shared::inbox::postgres::record(&mut *tx, message_id).await? {
        return Ok(Applied::duplicate());
    }
    let mut applied = Applied::default();
    for line in lines {
        let reservation = lock_reservation_for_line(&mut *tx, line).await?;
        let transition = cancelling(&reservation);
        if let Some(transition) = transition {
            apply(&mut *tx, &reservation, transition).await?;
        }
        applied.count(reservation.status, transition);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    //! The cross-replica rules: two stores (two pools, as two replicas have) on one database,
    //! racing. Each test would fail on a store that reads and then writes.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use shared::testing::postgres::TestDatabase;
    use sqlx::ConnectOptions;
    use sqlx::postgres::PgConnectOptions;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::store::PG_MIGRATIONS;
    use crate::store::tests::{line, order, pg_store, request, reserve, stock};

    /// Two replicas of the service on one database.
    async fn replicas(test: &TestDatabase) -> (PgInventoryStore, PgInventoryStore) {
        (pg_store(test).await, pg_store(test).await)
    }

    /// `n` tasks, alternating between the two replicas, each running `operation` on its replica
    /// at once; their answers in task order.
    async fn race<T, F>(
        stores: &(PgInventoryStore, PgInventoryStore),
        n: usize,
        operation: impl Fn(PgInventoryStore, usize) -> F,
    ) -> Vec<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let store = if i % 2 == 0 { &stores.0 } else { &stores.1 };
                tokio::spawn(operation(store.clone(), i))
            })
            .collect();
        let mut answers = Vec::with_capacity(n);
        for task in tasks {
            answers.push(task.await.expect("the task runs"));
        }
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_reservations_of_the_last_ten_units_from_two_replicas_take_exactly_ten() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        stores.0.set_on_hand("LAST-10", 10).await.expect("stocks");

        let answers = race(&stores, 50, |store, _| async move {
            store
                .reserve(request("LAST-10", 1, time::Duration::minutes(10)))
                .await
        })
        .await;

        let taken = answers.iter().filter(|answer| answer.is_ok()).count();
        let refused = answers
            .iter()
            .filter(|answer| matches!(answer, Err(StoreError::InsufficientStock { .. })))
            .count();
        assert_eq!((taken, refused), (10, 40), "{answers:?}");
        assert_eq!(
            stock(&stores.1, "LAST-10").await,
            Stock::new("LAST-10", 10, 10)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_orders_over_overlapping_skus_in_different_orders_never_deadlock_or_oversell() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        // 50 units of each for 80 orders of one unit per line, each SKU in 60 of them: some
        // orders are refused, so the race runs into the shortage as well as into the locks.
        let skus = ["RACE-A", "RACE-B", "RACE-C", "RACE-D"];
        for sku in skus {
            stores.0.set_on_hand(sku, 50).await.expect("stocks");
        }

        let started = std::time::Instant::now();
        let answers = race(&stores, 80, move |store, i| async move {
            // Three of the four SKUs, rotated and alternately reversed: every pair of SKUs is
            // asked for in both orders by some pair of concurrent orders.
            let mut lines: Vec<(&str, u32)> = (0..3).map(|k| (skus[(i + k) % 4], 1)).collect();
            if i % 2 == 1 {
                lines.reverse();
            }
            store.reserve_order(order(&lines, None)).await
        })
        .await;
        let elapsed = started.elapsed();

        let mut taken = std::collections::HashMap::<String, i64>::new();
        for answer in &answers {
            match answer {
                Ok(reserved) => {
                    assert_eq!(reserved.reservations.len(), 3);
                    for reservation in &reserved.reservations {
                        *taken.entry(reservation.sku.clone()).or_default() += 1;
                    }
                }
                Err(StoreError::OrderShort(_)) => {}
                Err(other) => panic!("neither reserved nor short: {other}"),
            }
        }
        // A deadlock is broken only after the server's deadlock_timeout (1 s), and fails one of
        // its transactions with 40P01, which the match above would have shown.
        assert!(
            elapsed < std::time::Duration::from_secs(5),
            "took {elapsed:?}"
        );
        for sku in skus {
            let level = stock(&stores.1, sku).await;
            let held = taken.get(sku).copied().unwrap_or(0);
            assert_eq!(
                level.reserved, held,
                "{sku}: every unit held belongs to one answer"
            );
            assert!(level.reserved <= 50, "{sku} oversold: {level:?}");
        }
        assert!(answers.iter().any(Result::is_err), "the stock ran short");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_idempotency_key_from_two_replicas_at_once_makes_one_reservation() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;

        let answers = race(&stores, 20, |store, _| async move {
            store
                .reserve(ReserveStock {
                    idempotency_key: Some(IdempotencyKey::parse(b"order-7:BK-12").expect("key")),
                    ..request("BK-12", 3, time::Duration::minutes(10))
                })
                .await
                .expect("reserved or replayed")
        })
        .await;

        let first = answers
            .iter()
            .find(|answer| !answer.replayed)
            .expect("one reservation is made");
        assert_eq!(
            answers.iter().filter(|answer| answer.replayed).count(),
            19,
            "every other request replays it"
        );
        assert!(
            answers
                .iter()
                .all(|answer| answer.reservation == first.reservation)
        );
        assert_eq!(stock(&stores.0, "BK-12").await, Stock::new("BK-12", 100, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_releasing_one_reservation_at_once_give_its_units_back_once() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        let released = reserve(&stores.0, "MG-07", 2, time::Duration::minutes(10)).await;
        // Still held, so a second return of the 2 units would show (not hit the CHECK).
        reserve(&stores.0, "MG-07", 3, time::Duration::minutes(10)).await;

        let answers = race(&stores, 10, |store, _| async move {
            store.release(released.id).await.expect("releases")
        })
        .await;

        assert!(
            answers
                .iter()
                .all(|status| *status == ReservationStatus::Released)
        );
        assert_eq!(stock(&stores.1, "MG-07").await, Stock::new("MG-07", 50, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_sweepers_at_once_give_back_each_expired_reservation_once() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        for _ in 0..30 {
            reserve(&stores.0, "ST-01", 2, time::Duration::seconds(-1)).await;
        }
        reserve(&stores.0, "ST-01", 5, time::Duration::minutes(10)).await;

        let now = OffsetDateTime::now_utc();
        let swept = race(&stores, 6, |store, _| async move {
            store.expire_due(now).await.expect("sweeps")
        })
        .await;

        assert_eq!(swept.iter().sum::<u64>(), 30, "{swept:?}");
        assert_eq!(stock(&stores.1, "ST-01").await, Stock::new("ST-01", 500, 5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sweeper_racing_a_batch_of_commits_over_the_same_reservations_never_deadlocks() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        for sku in ["ST-01", "BK-12"] {
            stores.0.set_on_hand(sku, 10_000).await.expect("restocks");
        }
        for round in 0..20 {
            // Reservations of two SKUs, already due, committed by one batch in an order that is
            // neither the sweeper's nor SKU order, while the other replica sweeps them.
            let mut reservations = Vec::new();
            for i in 0..16 {
                let sku = if i % 2 == 0 { "ST-01" } else { "BK-12" };
                reservations.push(reserve(&stores.0, sku, 1, time::Duration::seconds(-1)).await);
            }
            reservations.reverse();
            let events: Vec<(Uuid, OrderEvent)> = reservations
                .iter()
                .map(|r| (Uuid::new_v4(), OrderEvent::Placed(vec![line(r)])))
                .collect();
            let now = OffsetDateTime::now_utc();
            let started = std::time::Instant::now();
            let (swept, applied) = tokio::join!(
                stores.1.expire_due(now),
                stores.0.apply_order_events(events)
            );
            let swept = swept.unwrap_or_else(|e| panic!("round {round}: the sweep failed: {e}"));
            applied.unwrap_or_else(|e| panic!("round {round}: the batch failed: {e}"));
            // A deadlock is broken only after the server's deadlock_timeout (1 s).
            assert!(
                started.elapsed() < std::time::Duration::from_millis(900),
                "round {round} took {:?}",
                started.elapsed()
            );
            assert!(swept <= 16, "{swept}");
        }
        for sku in ["ST-01", "BK-12"] {
            assert_eq!(stock(&stores.1, sku).await.reserved, 0, "{sku}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_order_event_applied_by_two_replicas_at_once_takes_effect_once() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        let reservation = reserve(&stores.0, "BK-12", 4, time::Duration::minutes(10)).await;
        let placed = Uuid::new_v4();
        store_commit(&stores.0, placed, &reservation).await;
        let cancelled = Uuid::new_v4();

        // A cancellation redelivered to both replicas: without the inbox, each would put the
        // committed units back on the shelf.
        let answers = race(&stores, 10, move |store, i| {
            let reservation = reservation.clone();
            async move {
                let lines = vec![line(&reservation)];
                if i < 2 {
                    store.cancel_order(cancelled, lines).await
                } else {
                    store
                        .apply_order_events(vec![(cancelled, OrderEvent::Cancelled(lines))])
                        .await
                        .map(|mut applied| applied.remove(0))
                }
                .expect("applies")
            }
        })
        .await;

        assert_eq!(
            answers.iter().filter(|applied| !applied.duplicate).count(),
            1,
            "{answers:?}"
        );
        assert_eq!(stock(&stores.1, "BK-12").await, Stock::new("BK-12", 100, 0));
        let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(stores.0.pool().expect("ready"))
            .await
            .expect("reads");
        assert_eq!(recorded, 2, "the placement and the cancellation, once each");
    }

    async fn store_commit(store: &PgInventoryStore, message_id: Uuid, reservation: &Reservation) {
        let applied = store
            .commit_order(message_id, vec![line(reservation)])
            .await
            .expect("commits");
        assert_eq!(applied.changed, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_racing_a_commit_ends_in_exactly_one_of_them() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        let mut reservations = Vec::new();
        for _ in 0..20 {
            reservations.push(reserve(&stores.0, "ST-01", 1, time::Duration::minutes(10)).await);
        }

        let mut committed = 0;
        for reservation in reservations {
            let releasing = {
                let store = stores.0.clone();
                tokio::spawn(async move { store.release(reservation.id).await })
            };
            let commit = stores
                .1
                .commit_order(Uuid::new_v4(), vec![line(&reservation)])
                .await
                .expect("handled");
            match releasing.await.expect("the task runs") {
                // The release won: the order finds it released and leaves it.
                Ok(ReservationStatus::Released) => assert_eq!(commit.unchanged, 1),
                // The commit won: the release is refused.
                Err(StoreError::Committed(_)) => {
                    assert_eq!(commit.changed, 1);
                    committed += 1;
                }
                other => panic!("unexpected release answer {other:?}"),
            }
        }

        // Every unit left the shelf once (committed) or came back once (released).
        assert_eq!(
            stock(&stores.0, "ST-01").await,
            Stock::new("ST-01", 500 - committed, 0)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restock_racing_reservations_never_leaves_fewer_units_on_hand_than_reserved() {
        let test = TestDatabase::create().await;
        let stores = replicas(&test).await;
        stores.0.set_on_hand("RACE-1", 20).await.expect("stocks");

        let answers = race(&stores, 40, |store, i| async move {
            if i % 4 == 1 {
                // Lowering the level to 8 is refused once more than 8 units are reserved.
                store.set_on_hand("RACE-1", 8).await.map(|_| ())
            } else {
                store
                    .reserve(request("RACE-1", 1, time::Duration::minutes(10)))
                    .await
                    .map(|_| ())
            }
        })
        .await;

        let level = stock(&stores.1, "RACE-1").await;
        assert!(
            level.on_hand >= level.reserved,
            "{level:?} after {answers:?}"
        );
        let reserved = answers
            .iter()
            .enumerate()
            .filter(|(i, answer)| i % 4 != 1 && answer.is_ok())
            .count();
        assert_eq!(level.reserved, i64::try_from(reserved).expect("small"));
    }

    #[tokio::test]
    async fn until_the_database_is_migrated_operations_fail_transiently_and_ping_says_why() {
        let shutdown = CancellationToken::new();
        // Port 1 refuses connections on every machine.
        let database = PgDatabase::start(
            "postgres://postgres@127.0.0.1:1/x",
            PG_MIGRATIONS,
            shutdown.clone(),
        )
        .expect("a valid URL");
        let store = PgInventoryStore::new(database);

        let refused = store
            .reserve(request("BK-12", 1, time::Duration::minutes(10)))
            .await;
        let ping = store.ping().await;

        assert!(
            matches!(&refused, Err(StoreError::Database(e)) if e.is_transient()),
            "{refused:?}"
        );
        assert!(
            ping.is_err_and(|e| e.to_string().contains("not migrated yet")),
            "readiness says why"
        );
        shutdown.cancel();
    }

    /// A TCP proxy in front of the test server that can be cut (open connections dropped, new
    /// ones closed at once) and restored: a database server that goes away and comes back.
    struct Outage {
        port: u16,
        up: Arc<AtomicBool>,
        connections: Arc<std::sync::Mutex<CancellationToken>>,
    }

    impl Outage {
        async fn start(upstream: (String, u16)) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
            let port = listener.local_addr().expect("bound").port();
            let up = Arc::new(AtomicBool::new(true));
            let connections = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
            let (accepting, cut) = (up.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !accepting.load(Ordering::SeqCst) {
                        continue;
                    }
                    let cut = cut.lock().expect("lock").clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            () = cut.cancelled() => {}
                        }
                    });
                }
            });
            Self {
                port,
                up,
                connections,
            }
        }

        fn cut(&self) {
            self.up.store(false, Ordering::SeqCst);
            let mut connections = self.connections.lock().expect("lock");
            connections.cancel();
            *connections = CancellationToken::new();
        }

        fn restore(&self) {
            self.up.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_server_that_goes_away_fails_operations_transiently_and_is_used_again_when_back() {
        let test = TestDatabase::create().await;
        let direct: PgConnectOptions = test.url().parse().expect("a valid URL");
        let outage = Outage::start((direct.get_host().to_owned(), direct.get_port())).await;
        let proxied = direct.host("127.0.0.1").port(outage.port).to_url_lossy();
        let store = PgInventoryStore::new(
            PgDatabase::connect(proxied.as_str(), PG_MIGRATIONS)
                .await
                .expect("opens through the proxy"),
        );
        let first = reserve(&store, "BK-12", 1, time::Duration::minutes(10)).await;

        outage.cut();
        let refused = store
            .reserve(request("BK-12", 2, time::Duration::minutes(10)))
            .await;
        let not_committed = store.commit_order(Uuid::new_v4(), vec![line(&first)]).await;

        for failed in [refused.map(|_| ()), not_committed.map(|_| ())] {
            assert!(
                matches!(&failed, Err(StoreError::Database(e)) if e.is_transient()),
                "{failed:?}"
            );
        }
        outage.restore();
        // The same store, no restart: the pool reconnects, and nothing was half-written.
        assert_eq!(stock(&store, "BK-12").await, Stock::new("BK-12", 100, 1));
        reserve(&store, "BK-12", 2, time::Duration::minutes(10)).await;
        assert_eq!(stock(&store, "BK-12").await, Stock::new("BK-12", 100, 3));
    }
}
