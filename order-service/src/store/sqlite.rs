//! [`OrderRepository`] on SQLite: one writer at a time (the database's writer thread,
//! [`shared::db::Database::write`]), so every transaction below runs alone, whole, in one
//! hand-off, and its reads cannot be overtaken by another write. Reads that write nothing stay
//! on the pool.
//!
//! Rows are decoded once for both drivers ([`Columns`]): ids as hyphenated TEXT, `created_at`
//! and `cancelled_at` as RFC 3339 TEXT, claim times as INTEGER milliseconds.

use futures::future::BoxFuture;
use rusqlite::{OptionalExtension, Transaction, params};
use shared::db::{Columns, Database, DatabaseError, WriteError};
use shared::money::Money;
use shared::{inbox, outbox};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{
    Cancellation, KeyClaim, OrderRepository, PriceChange, PriceChangeOutcome, StoreError,
    cancelled_event, placed_event, stored_version, unix_millis,
};
use crate::domain::{Order, OrderLine, OrderStatus, PriceSource};

/// [`OrderRepository`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteOrderRepository {
    pub(super) db: Database,
}

impl SqliteOrderRepository {
    /// A repository over `db` (already migrated with [`MIGRATIONS`](super::MIGRATIONS)).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn claim_key_tx(
        &self,
        key: &str,
        fingerprint: &str,
        order_id: Uuid,
        stale_before_ms: i64,
    ) -> Result<KeyClaim, StoreError> {
        let (key, fingerprint) = (key.to_owned(), fingerprint.to_owned());
        self.db
            .write(move |tx| {
                let claimed_at_ms = unix_millis(OffsetDateTime::now_utc());
                // The INSERT decides ownership atomically: a fresh key is inserted; an existing
                // one is only overwritten when its claim is stale AND its order was never stored
                // (the owner died mid-flight). No check-then-insert window exists for two
                // requests to both win.
                let claimed =
                    tx.prepare_cached(
                        "INSERT INTO idempotency_keys (key, fingerprint, order_id, claimed_at_ms)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (key) DO UPDATE SET
                             fingerprint = excluded.fingerprint,
                             order_id = excluded.order_id,
                             claimed_at_ms = excluded.claimed_at_ms
                         WHERE idempotency_keys.claimed_at_ms < ?5
                           AND NOT EXISTS
                               (SELECT 1 FROM orders WHERE orders.id = idempotency_keys.order_id)",
                    )?
                    .execute(params![
                        key,
                        fingerprint,
                        order_id.to_string(),
                        claimed_at_ms,
                        stale_before_ms
                    ])? == 1;
                if claimed {
                    return Ok(KeyClaim::Claimed);
                }
                // Same transaction, after a write: the row cannot have changed since the INSERT.
                let (fingerprint, order_id): (String, String) = tx
                    .prepare_cached(
                        "SELECT fingerprint, order_id FROM idempotency_keys WHERE key = ?1",
                    )?
                    .query_row([&key], |row| {
                        Ok((row.get("fingerprint")?, row.get("order_id")?))
                    })?;
                Ok(KeyClaim::Held {
                    fingerprint,
                    order_id: parse_id("order_id", &order_id)?,
                })
            })
            .await
            .map_err(WriteError::flatten)
    }

    async fn insert_placed_tx(&self, order: &Order) -> Result<(), StoreError> {
        let order = order.clone();
        let created_at = format_time(order.created_at)?;
        self.db
            .write(move |tx| {
                let id = order.id.to_string();
                tx.prepare_cached(
                    "INSERT INTO orders
                         (id, status, total_cents, currency, priced_from_cache, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    id,
                    order.status.as_str(),
                    order.total.cents(),
                    order.currency,
                    order.priced_from_cache(),
                    created_at
                ])?;
                let mut insert_line = tx.prepare_cached(
                    "INSERT INTO order_lines
                         (order_id, line_no, sku, qty, unit_price_cents, price_source,
                          reservation_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (line_no, line) in order.lines.iter().enumerate() {
                    insert_line.execute(params![
                        id,
                        i64::try_from(line_no).unwrap_or(i64::MAX),
                        line.sku,
                        line.qty,
                        line.unit_price.cents(),
                        line.price_source.as_str(),
                        line.reservation_id.to_string()
                    ])?;
                }
                outbox::sqlite::enqueue(tx, &placed_event(&order))
            })
            .await
            .map_err(DatabaseError::from)?;
        Ok(())
    }

    async fn cancel_tx(&self, id: Uuid) -> Result<Option<Cancellation>, StoreError> {
        self.db
            .write(move |tx| {
                let cancelled_at = format_time(OffsetDateTime::now_utc())?;
                // The status check in the WHERE makes the transition happen once, however many
                // cancellations race: only the one that changes the row enqueues the event.
                let newly_cancelled = tx
                    .prepare_cached(
                        "UPDATE orders SET status = 'cancelled', cancelled_at = ?2
                         WHERE id = ?1 AND status = 'placed'",
                    )?
                    .execute(params![id.to_string(), cancelled_at])?
                    == 1;
                let Some(order) = load_order_in(tx, id)? else {
                    return Ok(None);
                };
                if newly_cancelled {
                    outbox::sqlite::enqueue(tx, &cancelled_event(&order))?;
                }
                Ok(Some(Cancellation {
                    order,
                    newly_cancelled,
                }))
            })
            .await
            .map_err(WriteError::flatten)
    }

    async fn apply_price_changes_tx(
        &self,
        changes: &[PriceChange],
    ) -> Result<Vec<PriceChangeOutcome>, StoreError> {
        let changes = changes.to_vec();
        self.db
            .write(move |tx| {
                let mut outcomes = Vec::with_capacity(changes.len());
                for change in &changes {
                    if !inbox::sqlite::record(tx, change.message_id)? {
                        outcomes.push(PriceChangeOutcome::Duplicate);
                        continue;
                    }
                    // The version check in the upsert's WHERE keeps the newest price: an older
                    // change leaves the row as it is (and affects no row).
                    let applied =
                        tx.prepare_cached(
                            "INSERT INTO cached_prices (sku, price_cents, currency, version)
                             VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (sku) DO UPDATE SET
                                 price_cents = excluded.price_cents,
                                 currency = excluded.currency,
                                 version = excluded.version,
                                 changed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                             WHERE cached_prices.version <= excluded.version",
                        )?
                        .execute(params![
                            change.sku,
                            change.price.cents(),
                            change.currency,
                            stored_version(change.version)
                        ])? == 1;
                    outcomes.push(if applied {
                        PriceChangeOutcome::Applied
                    } else {
                        PriceChangeOutcome::Superseded
                    });
                }
                Ok::<_, rusqlite::Error>(outcomes)
            })
            .await
            .map_err(|error| StoreError::Database(error.into()))
    }
}

impl OrderRepository for SqliteOrderRepository {
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        order_id: Uuid,
        stale_before_ms: i64,
    ) -> BoxFuture<'a, Result<KeyClaim, StoreError>> {
        Box::pin(self.claim_key_tx(key, fingerprint, order_id, stale_before_ms))
    }

    fn release_key<'a>(
        &'a self,
        key: &'a str,
        order_id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = key.to_owned();
        Box::pin(async move {
            self.db
                .write(move |tx| {
                    tx.prepare_cached(
                        "DELETE FROM idempotency_keys WHERE key = ?1 AND order_id = ?2",
                    )?
                    .execute(params![key, order_id.to_string()])
                })
                .await
                .map_err(DatabaseError::from)?;
            Ok(())
        })
    }

    fn insert_placed<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_placed_tx(order))
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Order>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.db.pool().acquire().await?;
            let Some(row) = sqlx::query(ORDER_BY_ID)
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(None);
            };
            let lines = sqlx::query(LINES_OF_ORDER)
                .bind(id.to_string())
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(line_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(order_from_row(&row, lines)?))
        })
    }

    fn cancel(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Cancellation>, StoreError>> {
        Box::pin(self.cancel_tx(id))
    }

    fn apply_price_changes<'a>(
        &'a self,
        changes: &'a [PriceChange],
    ) -> BoxFuture<'a, Result<Vec<PriceChangeOutcome>, StoreError>> {
        Box::pin(self.apply_price_changes_tx(changes))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(self.db.pool()).await?;
            Ok(())
        })
    }
}

