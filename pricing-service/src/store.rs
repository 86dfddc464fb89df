//! Prices and sales counters: the repository trait and its SQLite implementation.
//!
//! A price change and its `price.changed` outbox row are written in one transaction, so an event
//! is published exactly for the changes that were stored. Read-then-write operations use
//! `BEGIN IMMEDIATE` ([`shared::db::Database::begin_write`]), taking SQLite's write lock up
//! front instead of upgrading a read lock mid-transaction (an upgrade that loses a race fails
//! with `SQLITE_BUSY` at once).

use futures::future::BoxFuture;
use shared::db::{Database, DatabaseError};
use shared::events::{EventLine, PriceChanged};
use shared::money::Money;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use crate::domain::Price;
use crate::domain::price::DEFAULT_CURRENCY;

/// The schema, applied in order by [`shared::db::connect`].
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "prices", include_str!("../migrations/0001_prices.sql")),
    (
        2,
        "seed catalogue",
        include_str!("../migrations/0002_seed_catalogue.sql"),
    ),
    (3, "transactional outbox", shared::outbox::MIGRATION),
    (4, "consumer inbox", shared::inbox::MIGRATION),
    (
        5,
        "outbox trace context",
        shared::outbox::TRACE_CONTEXT_MIGRATION,
    ),
];

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (busy, I/O, corrupt row; writing the outbox row included).
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

/// A price to set.
#[derive(Debug, Clone)]
pub struct SetPrice {
    /// Product (created if new, named after its SKU).
    pub sku: String,
    /// New price per unit.
    pub price: Money,
    /// New currency; `None` keeps the current one (EUR for a new SKU).
    pub currency: Option<String>,
}

/// The result of setting a price.
#[derive(Debug, Clone)]
pub struct PriceSet {
    /// The stored price.
    pub price: Price,
    /// Whether the SKU was new.
    pub created: bool,
}

/// What handling `order.placed` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalesRecorded {
    /// The message ID was already in the inbox: nothing was done.
    pub duplicate: bool,
    /// Units added to sales counters.
    pub units: u64,
    /// SKUs of lines that name no known price (their units are not counted).
    pub unknown_skus: Vec<String>,
}

/// Storage of prices and sales counters.
///
/// Methods return boxed futures so the store can live behind `Arc<dyn PriceStore>`.
pub trait PriceStore: Send + Sync + 'static {
    /// Checks the database answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Every price, by SKU.
    fn list_prices(&self) -> BoxFuture<'_, Result<Vec<Price>, StoreError>>;
    /// One SKU's price, `None` if unknown.
    fn get_price<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Price>, StoreError>>;
    /// Sets a price and enqueues `price.changed` in the same transaction.
    fn set_price(&self, change: SetPrice) -> BoxFuture<'_, Result<PriceSet, StoreError>>;
    /// Adds each line's units to its SKU's sales, once per message ID.
    fn record_sales(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<SalesRecorded, StoreError>>;
    /// [`PriceStore::record_sales`] for several orders (each with its message ID, in queue order)
    /// in one transaction, all or none; answers what each did, in the same order.
    fn record_sales_batch(
        &self,
        orders: Vec<(Uuid, Vec<EventLine>)>,
    ) -> BoxFuture<'_, Result<Vec<SalesRecorded>, StoreError>>;
}

/// [`PriceStore`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqlitePriceStore {
    db: Database,
}

impl SqlitePriceStore {
    /// A store over an opened, migrated database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

const PRICE_COLUMNS: &str = "sku, name, price_cents, currency, units_sold FROM prices";

fn price_from_row(row: &SqliteRow) -> Result<Price, sqlx::Error> {
    Ok(Price {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price: Money(row.try_get("price_cents")?),
        currency: row.try_get("currency")?,
        units_sold: row.try_get("units_sold")?,
    })
}

impl PriceStore for SqlitePriceStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(self.db.pool()).await?;
            Ok(())
        })
    }

    fn list_prices(&self) -> BoxFuture<'_, Result<Vec<Price>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(&format!("SELECT {PRICE_COLUMNS} ORDER BY sku"))
                .fetch_all(self.db.pool())
                .await?;
            Ok(rows.iter().map(price_from_row).collect::<Result<_, _>>()?)
        })
    }

    fn get_price<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Price>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(&format!("SELECT {PRICE_COLUMNS} WHERE sku = ?"))
                .bind(sku)
                .fetch_optional(self.db.pool())
                .await?;
            Ok(row.as_ref().map(price_from_row).transpose()?)
        })
    }

    fn set_price(&self, change: SetPrice) -> BoxFuture<'_, Result<PriceSet, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let current = sqlx::query(&format!("SELECT {PRICE_COLUMNS} WHERE sku = ?"))
                .bind(&change.sku)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(price_from_row)
                .transpose()?;
            let created = current.is_none();
            let price = match current {
                Some(current) => Price {
                    price: change.price,
                    currency: change.currency.unwrap_or(current.currency),
                    ..current
                },
                None => Price {
                    name: change.sku.clone(),
                    sku: change.sku,
                    price: change.price,
                    currency: change
                        .currency
                        .unwrap_or_else(|| DEFAULT_CURRENCY.to_owned()),
                    units_sold: 0,
                },
            };
            sqlx::query(
                "INSERT INTO prices (sku, name, price_cents, currency) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (sku) DO UPDATE SET \
                 price_cents = excluded.price_cents, currency = excluded.currency",
            )
            .bind(&price.sku)
            .bind(&price.name)
            .bind(price.price.cents())
            .bind(&price.currency)
            .execute(&mut *tx)
            .await?;
            let event = PriceChanged {
                sku: price.sku.clone(),
                price: price.price,
                currency: price.currency.clone(),
            };
            shared::outbox::enqueue(&mut tx, &event).await?;
            tx.commit().await?;
            Ok(PriceSet { price, created })
        })
    }

    fn record_sales(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<SalesRecorded, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let recorded = record_lines(&mut tx, message_id, &lines).await?;
            tx.commit().await?;
            Ok(recorded)
        })
    }

    fn record_sales_batch(
        &self,
        orders: Vec<(Uuid, Vec<EventLine>)>,
    ) -> BoxFuture<'_, Result<Vec<SalesRecorded>, StoreError>> {
        Box::pin(async move {
            // One transaction, one BEGIN and COMMIT, for the whole batch; an error drops `tx`,
            // rolling all of it back.
            let mut tx = self.db.begin_write().await?;
            let mut results = Vec::with_capacity(orders.len());
            for (message_id, lines) in &orders {
                results.push(record_lines(&mut tx, *message_id, lines).await?);
            }
            tx.commit().await?;
            Ok(results)
        })
    }
}

