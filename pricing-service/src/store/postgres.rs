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

#[cfg(test)]
mod tests {
    //! Two stores on two pools over one database stand for two replicas racing.

    use std::net::SocketAddr;
    use std::sync::Arc;

    use futures::future::join_all;
    use shared::testing::postgres::TestDatabase;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::{JoinHandle, JoinSet};

    use super::*;
    use crate::store::PG_MIGRATIONS;
    use crate::store::testing::{change, lines};

    async fn replica(test: &TestDatabase) -> Arc<PgPriceStore> {
        let database = PgDatabase::connect(test.url(), PG_MIGRATIONS)
            .await
            .expect("the database opens");
        Arc::new(PgPriceStore::new(database))
    }

    /// The unsent `price.changed` events of `sku`, in outbox (publishing) order.
    async fn events_of(store: &PgPriceStore, sku: &str) -> Vec<shared::events::PriceChanged> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT data FROM outbox WHERE sent_at IS NULL ORDER BY id")
                .fetch_all(store.db.pool())
                .await
                .expect("reads the outbox");
        rows.iter()
            .map(|data| serde_json::from_str(data).expect("a price.changed payload"))
            .filter(|event: &shared::events::PriceChanged| event.sku == sku)
            .collect()
    }

    #[tokio::test]
    async fn two_replicas_changing_one_price_at_once_take_distinct_gapless_versions_and_the_last_event_carries_the_stored_price()
     {
        let test = TestDatabase::create().await;
        let (a, b) = (replica(&test).await, replica(&test).await);
        const CHANGES: i64 = 40;

        let changes = (0..CHANGES).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move { store.set_price(change("BK-12", 1000 + i, None)).await }
        });
        let sets: Vec<PriceSet> = join_all(changes)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("every change is stored");

        let mut versions: Vec<u64> = sets.iter().map(|set| set.price.version).collect();
        versions.sort_unstable();
        // The seeded price is version 1; the changes take 2..=41, each once.
        assert_eq!(versions, (2..=41).collect::<Vec<u64>>());
        let stored = a.get_price("BK-12").await.expect("reads").expect("known");
        let latest = sets
            .iter()
            .max_by_key(|set| set.price.version)
            .expect("changes were made");
        assert_eq!(
            stored, latest.price,
            "the highest version is the stored one"
        );
        let events = events_of(&b, "BK-12").await;
        let published: Vec<u64> = events.iter().map(|event| event.version).collect();
        assert_eq!(published, versions, "published in version order");
        let last = events.last().expect("events were enqueued");
        assert_eq!((last.price, last.version), (stored.price, stored.version));
    }

    #[tokio::test]
    async fn two_replicas_creating_one_sku_at_once_create_it_once() {
        let test = TestDatabase::create().await;
        let (a, b) = (replica(&test).await, replica(&test).await);

        let (first, second) = tokio::join!(
            a.set_price(change("NEW-1", 100, Some("USD"))),
            b.set_price(change("NEW-1", 200, None)),
        );

        let (first, second) = (first.expect("stored"), second.expect("stored"));
        assert!(first.created != second.created, "exactly one creates it");
        let mut versions = [first.price.version, second.price.version];
        versions.sort_unstable();
        assert_eq!(versions, [1, 2]);
        assert_eq!(
            a.get_price("NEW-1")
                .await
                .expect("reads")
                .map(|p| p.currency),
            Some("USD".to_owned()),
            "the update without a currency kept the creator's"
        );
    }

    #[tokio::test]
    async fn one_event_handled_by_both_replicas_at_once_counts_once() {
        let test = TestDatabase::create().await;
        let (a, b) = (replica(&test).await, replica(&test).await);
        let message_id = Uuid::new_v4();
        let order = lines(&[("HD-44", 3), ("MG-07", 1)]);

        let (first, second) = tokio::join!(
            a.record_sales(message_id, order.clone()),
            b.record_sales_batch(vec![(message_id, order)]),
        );

        let first = first.expect("records");
        let second = second.expect("records").pop().expect("one answer");
        assert!(
            first.duplicate != second.duplicate,
            "exactly one applies it"
        );
        let hoodie = a.get_price("HD-44").await.expect("reads").expect("known");
        let mug = b.get_price("MG-07").await.expect("reads").expect("known");
        assert_eq!((hoodie.units_sold, mug.units_sold), (3, 1));
    }

    #[tokio::test]
    async fn many_events_from_both_replicas_add_up_exactly_without_deadlocks() {
        let test = TestDatabase::create().await;
        let (a, b) = (replica(&test).await, replica(&test).await);
        // Each order names the SKUs in another order, so replicas locking counters in line order
        // would deadlock; batches of 5, and every tenth message handled by both replicas.
        let skus = ["BK-12", "HD-44", "MG-07", "ST-01", "TS-33"];
        let orders: Vec<(Uuid, Vec<EventLine>)> = (0..200_usize)
            .map(|i| {
                let mut named = skus.to_vec();
                named.rotate_left(i % skus.len());
                if i % 2 == 1 {
                    named.reverse();
                }
                let qty = u32::try_from(i % 3 + 1).expect("small");
                let order: Vec<(&str, u32)> = named.iter().map(|&sku| (sku, qty)).collect();
                (Uuid::new_v4(), lines(&order))
            })
            .collect();
        let per_sku: i64 = orders
            .iter()
            .map(|(_, lines)| i64::from(lines[0].qty))
            .sum();

        let mut work = Vec::new();
        for (n, batch) in orders.chunks(5).enumerate() {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            work.push(tokio::spawn({
                let batch = batch.to_vec();
                async move { store.record_sales_batch(batch).await.map(|_| ()) }
            }));
        }
        for (n, order) in orders.iter().enumerate().filter(|(n, _)| n % 10 == 0) {
            let store = if n % 20 == 0 { b.clone() } else { a.clone() };
            let (message_id, lines) = order.clone();
            work.push(tokio::spawn(async move {
                store.record_sales(message_id, lines).await.map(|_| ())
            }));
        }
        for done in join_all(work).await {
            done.expect("runs")
                .expect("recorded without a deadlock or other error");
        }

        for sku in skus {
            let price = a.get_price(sku).await.expect("reads").expect("known");
            assert_eq!(price.units_sold, per_sku, "{sku}");
        }
        let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(a.db.pool())
            .await
            .expect("counts");
        assert_eq!(inbox, 200);
    }

    /// A TCP proxy in front of the development server that a test can cut and restore on the
    /// same port: to the store, the server goes away and comes back.
    struct Proxy {
        address: SocketAddr,
        upstream: SocketAddr,
        serving: Option<JoinHandle<()>>,
    }

    impl Proxy {
        async fn start(upstream: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
            let address = listener.local_addr().expect("bound");
            Self {
                address,
                upstream,
                serving: Some(tokio::spawn(Self::serve(listener, upstream))),
            }
        }

        async fn serve(listener: TcpListener, upstream: SocketAddr) {
            // Dropped with this task: every proxied connection is cut with it.
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }

        /// Closes the port and every connection through it.
        async fn cut(&mut self) {
            if let Some(serving) = self.serving.take() {
                serving.abort();
                let _ = serving.await;
            }
        }

        /// Listens on the same port again.
        async fn restore(&mut self) {
            let listener = TcpListener::bind(self.address).await.expect("rebinds");
            self.serving = Some(tokio::spawn(Self::serve(listener, self.upstream)));
        }
    }

    fn is_transient(error: &StoreError) -> bool {
        let StoreError::Database(cause) = error;
        cause.is_transient()
    }

    #[tokio::test]
    async fn with_the_server_away_operations_fail_transiently_write_nothing_and_recover_without_a_restart()
     {
        let test = TestDatabase::create().await;
        let server: url::Url = test.url().parse().expect("a URL");
        let upstream = tokio::net::lookup_host((
            server.host_str().expect("a host"),
            server.port().unwrap_or(5432),
        ))
        .await
        .expect("resolves")
        .next()
        .expect("an address");
        let mut proxy = Proxy::start(upstream).await;
        let mut through_proxy = server.clone();
        through_proxy
            .set_port(Some(proxy.address.port()))
            .expect("a port");
        let database = PgDatabase::connect(through_proxy.as_str(), PG_MIGRATIONS)
            .await
            .expect("opens");
        let store = PgPriceStore::new(database);
        store
            .set_price(change("MG-07", 1300, None))
            .await
            .expect("sets");

        proxy.cut().await;
        let message_id = Uuid::new_v4();
        let change_failed = store
            .set_price(change("MG-07", 9900, None))
            .await
            .expect_err("the server is away");
        let sales_failed = store
            .record_sales(message_id, lines(&[("MG-07", 2)]))
            .await
            .expect_err("the server is away");
        assert!(is_transient(&change_failed), "{change_failed}");
        assert!(is_transient(&sales_failed), "{sales_failed}");

        proxy.restore().await;
        let mug = store
            .get_price("MG-07")
            .await
            .expect("the pool reconnects")
            .expect("known");
        assert_eq!(
            (mug.price, mug.version, mug.units_sold),
            (Money(1300), 2, 0)
        );
        let versions: Vec<u64> = events_of(&store, "MG-07")
            .await
            .iter()
            .map(|event| event.version)
            .collect();
        assert_eq!(versions, [2], "the failed change enqueued nothing");
        let retried = store
            .record_sales(message_id, lines(&[("MG-07", 2)]))
            .await
            .expect("records");
        assert!(!retried.duplicate, "the failed attempt left no inbox row");
        assert_eq!(retried.units, 2);
    }
}