const ORDER_BY_ID: &str =
    "SELECT id, status, total_cents, currency, created_at FROM orders WHERE id = ?1";

const LINES_OF_ORDER: &str = "SELECT sku, qty, unit_price_cents, price_source, reservation_id
     FROM order_lines WHERE order_id = ?1 ORDER BY line_no";

/// The order `id` with its lines, read inside a write transaction.
fn load_order_in(tx: &Transaction<'_>, id: Uuid) -> Result<Option<Order>, StoreError> {
    let id = id.to_string();
    let lines = tx
        .prepare_cached(LINES_OF_ORDER)?
        .query_map([&id], |row| Ok(line_from_row(row)))?
        .map(|line| line?)
        .collect::<Result<Vec<_>, _>>()?;
    tx.prepare_cached(ORDER_BY_ID)?
        .query_row([&id], |row| Ok(order_from_row(row, lines)))
        .optional()?
        .transpose()
}

fn order_from_row(row: &impl Columns, lines: Vec<OrderLine>) -> Result<Order, StoreError> {
    let status: String = row.value("status")?;
    let created_at: String = row.value("created_at")?;
    Ok(Order {
        id: parse_uuid(row, "id")?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("order status {status:?}")))?,
        lines,
        total: Money(row.value("total_cents")?),
        currency: row.value("currency")?,
        created_at: OffsetDateTime::parse(&created_at, &Rfc3339)
            .map_err(|e| StoreError::Corrupt(format!("created_at {created_at:?}: {e}")))?,
    })
}

fn line_from_row(row: &impl Columns) -> Result<OrderLine, StoreError> {
    let source: String = row.value("price_source")?;
    Ok(OrderLine {
        sku: row.value("sku")?,
        qty: row.value("qty")?,
        unit_price: Money(row.value("unit_price_cents")?),
        price_source: PriceSource::parse(&source)
            .ok_or_else(|| StoreError::Corrupt(format!("price source {source:?}")))?,
        reservation_id: parse_uuid(row, "reservation_id")?,
    })
}

fn parse_uuid(row: &impl Columns, column: &str) -> Result<Uuid, StoreError> {
    parse_id(column, &row.value::<String>(column)?)
}

fn parse_id(column: &str, raw: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(raw).map_err(|e| StoreError::Corrupt(format!("{column} {raw:?}: {e}")))
}

fn format_time(at: OffsetDateTime) -> Result<String, StoreError> {
    at.format(&Rfc3339)
        .map_err(|e| StoreError::Corrupt(format!("unformattable time {at}: {e}")))
}