/// Records `message_id` in the inbox and adds each line's units to its SKU's counter, inside
/// the caller's transaction; does nothing when the inbox already had the message.
async fn record_lines(
    tx: &mut SqliteConnection,
    message_id: Uuid,
    lines: &[EventLine],
) -> Result<SalesRecorded, StoreError> {
    if !shared::inbox::record(&mut *tx, message_id).await? {
        return Ok(SalesRecorded {
            duplicate: true,
            ..SalesRecorded::default()
        });
    }
    let mut recorded = SalesRecorded::default();
    for line in lines {
        let updated = sqlx::query("UPDATE prices SET units_sold = units_sold + ? WHERE sku = ?")
            .bind(i64::from(line.qty))
            .bind(&line.sku)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            recorded.unknown_skus.push(line.sku.clone());
        } else {
            recorded.units += u64::from(line.qty);
        }
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store and its read pool.
    async fn store() -> (SqlitePriceStore, sqlx::SqlitePool) {
        let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
            .await
            .expect("the database opens");
        let pool = database.pool().clone();
        (SqlitePriceStore::new(database), pool)
    }

    fn change(sku: &str, cents: i64, currency: Option<&str>) -> SetPrice {
        SetPrice {
            sku: sku.to_owned(),
            price: Money(cents),
            currency: currency.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn a_price_change_is_stored_with_its_outbox_row() {
        let (store, pool) = store().await;

        let set = store
            .set_price(change("BK-12", 4200, None))
            .await
            .expect("sets");

        assert!(!set.created);
        assert_eq!(set.price.price, Money(4200));
        assert_eq!(set.price.name, "The Rust Book");
        assert_eq!(shared::outbox::pending(&pool).await.expect("counts"), 1);
    }

    #[tokio::test]
    async fn a_change_without_currency_keeps_the_current_one_and_a_new_sku_gets_eur() {
        let (store, _) = store().await;
        store
            .set_price(change("MG-07", 1000, Some("USD")))
            .await
            .expect("sets");

        let kept = store
            .set_price(change("MG-07", 1100, None))
            .await
            .expect("sets");
        let created = store
            .set_price(change("NEW-1", 100, None))
            .await
            .expect("sets");

        assert_eq!(kept.price.currency, "USD");
        assert!(created.created);
        assert_eq!(created.price.currency, "EUR");
        assert_eq!(created.price.name, "NEW-1");
    }

    #[tokio::test]
    async fn sales_are_counted_once_per_message_and_unknown_skus_are_reported() {
        let (store, _) = store().await;
        let lines = vec![
            EventLine {
                sku: "HD-44".to_owned(),
                qty: 2,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(4900),
            },
            EventLine {
                sku: "GONE-1".to_owned(),
                qty: 1,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(100),
            },
        ];
        let message_id = Uuid::new_v4();

        let first = store
            .record_sales(message_id, lines.clone())
            .await
            .expect("records");
        let again = store
            .record_sales(message_id, lines)
            .await
            .expect("records");

        assert_eq!(first.units, 2);
        assert_eq!(first.unknown_skus, ["GONE-1"]);
        assert!(again.duplicate);
        let hoodie = store.get_price("HD-44").await.expect("reads");
        assert_eq!(hoodie.map(|p| p.units_sold), Some(2));
    }

    #[tokio::test]
    async fn a_batch_of_orders_counts_each_once_in_one_transaction() {
        let (store, _) = store().await;
        let hoodies = |qty| {
            vec![EventLine {
                sku: "HD-44".to_owned(),
                qty,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(4900),
            }]
        };
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());

        let recorded = store
            .record_sales_batch(vec![
                (first, hoodies(1)),
                (second, hoodies(2)),
                (first, hoodies(1)),
            ])
            .await
            .expect("records");

        assert_eq!(recorded.len(), 3);
        assert_eq!((recorded[0].units, recorded[1].units), (1, 2));
        assert!(recorded[2].duplicate, "the same message ID counts once");
        let hoodie = store.get_price("HD-44").await.expect("reads");
        assert_eq!(hoodie.map(|p| p.units_sold), Some(3));
    }
}
