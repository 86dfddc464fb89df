//! Order storage: the [`OrderRepository`] the handlers use, and its SQLite implementation.
//!
//! Every state change that other services must hear about is written in the same transaction as
//! its outbox row (`shared::outbox::enqueue`), so an order is never stored without its event, nor
//! an event published for an order that was not stored.

use futures::future::BoxFuture;
use shared::db::{Database, DatabaseError};
use shared::events::{EventLine, OrderCancelled, OrderPlaced};
use shared::money::Money;
use shared::{inbox, outbox};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::domain::{Order, OrderLine, OrderStatus, PriceSource};

/// The schema, oldest first: this service's tables, then the shared outbox and inbox.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "orders", include_str!("../migrations/0001_orders.sql")),
    (2, "outbox", outbox::MIGRATION),
    (3, "inbox", inbox::MIGRATION),
    (4, "outbox trace context", outbox::TRACE_CONTEXT_MIGRATION),
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

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
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

    /// Checks that the database answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// [`OrderRepository`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteOrderRepository {
    db: Database,
}

impl SqliteOrderRepository {
    /// A repository over `db` (already migrated with [`MIGRATIONS`]).
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
        outbox::enqueue(
            &mut tx,
            &OrderPlaced {
                order_id: order.id,
                lines: event_lines(order),
                total: order.total,
                currency: order.currency.clone(),
            },
        )
        .await?;
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
            outbox::enqueue(
                &mut tx,
                &OrderCancelled {
                    order_id: order.id,
                    lines: event_lines(&order),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(Cancellation {
            order,
            newly_cancelled,
        }))
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

fn parse_uuid(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let raw: String = row.try_get(column)?;
    Uuid::parse_str(&raw).map_err(|e| StoreError::Corrupt(format!("{column} {raw:?}: {e}")))
}

fn format_time(at: OffsetDateTime) -> Result<String, StoreError> {
    at.format(&Rfc3339)
        .map_err(|e| StoreError::Corrupt(format!("unformattable time {at}: {e}")))
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn repository() -> SqliteOrderRepository {
        let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
            .await
            .expect("the database opens");
        SqliteOrderRepository::new(database)
    }

    fn order(id: Uuid) -> Order {
        let line = OrderLine {
            sku: "BK-12".to_owned(),
            qty: 2,
            unit_price: Money(3990),
            price_source: PriceSource::Cache,
            reservation_id: Uuid::new_v4(),
        };
        Order::placed(id, vec![line], "EUR".to_owned(), OffsetDateTime::now_utc()).expect("fits")
    }

    async fn outbox_rows(repo: &SqliteOrderRepository, event_type: &str) -> i64 {
        sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE event_type = ?1")
            .bind(event_type)
            .fetch_one(repo.db.pool())
            .await
            .expect("counts")
            .try_get("n")
            .expect("a count")
    }

    /// A claim made now is never stale with this cut-off.
    const NOTHING_IS_STALE: i64 = 0;
    /// Every claim made before the end of time is stale with this one.
    const EVERYTHING_IS_STALE: i64 = i64::MAX;

    #[tokio::test]
    async fn only_the_first_claim_of_a_key_wins() {
        let repo = repository().await;
        let first = Uuid::new_v4();

        let won = repo
            .claim_key("key-1", "fp-a", first, NOTHING_IS_STALE)
            .await;
        let lost = repo
            .claim_key("key-1", "fp-b", Uuid::new_v4(), NOTHING_IS_STALE)
            .await;

        assert_eq!(won.expect("claims"), KeyClaim::Claimed);
        assert_eq!(
            lost.expect("claims"),
            KeyClaim::Held {
                fingerprint: "fp-a".to_owned(),
                order_id: first,
            }
        );
    }

    #[tokio::test]
    async fn a_key_given_back_can_be_claimed_again() {
        let repo = repository().await;
        let first = Uuid::new_v4();
        repo.claim_key("key-1", "fp", first, NOTHING_IS_STALE)
            .await
            .expect("claims");

        repo.release_key("key-1", first).await.expect("releases");
        let again = repo
            .claim_key("key-1", "fp", Uuid::new_v4(), NOTHING_IS_STALE)
            .await;

        assert_eq!(again.expect("claims"), KeyClaim::Claimed);
    }

    #[tokio::test]
    async fn a_stale_claim_is_taken_over_only_if_its_order_was_never_stored() {
        let repo = repository().await;
        let crashed = Uuid::new_v4();
        let finished = Uuid::new_v4();
        repo.claim_key("crashed", "fp", crashed, NOTHING_IS_STALE)
            .await
            .expect("claims");
        repo.claim_key("finished", "fp", finished, NOTHING_IS_STALE)
            .await
            .expect("claims");
        repo.insert_placed(&order(finished)).await.expect("stores");

        let takeover = repo
            .claim_key("crashed", "fp", Uuid::new_v4(), EVERYTHING_IS_STALE)
            .await;
        let no_takeover = repo
            .claim_key("finished", "fp", Uuid::new_v4(), EVERYTHING_IS_STALE)
            .await;

        assert_eq!(takeover.expect("claims"), KeyClaim::Claimed);
        assert_eq!(
            no_takeover.expect("claims"),
            KeyClaim::Held {
                fingerprint: "fp".to_owned(),
                order_id: finished,
            }
        );
    }

    #[tokio::test]
    async fn a_stored_order_reads_back_unchanged_with_its_event_enqueued() {
        let repo = repository().await;
        let placed = order(Uuid::new_v4());

        repo.insert_placed(&placed).await.expect("stores");

        assert_eq!(repo.get(placed.id).await.expect("reads"), Some(placed));
        assert_eq!(outbox_rows(&repo, "order.placed").await, 1);
        assert_eq!(repo.get(Uuid::new_v4()).await.expect("reads"), None);
    }

    #[tokio::test]
    async fn cancelling_twice_enqueues_order_cancelled_once() {
        let repo = repository().await;
        let placed = order(Uuid::new_v4());
        repo.insert_placed(&placed).await.expect("stores");

        let first = repo.cancel(placed.id).await.expect("cancels");
        let second = repo.cancel(placed.id).await.expect("cancels");

        let first = first.expect("the order exists");
        let second = second.expect("the order exists");
        assert!(first.newly_cancelled);
        assert!(!second.newly_cancelled);
        assert_eq!(first.order.status, OrderStatus::Cancelled);
        assert_eq!(second.order, first.order);
        assert_eq!(outbox_rows(&repo, "order.cancelled").await, 1);
        assert_eq!(repo.cancel(Uuid::new_v4()).await.expect("runs"), None);
    }
}
