//! [`OrderRepository`] on PostgreSQL, for several replicas sharing one database.
//!
//! Transactions run at READ COMMITTED and no replica takes an application lock: each statement
//! that decides something decides it in its own `WHERE` or `ON CONFLICT`, evaluated against the
//! newest committed row under the row lock the statement holds. A second replica's statement on
//! the same row waits for the first's transaction and then re-checks its condition, so a
//! decision cannot be made twice. Each method's comments say which statement does that.
//!
//! Every connection is taken through [`PgDatabase::ready_pool`]: until the migrations have run
//! (the server was away at startup) a call fails with a transient error, which the API answers
//! `503` with `Retry-After` and a consumer retries.

use futures::future::BoxFuture;
use shared::money::Money;
use shared::pg::PgDatabase;
use shared::{inbox, outbox};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Cancellation, KeyClaim, OrderRepository, PriceChange, PriceChangeOutcome, StoreError,
    cancelled_event, placed_event, stored_version,
};
use crate::domain::{Order, OrderLine, OrderStatus, PriceSource};

/// How many times a claim is tried when the key's owner gives it back between our `INSERT` and
/// our read of the owner: each retry means another request finished failing in those
/// microseconds, so a third in a row means something is looping and the caller should back off.
const CLAIM_ATTEMPTS: u32 = 3;

/// [`OrderRepository`] on PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgOrderRepository {
    pub(super) db: PgDatabase,
}

