//! [`OrderRepository`] on SQLite: one writer at a time (the database's write lock), so every
//! transaction below runs alone and its reads cannot be overtaken by another write.

use futures::future::BoxFuture;
use shared::db::Database;
use shared::money::Money;
use shared::{inbox, outbox};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
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
        let mut tx = self.db.begin_write().await?;
        // The INSERT decides ownership atomically: a fresh key is inserted; an existing one is
        // only overwritten when its claim is stale AND its order was never stored (the owner
        // died mid-flight). No check-then-insert window exists for two requests to both win.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, fingerprint, order_id, claimed_at_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO UPDATE SET
                 fingerprint = excluded.fingerprint,
                 order_id = excluded.order_id,
                 claimed_at_ms = excluded.claimed_at_ms
             WHERE idempotency_keys.claimed_at_ms < ?5
               AND NOT EXISTS (SELECT 1 FROM orders WHERE orders.id = idempotency_keys.order_id)",
        )
        .bind(key)
        .bind(fingerprint)
        .bind(order_id.to_string())
        .bind(unix_millis(OffsetDateTime::now_utc()))
        .bind(stale_before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if claimed {
            KeyClaim::Claimed
        } else {
            // Same transaction, after a write: the row cannot have changed since the INSERT.
            let row =
                sqlx::query("SELECT fingerprint, order_id FROM idempotency_keys WHERE key = ?1")
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?;
            KeyClaim::Held {
                fingerprint: row.try_get("fingerprint")?,
                order_id: parse_uuid(&row, "order_id")?,
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn insert_placed_tx(&self, order: &Order) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO orders (id, status, total_cents, currency, priced_from_cache, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(order.id.to_string())
        .bind(order.status.as_str())
        .bind(order.total.cents())
        .bind(&order.currency)
        .bind(order.priced_from_cache())
        .bind(format_time(order.created_at)?)
        .execute(&mut *tx)
        .await?;
        for (line_no, line) in order.lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO order_lines
                     (order_id, line_no, sku, qty, unit_price_cents, price_source, reservation_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(order.id.to_string())
            .bind(i64::try_from(line_no).unwrap_or(i64::MAX))
            .bind(&line.sku)
            .bind(line.qty)
            .bind(line.unit_price.cents())
            .bind(line.price_source.as_str())
            .bind(line.reservation_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        outbox::enqueue(&mut tx, &placed_event(order)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn cancel_tx(&self, id: Uuid) -> Result<Option<Cancellation>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        // The status check in the WHERE makes the transition happen once, however many
        // cancellations race: only the one that changes the row enqueues the event.
        let newly_cancelled = sqlx::query(
            "UPDATE orders SET status = 'cancelled', cancelled_at = ?2
             WHERE id = ?1 AND status = 'placed'",
        )
        .bind(id.to_string())
        .bind(format_time(OffsetDateTime::now_utc())?)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let Some(order) = load_order(&mut tx, id).await? else {
            return Ok(None);
        };
        if newly_cancelled {
            outbox::enqueue(&mut tx, &cancelled_event(&order)).await?;
        }
        tx.commit().await?;
        Ok(Some(Cancellation {
            order,
            newly_cancelled,
        }))
    }

    async fn apply_price_changes_tx(
        &self,
        changes: &[PriceChange],
    ) -> Result<Vec<PriceChangeOutcome>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            if !inbox::record(&mut tx, change.message_id).await? {
                outcomes.push(PriceChangeOutcome::Duplicate);
                continue;
            }
            // The version check in the upsert's WHERE keeps the newest price: an older change
            // leaves the row as it is (and affects no row).
            let applied = sqlx::query(
                "INSERT INTO cached_prices (sku, price_cents, currency, version)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sku) DO UPDATE SET
                     price_cents = excluded.price_cents,
                     currency = excluded.currency,
                     version = excluded.version,
                     changed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 WHERE cached_prices.version <= excluded.version",
            )
            .bind(&change.sku)
            .bind(change.price.cents())
            .bind(&change.currency)
            .bind(stored_version(change.version))
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            outcomes.push(if applied {
                PriceChangeOutcome::Applied
            } else {
                PriceChangeOutcome::Superseded
            });
        }
        tx.commit().await?;
        Ok(outcomes)
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
        Box::pin(async move {
            sqlx::query("DELETE FROM idempotency_keys WHERE key = ?1 AND order_id = ?2")
                .bind(key)
                .bind(order_id.to_string())
                .execute(&mut *self.db.writer().await?)
                .await?;
            Ok(())
        })
    }

    fn insert_placed<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_placed_tx(order))
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Order>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.db.pool().acquire().await?;
            load_order(&mut conn, id).await
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

async fn load_order(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Order>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT id, status, total_cents, currency, created_at FROM orders WHERE id = ?1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query(
        "SELECT sku, qty, unit_price_cents, price_source, reservation_id
         FROM order_lines WHERE order_id = ?1 ORDER BY line_no",
    )
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(line_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let status: String = row.try_get("status")?;
    let created_at: String = row.try_get("created_at")?;
    Ok(Some(Order {
        id: parse_uuid(&row, "id")?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("order status {status:?}")))?,
        lines,
        total: Money(row.try_get("total_cents")?),
        currency: row.try_get("currency")?,
        created_at: OffsetDateTime::parse(&created_at, &Rfc3339)
            .map_err(|e| StoreError::Corrupt(format!("created_at {created_at:?}: {e}")))?,
    }))
}

fn line_from_row(row: &SqliteRow) -> Result<OrderLine, StoreError> {
    let source: String = row.try_get("price_source")?;
    Ok(OrderLine {
        sku: row.try_get("sku")?,
        qty: row.try_get("qty")?,
        unit_price: Money(row.try_get("unit_price_cents")?),
        price_source: PriceSource::parse(&source)
            .ok_or_else(|| StoreError::Corrupt(format!("price source {source:?}")))?,
        reservation_id: parse_uuid(row, "reservation_id")?,
    })
}

fn parse_uuid(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let raw: String = row.try_get(column)?;
    Uuid::parse_str(&raw).map_err(|e| StoreError::Corrupt(format!("{column} {raw:?}: {e}")))
}

fn format_time(at: OffsetDateTime) -> Result<String, StoreError> {
    at.format(&Rfc3339)
        .map_err(|e| StoreError::Corrupt(format!("unformattable time {at}: {e}")))
}
