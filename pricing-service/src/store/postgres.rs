//! [`PriceStore`] on PostgreSQL, shared by several replicas of pricing-service.
//!
//! Transactions run at PostgreSQL's default READ COMMITTED, and no replica takes a lock of its
//! own: each statement is atomic across replicas by itself, as its comment says. The two rules
//! that matter:
//!
//! - a SKU's versions never repeat: the upsert that sets a price takes the row lock and adds one
//!   to the latest committed version, so two replicas changing one price at once get distinct,
//!   consecutive versions, and the stored price is the one with the highest;
//! - an `order.placed` counts once: its inbox row and the counters it adds to are written in one
//!   transaction, and the inbox's primary key lets only one replica's insert win.
//!
//! Every connection is taken through [`PgDatabase::ready_pool`], so until the migrations have
//! run (the server away at startup) an operation fails with a transient error: a `503` to an HTTP
//! caller, a retry to a consumer.

use std::collections::BTreeSet;

use futures::future::BoxFuture;
use shared::events::EventLine;
use shared::money::Money;
use shared::pg::PgDatabase;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{
    PriceSet, PriceStore, SalesRecorded, SetPrice, StoreError, sales_recorded, stored_version,
    units_per_sku,
};
use crate::domain::Price;
use crate::domain::price::DEFAULT_CURRENCY;

/// [`PriceStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgPriceStore {
    db: PgDatabase,
}

impl PgPriceStore {
    /// A store over `db`, usable once its migrations ([`super::PG_MIGRATIONS`]) have run.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }
}

const PRICE_COLUMNS: &str = "sku, name, price_cents, currency, units_sold, version";

fn price_from_row(row: &PgRow) -> Result<Price, sqlx::Error> {
    Ok(Price {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price: Money(row.try_get("price_cents")?),
        currency: row.try_get("currency")?,
        units_sold: row.try_get("units_sold")?,
        version: stored_version(row.try_get("version")?)?,
    })
}

impl PriceStore for PgPriceStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db.ping().await?;
            Ok(())
        })
    }

    fn list_prices(&self) -> BoxFuture<'_, Result<Vec<Price>, StoreError>> {
        Box::pin(async move {
            // One statement sees one snapshot: a consistent list, whatever replicas write.
            let rows = sqlx::query(&format!("SELECT {PRICE_COLUMNS} FROM prices ORDER BY sku"))
                .fetch_all(self.db.ready_pool()?)
                .await?;
            Ok(rows.iter().map(price_from_row).collect::<Result<_, _>>()?)
        })
    }

    fn get_price<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Price>, StoreError>> {
        Box::pin(async move {
            // The latest committed row; a change committing at the same moment is either wholly
            // in it or not at all.
            let row = sqlx::query(&format!(
                "SELECT {PRICE_COLUMNS} FROM prices WHERE sku = $1"
            ))
            .bind(sku)
            .fetch_optional(self.db.ready_pool()?)
            .await?;
            Ok(row.as_ref().map(price_from_row).transpose()?)
        })
    }

    fn set_price(&self, change: SetPrice) -> BoxFuture<'_, Result<PriceSet, StoreError>> {
        Box::pin(async move {
            let mut tx = self.db.ready_pool()?.begin().await?;
            // Atomic across replicas: the insert of a new SKU either wins its primary key or
            // waits for the replica inserting it and then updates that row; an update locks the
            // row and, under READ COMMITTED, re-reads the latest committed version before adding
            // one, so no two changes share a version. The row stays locked until COMMIT, so the
            // outbox row of version n + 1 is written after that of version n, and the relay
            // publishes them in that order.
            let row = sqlx::query(&format!(
                "INSERT INTO prices (sku, name, price_cents, currency) \
                 VALUES ($1, $1, $2, coalesce($3, $4)) \
                 ON CONFLICT (sku) DO UPDATE SET price_cents = excluded.price_cents, \
                 currency = coalesce($3, prices.currency), version = prices.version + 1 \
                 RETURNING {PRICE_COLUMNS}"
            ))
            .bind(&change.sku)
            .bind(change.price.cents())
            .bind(change.currency.as_deref())
            .bind(DEFAULT_CURRENCY)
            .fetch_one(&mut *tx)
            .await?;
            let set = PriceSet::stored(price_from_row(&row)?);
            shared::outbox::postgres::enqueue(&mut tx, &set.event()).await?;
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
            let mut tx = self.db.ready_pool()?.begin().await?;
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
            // One transaction for the whole batch; an error drops `tx`, rolling all of it back.
            let mut tx = self.db.ready_pool()?.begin().await?;
            let recorded = record_orders(&mut tx, &orders).await?;
            tx.commit().await?;
            Ok(recorded)
        })
    }
}

/// Records each order's message ID in the inbox and adds the units of the orders not seen
/// before to their SKUs' counters, inside the caller's transaction.
async fn record_orders(
    tx: &mut PgConnection,
    orders: &[(Uuid, Vec<EventLine>)],
) -> Result<Vec<SalesRecorded>, StoreError> {
    let mut fresh = Vec::with_capacity(orders.len());
    for (message_id, _) in orders {
        // Atomic across replicas: of two inserting one message ID, the second waits on the
        // first's uncommitted key and then does nothing (see `shared::inbox::postgres`).
        fresh.push(shared::inbox::postgres::record(&mut *tx, *message_id).await?);
    }
    let mut counted = BTreeSet::new();
    // SKU order (`units_per_sku`): replicas lock the counters they share in one order.
    for (sku, units) in units_per_sku(orders, &fresh) {
        // Atomic across replicas: the row lock serialises concurrent additions, and each adds
        // to the latest committed count, so none is lost.
        let updated = sqlx::query("UPDATE prices SET units_sold = units_sold + $1 WHERE sku = $2")
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