impl PgOrderRepository {
    /// A repository over `db` (migrated, or migrating in the background, with
    /// [`PG_MIGRATIONS`](super::PG_MIGRATIONS)).
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }

    async fn claim_key_statements(
        &self,
        key: &str,
        fingerprint: &str,
        order_id: Uuid,
        stale_before_ms: i64,
    ) -> Result<KeyClaim, StoreError> {
        let pool = self.db.ready_pool()?;
        for _ in 0..CLAIM_ATTEMPTS {
            // Atomic across replicas: the primary key lets one INSERT of a key win; a concurrent
            // one waits for the winner's commit and then takes the ON CONFLICT path, whose WHERE
            // is evaluated on the winner's row under its row lock. That row is overwritten only
            // when its claim is stale AND its order was never stored (the owner died mid-flight;
            // a claim goes stale only after its owner's request deadline has passed, so the
            // owner can no longer store an order).
            let claimed = sqlx::query(
                "INSERT INTO idempotency_keys (key, fingerprint, order_id, claimed_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key) DO UPDATE SET
                     fingerprint = excluded.fingerprint,
                     order_id = excluded.order_id,
                     claimed_at = excluded.claimed_at
                 WHERE extract(epoch FROM idempotency_keys.claimed_at) * 1000 < $5
                   AND NOT EXISTS (SELECT 1 FROM orders WHERE orders.id = idempotency_keys.order_id)",
            )
            .bind(key)
            .bind(fingerprint)
            .bind(order_id)
            .bind(OffsetDateTime::now_utc())
            .bind(stale_before_ms)
            .execute(pool)
            .await?
            .rows_affected()
                == 1;
            if claimed {
                return Ok(KeyClaim::Claimed);
            }
            // A new statement sees the owner's committed row (our INSERT waited for it), unless
            // the owner has given the key back since: then claim again.
            let owner =
                sqlx::query("SELECT fingerprint, order_id FROM idempotency_keys WHERE key = $1")
                    .bind(key)
                    .fetch_optional(pool)
                    .await?;
            if let Some(row) = owner {
                return Ok(KeyClaim::Held {
                    fingerprint: row.try_get("fingerprint")?,
                    order_id: row.try_get("order_id")?,
                });
            }
        }
        Err(StoreError::Database(shared::db::DatabaseError::new(
            format!("the idempotency key was given back {CLAIM_ATTEMPTS} times while claiming it"),
            true,
        )))
    }

    async fn insert_placed_tx(&self, order: &Order) -> Result<(), StoreError> {
        let mut tx = self.db.ready_pool()?.begin().await?;
        // A new row under a fresh UUID primary key: no other replica writes it.
        sqlx::query(
            "INSERT INTO orders (id, status, total_cents, currency, priced_from_cache, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(order.id)
        .bind(order.status.as_str())
        .bind(order.total.cents())
        .bind(&order.currency)
        .bind(order.priced_from_cache())
        .bind(order.created_at)
        .execute(&mut *tx)
        .await?;
        // Every line in one statement (one round trip), inside the order's transaction.
        let mut line_nos = Vec::with_capacity(order.lines.len());
        let mut skus = Vec::with_capacity(order.lines.len());
        let mut qtys = Vec::with_capacity(order.lines.len());
        let mut prices = Vec::with_capacity(order.lines.len());
        let mut sources = Vec::with_capacity(order.lines.len());
        let mut reservations = Vec::with_capacity(order.lines.len());
        for (line_no, line) in order.lines.iter().enumerate() {
            line_nos.push(i32::try_from(line_no).unwrap_or(i32::MAX));
            skus.push(line.sku.clone());
            qtys.push(i64::from(line.qty));
            prices.push(line.unit_price.cents());
            sources.push(line.price_source.as_str().to_owned());
            reservations.push(line.reservation_id);
        }
        sqlx::query(
            "INSERT INTO order_lines
                 (order_id, line_no, sku, qty, unit_price_cents, price_source, reservation_id)
             SELECT $1, line_no, sku, qty, unit_price_cents, price_source, reservation_id
             FROM UNNEST($2::int4[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::uuid[])
                 AS line (line_no, sku, qty, unit_price_cents, price_source, reservation_id)",
        )
        .bind(order.id)
        .bind(&line_nos)
        .bind(&skus)
        .bind(&qtys)
        .bind(&prices)
        .bind(&sources)
        .bind(&reservations)
        .execute(&mut *tx)
        .await?;
        outbox::postgres::enqueue(&mut tx, &placed_event(order)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn cancel_tx(&self, id: Uuid) -> Result<Option<Cancellation>, StoreError> {
        let mut tx = self.db.ready_pool()?.begin().await?;
        // Atomic across replicas: a second replica cancelling at once waits on the row lock of
        // the first's UPDATE, then re-checks `status = 'placed'` on the committed row, finds it
        // cancelled and changes nothing, so only one transaction enqueues `order.cancelled`.
        let newly_cancelled = sqlx::query(
            "UPDATE orders SET status = 'cancelled', cancelled_at = now()
             WHERE id = $1 AND status = 'placed'
             RETURNING id",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        // Read after our own UPDATE (or after the winner's commit): the status is final.
        let Some(order) = load_order(&mut tx, id).await? else {
            return Ok(None);
        };
        if newly_cancelled {
            outbox::postgres::enqueue(&mut tx, &cancelled_event(&order)).await?;
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
        let mut tx = self.db.ready_pool()?.begin().await?;
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            // Atomic across replicas: the inbox's primary key lets one transaction record a
            // message ID; another replica holding the same message waits for it and skips.
            if !inbox::postgres::record(&mut tx, change.message_id).await? {
                outcomes.push(PriceChangeOutcome::Duplicate);
                continue;
            }
            // Atomic across replicas: the upsert holds the SKU's row lock and compares versions
            // on the newest committed row, so of two replicas applying two versions at once the
            // older never lands after the newer.
            let applied = sqlx::query(
                "INSERT INTO cached_prices (sku, price_cents, currency, version)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (sku) DO UPDATE SET
                     price_cents = excluded.price_cents,
                     currency = excluded.currency,
                     version = excluded.version,
                     changed_at = now()
                 WHERE cached_prices.version <= excluded.version
                 RETURNING sku",
            )
            .bind(&change.sku)
            .bind(change.price.cents())
            .bind(&change.currency)
            .bind(stored_version(change.version))
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
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

impl OrderRepository for PgOrderRepository {
    fn claim_key<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        order_id: Uuid,
        stale_before_ms: i64,
    ) -> BoxFuture<'a, Result<KeyClaim, StoreError>> {
        Box::pin(self.claim_key_statements(key, fingerprint, order_id, stale_before_ms))
    }

    fn release_key<'a>(
        &'a self,
        key: &'a str,
        order_id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // Only the claim this request made: if the key was taken over meanwhile, the new
            // owner's row has another order ID and stays.
            sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND order_id = $2")
                .bind(key)
                .bind(order_id)
                .execute(self.db.ready_pool()?)
                .await?;
            Ok(())
        })
    }

    fn insert_placed<'a>(&'a self, order: &'a Order) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_placed_tx(order))
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Order>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.db.ready_pool()?.acquire().await?;
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
            self.db.ping().await?;
            Ok(())
        })
    }
}

async fn load_order(conn: &mut PgConnection, id: Uuid) -> Result<Option<Order>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT id, status, total_cents, currency, created_at FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query(
        "SELECT sku, qty, unit_price_cents, price_source, reservation_id
         FROM order_lines WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(line_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let status: String = row.try_get("status")?;
    Ok(Some(Order {
        id: row.try_get("id")?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("order status {status:?}")))?,
        lines,
        total: Money(row.try_get("total_cents")?),
        currency: row.try_get("currency")?,
        created_at: row.try_get("created_at")?,
    }))
}

fn line_from_row(row: &PgRow) -> Result<OrderLine, StoreError> {
    let source: String = row.try_get("price_source")?;
    let qty: i64 = row.try_get("qty")?;
    Ok(OrderLine {
        sku: row.try_get("sku")?,
        qty: u32::try_from(qty).map_err(|e| StoreError::Corrupt(format!("qty {qty}: {e}")))?,
        unit_price: Money(row.try_get("unit_price_cents")?),
        price_source: PriceSource::parse(&source)
            .ok_or_else(|| StoreError::Corrupt(format!("price source {source:?}")))?,
        reservation_id: row.try_get("reservation_id")?,
    })
}
