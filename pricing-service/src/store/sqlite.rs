//! [`PriceStore`] on SQLite, the embedded default: one process, one file.
//!
//! Write transactions use `BEGIN IMMEDIATE` ([`shared::db::Database::begin_write`]), taking
//! SQLite's write lock up front instead of upgrading a read lock mid-transaction (an upgrade that
//! loses a race fails with `SQLITE_BUSY` at once); with the write lock held, each transaction
//! sees and changes the latest rows.

use std::collections::BTreeSet;

use futures::future::BoxFuture;
use shared::db::Database;
use shared::events::EventLine;
use shared::money::Money;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::{
    PriceSet, PriceStore, SalesRecorded, SetPrice, StoreError, sales_recorded, stored_version,
    units_per_sku,
};
use crate::domain::Price;
use crate::domain::price::DEFAULT_CURRENCY;

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

const PRICE_COLUMNS: &str = "sku, name, price_cents, currency, units_sold, version";

fn price_from_row(row: &SqliteRow) -> Result<Price, sqlx::Error> {
    Ok(Price {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price: Money(row.try_get("price_cents")?),
        currency: row.try_get("currency")?,
        units_sold: row.try_get("units_sold")?,
        version: stored_version(row.try_get("version")?)?,
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
            let rows = sqlx::query(&format!("SELECT {PRICE_COLUMNS} FROM prices ORDER BY sku"))
                .fetch_all(self.db.pool())
                .await?;
            Ok(rows.iter().map(price_from_row).collect::<Result<_, _>>()?)
        })
    }

    fn get_price<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Price>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(&format!("SELECT {PRICE_COLUMNS} FROM prices WHERE sku = ?"))
                .bind(sku)
                .fetch_optional(self.db.pool())
                .await?;
            Ok(row.as_ref().map(price_from_row).transpose()?)
        })
    }

    fn set_price(&self, change: SetPrice) -> BoxFuture<'_, Result<PriceSet, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            // Inserts the SKU at version 1 (named after itself) or updates it to the next
            // version, keeping its currency when none is given, and answers the stored row.
            let row = sqlx::query(&format!(
                "INSERT INTO prices (sku, name, price_cents, currency) \
                 VALUES (?1, ?1, ?2, coalesce(?3, ?4)) \
                 ON CONFLICT (sku) DO UPDATE SET price_cents = excluded.price_cents, \
                 currency = coalesce(?3, prices.currency), version = prices.version + 1 \
                 RETURNING {PRICE_COLUMNS}"
            ))
            .bind(&change.sku)
            .bind(change.price.cents())
            .bind(change.currency.as_deref())
            .bind(DEFAULT_CURRENCY)
            .fetch_one(&mut *tx)
            .await?;
            let set = PriceSet::stored(price_from_row(&row)?);
            shared::outbox::enqueue(&mut tx, &set.event()).await?;
            tx.commit().await?;
            Ok(set)
        })
    }

    fn record_sales(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<SalesRecorded, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.begin_write().await?;
            let mut recorded = record_orders(&mut tx, &[(message_id, lines)]).await?;
            tx.commit().await?;
            Ok(recorded.pop().unwrap_or_default())
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
            let recorded = record_orders(&mut tx, &orders).await?;
            tx.commit().await?;
            Ok(recorded)
        })
    }
}

/// Records each order's message ID in the inbox and adds the units of the orders not seen
/// before to their SKUs' counters, inside the caller's transaction.
async fn record_orders(
    tx: &mut SqliteConnection,
    orders: &[(Uuid, Vec<EventLine>)],
) -> Result<Vec<SalesRecorded>, StoreError> {
    let mut fresh = Vec::with_capacity(orders.len());
    for (message_id, _) in orders {
        fresh.push(shared::inbox::record(&mut *tx, *message_id).await?);
    }
    let mut counted = BTreeSet::new();
    for (sku, units) in units_per_sku(orders, &fresh) {
        let updated = sqlx::query("UPDATE prices SET units_sold = units_sold + ? WHERE sku = ?")
            .bind(units)
            .bind(sku)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated > 0 {
            counted.insert(sku);
        }
    }
    Ok(sales_recorded(orders, &fresh, &counted))
}
