//! [`PriceStore`] on SQLite, the embedded default: one process, one file.
//!
//! Write transactions run whole on the database's writer thread
//! ([`shared::db::Database::write`]), one hand-off each, starting with `BEGIN IMMEDIATE`: SQLite's
//! write lock is taken up front instead of upgrading a read lock mid-transaction (an upgrade that
//! loses a race fails with `SQLITE_BUSY` at once); with the write lock held, each transaction
//! sees and changes the latest rows. Reads stay on the pool, and a row decodes the same from
//! either driver ([`Columns`]).

use std::collections::BTreeSet;

use futures::future::BoxFuture;
use rusqlite::{Transaction, params};
use shared::db::{Columns, Database, DatabaseError, WriteError};
use shared::events::EventLine;
use shared::money::Money;
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

fn price_from_row(row: &impl Columns) -> Result<Price, DatabaseError> {
    Ok(Price {
        sku: row.value("sku")?,
        name: row.value("name")?,
        price: Money(row.value("price_cents")?),
        currency: row.value("currency")?,
        units_sold: row.value("units_sold")?,
        version: stored_version(row.value("version")?)?,
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
            self.db
                .write(move |tx| {
                    // Inserts the SKU at version 1 (named after itself) or updates it to the next
                    // version, keeping its currency when none is given, and answers the stored
                    // row.
                    let price = tx
                        .prepare_cached(&format!(
                            "INSERT INTO prices (sku, name, price_cents, currency) \
                             VALUES (?1, ?1, ?2, coalesce(?3, ?4)) \
                             ON CONFLICT (sku) DO UPDATE SET price_cents = excluded.price_cents, \
                             currency = coalesce(?3, prices.currency), \
                             version = prices.version + 1 \
                             RETURNING {PRICE_COLUMNS}"
                        ))?
                        .query_row(
                            params![
                                change.sku,
                                change.price.cents(),
                                change.currency,
                                DEFAULT_CURRENCY
                            ],
                            |row| Ok(price_from_row(row)),
                        )??;
                    let set = PriceSet::stored(price);
                    shared::outbox::sqlite::enqueue(tx, &set.event())?;
                    Ok(set)
                })
                .await
                .map_err(WriteError::flatten)
        })
    }

    fn record_sales(
        &self,
        message_id: Uuid,
        lines: Vec<EventLine>,
    ) -> BoxFuture<'_, Result<SalesRecorded, StoreError>> {
        Box::pin(async move {
            let mut recorded = self
                .db
                .write(move |tx| record_orders(tx, &[(message_id, lines)]))
                .await
                .map_err(WriteError::flatten)?;
            Ok(recorded.pop().unwrap_or_default())
        })
    }

    fn record_sales_batch(
        &self,
        orders: Vec<(Uuid, Vec<EventLine>)>,
    ) -> BoxFuture<'_, Result<Vec<SalesRecorded>, StoreError>> {
        Box::pin(async move {
            // One transaction, one BEGIN and COMMIT, for the whole batch; an error rolls all of
            // it back.
            self.db
                .write(move |tx| record_orders(tx, &orders))
                .await
                .map_err(WriteError::flatten)
        })
    }
}

/// Records each order's message ID in the inbox and adds the units of the orders not seen
/// before to their SKUs' counters, inside the caller's transaction.
fn record_orders(
    tx: &Transaction<'_>,
    orders: &[(Uuid, Vec<EventLine>)],
) -> Result<Vec<SalesRecorded>, StoreError> {
    let mut fresh = Vec::with_capacity(orders.len());
    for (message_id, _) in orders {
        fresh.push(shared::inbox::sqlite::record(tx, *message_id)?);
    }
    let mut counted = BTreeSet::new();
    let mut add_units =
        tx.prepare_cached("UPDATE prices SET units_sold = units_sold + ? WHERE sku = ?")?;
    for (sku, units) in units_per_sku(orders, &fresh) {
        if add_units.execute(params![units, sku])? > 0 {
            counted.insert(sku);
        }
    }
    Ok(sales_recorded(orders, &fresh, &counted))
}
