//! Prices and sales counters: the repository trait, its request and answer types, and what both
//! backends share; one implementation per backend, [`sqlite::SqlitePriceStore`] (the embedded
//! default) and [`postgres::PgPriceStore`] (several replicas on one server).
//!
//! ```text
//!   set_price:    upsert price, version + 1 ─► outbox row (price.changed, that version) ─► COMMIT
//!   record_sales: inbox row per message ─► units per SKU, in SKU order ─► COMMIT
//! ```
//!
//! A price change and its `price.changed` outbox row are written in one transaction, so an event
//! is published exactly for the changes that were stored; each change of a SKU takes the next
//! version, which the event carries. Sales counters and the inbox rows of the events that feed
//! them are written in one transaction too, so each event counts once.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use shared::db::DatabaseError;
use shared::events::{EventLine, PriceChanged};
use shared::money::Money;
use uuid::Uuid;

use crate::domain::Price;

pub mod postgres;
pub mod sqlite;

pub use postgres::PgPriceStore;
pub use sqlite::SqlitePriceStore;

/// The SQLite schema, applied in order by [`shared::db::connect`].
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "prices",
        include_str!("../../migrations/sqlite/0001_prices.sql"),
    ),
    (
        2,
        "seed catalogue",
        include_str!("../../migrations/sqlite/0002_seed_catalogue.sql"),
    ),
    (3, "transactional outbox", shared::outbox::MIGRATION),
    (4, "consumer inbox", shared::inbox::MIGRATION),
    (
        5,
        "outbox trace context",
        shared::outbox::TRACE_CONTEXT_MIGRATION,
    ),
    (
        6,
        "price versions",
        include_str!("../../migrations/sqlite/0003_price_versions.sql"),
    ),
];

/// The PostgreSQL schema, applied in order by [`shared::pg::PgDatabase::start`] (once, whichever
/// replica gets there first). The outbox migration already has the trace context columns.
pub const PG_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "prices",
        include_str!("../../migrations/postgres/0001_prices.sql"),
    ),
    (
        2,
        "seed catalogue",
        include_str!("../../migrations/postgres/0002_seed_catalogue.sql"),
    ),
    (
        3,
        "transactional outbox",
        shared::outbox::postgres::MIGRATION,
    ),
    (4, "consumer inbox", shared::inbox::postgres::MIGRATION),
];

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (busy, away, I/O, corrupt row; writing the outbox row included).
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
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
    /// The stored price, with the version this change took.
    pub price: Price,
    /// Whether the SKU was new.
    pub created: bool,
}

/// The version of a SKU's first price: an insert takes it, and an update always takes at least
/// one more, so the version alone says whether a change created the SKU.
const FIRST_VERSION: u64 = 1;

impl PriceSet {
    /// What storing `price` did, told by its version.
    fn stored(price: Price) -> Self {
        Self {
            created: price.version == FIRST_VERSION,
            price,
        }
    }

    /// The `price.changed` event announcing this change.
    fn event(&self) -> PriceChanged {
        PriceChanged {
            sku: self.price.sku.clone(),
            price: self.price.price,
            currency: self.price.currency.clone(),
            version: self.price.version,
        }
    }
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
    /// Checks the database answers (readiness); the error says why not.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Every price, by SKU.
    fn list_prices(&self) -> BoxFuture<'_, Result<Vec<Price>, StoreError>>;
    /// One SKU's price, `None` if unknown.
    fn get_price<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<Price>, StoreError>>;
    /// Sets a price, taking the SKU's next version, and enqueues `price.changed` with that
    /// version in the same transaction.
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

/// A version as stored (a signed 64-bit column, `>= 1` by a check constraint).
fn stored_version(version: i64) -> Result<u64, sqlx::Error> {
    u64::try_from(version).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The units the orders whose messages are `fresh` (not yet in the inbox) add, per SKU, in SKU
/// order. Each backend adds them one SKU at a time in this order: a batch costs one statement
/// per SKU rather than per line, and two transactions adding to the same SKUs lock their rows in
/// the same order, so replicas sharing a PostgreSQL database never deadlock on them.
fn units_per_sku<'a>(
    orders: &'a [(Uuid, Vec<EventLine>)],
    fresh: &[bool],
) -> BTreeMap<&'a str, i64> {
    let mut units = BTreeMap::new();
    for ((_, lines), _) in orders.iter().zip(fresh).filter(|(_, fresh)| **fresh) {
        for line in lines {
            *units.entry(line.sku.as_str()).or_insert(0) += i64::from(line.qty);
        }
    }
    units
}

/// What recording each order did, given whether its message was fresh and which SKUs had a
/// counter to add to.
fn sales_recorded(
    orders: &[(Uuid, Vec<EventLine>)],
    fresh: &[bool],
    counted: &BTreeSet<&str>,
) -> Vec<SalesRecorded> {
    orders
        .iter()
        .zip(fresh)
        .map(|((_, lines), fresh)| {
            if !fresh {
                return SalesRecorded {
                    duplicate: true,
                    ..SalesRecorded::default()
                };
            }
            let mut recorded = SalesRecorded::default();
            for line in lines {
                if counted.contains(line.sku.as_str()) {
                    recorded.units += u64::from(line.qty);
                } else {
                    recorded.unknown_skus.push(line.sku.clone());
                }
            }
            recorded
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A store on either backend for tests, with a look at its outbox.

    use std::sync::Arc;

    use shared::db::Database;
    use shared::events::{EventLine, PriceChanged};
    use shared::money::Money;
    use shared::outbox::postgres::PgOutbox;
    use shared::outbox::{BacklogSize, OutboxStorage, SqliteOutbox};
    use shared::pg::PgDatabase;
    use shared::testing::postgres::TestDatabase;
    use uuid::Uuid;

    use super::{MIGRATIONS, PG_MIGRATIONS, PgPriceStore, PriceStore, SetPrice, SqlitePriceStore};

    /// Runs the contract test `$name(store: TestStore)` once per backend, as `$name::on_sqlite`
    /// and `$name::on_postgres`.
    macro_rules! on_both_backends {
        ($name:ident) => {
            mod $name {
                use crate::store::testing::TestStore;

                #[tokio::test]
                async fn on_sqlite() {
                    super::$name(TestStore::sqlite().await).await;
                }

                #[tokio::test]
                async fn on_postgres() {
                    super::$name(TestStore::postgres().await).await;
                }
            }
        };
    }
    pub(crate) use on_both_backends;

    /// A migrated store, empty but for the seeded catalogue.
    pub struct TestStore {
        pub store: Arc<dyn PriceStore>,
        outbox: Outbox,
        /// Dropped after the pools, with the test.
        _database: Option<TestDatabase>,
    }

    enum Outbox {
        Sqlite(Database),
        Postgres(PgDatabase),
    }

    impl TestStore {
        /// On an in-memory SQLite database.
        pub async fn sqlite() -> Self {
            let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
                .await
                .expect("the database opens");
            Self {
                store: Arc::new(SqlitePriceStore::new(database.clone())),
                outbox: Outbox::Sqlite(database),
                _database: None,
            }
        }

        /// On a PostgreSQL database of its own.
        pub async fn postgres() -> Self {
            let test = TestDatabase::create().await;
            let database = PgDatabase::connect(test.url(), PG_MIGRATIONS)
                .await
                .expect("the database opens");
            Self {
                store: Arc::new(PgPriceStore::new(database.clone())),
                outbox: Outbox::Postgres(database),
                _database: Some(test),
            }
        }

        /// The outbox backlog as the relay's gauges read it, through the backend's
        /// [`OutboxStorage`].
        pub async fn backlog(&self) -> BacklogSize {
            let storage: Box<dyn OutboxStorage> = match &self.outbox {
                Outbox::Sqlite(db) => Box::new(SqliteOutbox::new(db.clone())),
                Outbox::Postgres(db) => Box::new(PgOutbox::new(db.clone())),
            };
            storage.backlog().await.expect("reads the backlog")
        }

        /// The unsent `price.changed` events, in outbox order.
        pub async fn pending_events(&self) -> Vec<PriceChanged> {
            const UNSENT: &str = "SELECT data FROM outbox WHERE sent_at IS NULL ORDER BY id";
            let rows: Vec<String> = match &self.outbox {
                Outbox::Sqlite(db) => sqlx::query_scalar(UNSENT).fetch_all(db.pool()).await,
                Outbox::Postgres(db) => sqlx::query_scalar(UNSENT).fetch_all(db.pool()).await,
            }
            .expect("reads the outbox");
            rows.iter()
                .map(|data| serde_json::from_str(data).expect("a price.changed payload"))
                .collect()
        }
    }

    pub fn change(sku: &str, cents: i64, currency: Option<&str>) -> SetPrice {
        SetPrice {
            sku: sku.to_owned(),
            price: Money(cents),
            currency: currency.map(str::to_owned),
        }
    }

    pub fn lines(lines: &[(&str, u32)]) -> Vec<EventLine> {
        lines
            .iter()
            .map(|&(sku, qty)| EventLine {
                sku: sku.to_owned(),
                qty,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(100),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! The store's contract, on both backends.

    use super::testing::{TestStore, change, lines, on_both_backends};
    use super::*;

    async fn a_price_change_is_stored_with_its_outbox_row(store: TestStore) {
        let set = store
            .store
            .set_price(change("BK-12", 4200, None))
            .await
            .expect("sets");

        assert!(!set.created);
        assert_eq!(set.price.price, Money(4200));
        assert_eq!(set.price.name, "The Rust Book");
        let events = store.pending_events().await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].sku.as_str(), events[0].price),
            ("BK-12", Money(4200))
        );
        assert_eq!(
            store.backlog().await.pending,
            1,
            "the relay's gauge sees it"
        );
    }
    on_both_backends!(a_price_change_is_stored_with_its_outbox_row);

    async fn a_change_without_currency_keeps_the_current_one_and_a_new_sku_gets_eur(
        store: TestStore,
    ) {
        let store = store.store;
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
    on_both_backends!(a_change_without_currency_keeps_the_current_one_and_a_new_sku_gets_eur);

    async fn each_change_takes_the_next_version_which_its_event_carries(store: TestStore) {
        let first = store
            .store
            .set_price(change("ST-01", 300, None))
            .await
            .expect("sets");
        let second = store
            .store
            .set_price(change("ST-01", 350, Some("USD")))
            .await
            .expect("sets");
        let created = store
            .store
            .set_price(change("NEW-2", 100, None))
            .await
            .expect("sets");

        assert_eq!((first.price.version, second.price.version), (2, 3));
        assert_eq!(created.price.version, 1);
        let events = store.pending_events().await;
        let versions: Vec<(&str, u64)> =
            events.iter().map(|e| (e.sku.as_str(), e.version)).collect();
        assert_eq!(versions, [("ST-01", 2), ("ST-01", 3), ("NEW-2", 1)]);
        let stored = store.store.get_price("ST-01").await.expect("reads");
        assert_eq!(stored, Some(second.price));
    }
    on_both_backends!(each_change_takes_the_next_version_which_its_event_carries);

    async fn the_seeded_catalogue_is_listed_by_sku(store: TestStore) {
        let prices = store.store.list_prices().await.expect("lists");

        let listed: Vec<(&str, i64, u64)> = prices
            .iter()
            .map(|p| (p.sku.as_str(), p.price.cents(), p.version))
            .collect();
        assert_eq!(
            listed,
            [
                ("BK-12", 3990, 1),
                ("HD-44", 4900, 1),
                ("MG-07", 1250, 1),
                ("ST-01", 250, 1),
                ("TS-33", 1999, 1)
            ]
        );
        assert_eq!(store.store.get_price("NOPE-1").await.expect("reads"), None);
    }
    on_both_backends!(the_seeded_catalogue_is_listed_by_sku);

    async fn sales_are_counted_once_per_message_and_unknown_skus_are_reported(store: TestStore) {
        let store = store.store;
        let order = lines(&[("HD-44", 2), ("GONE-1", 1)]);
        let message_id = Uuid::new_v4();

        let first = store
            .record_sales(message_id, order.clone())
            .await
            .expect("records");
        let again = store
            .record_sales(message_id, order)
            .await
            .expect("records");

        assert_eq!(first.units, 2);
        assert_eq!(first.unknown_skus, ["GONE-1"]);
        assert!(again.duplicate);
        let hoodie = store.get_price("HD-44").await.expect("reads");
        assert_eq!(hoodie.map(|p| p.units_sold), Some(2));
    }
    on_both_backends!(sales_are_counted_once_per_message_and_unknown_skus_are_reported);

    async fn a_batch_of_orders_counts_each_once_in_one_transaction(store: TestStore) {
        let store = store.store;
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());

        let recorded = store
            .record_sales_batch(vec![
                (first, lines(&[("HD-44", 1)])),
                (second, lines(&[("HD-44", 2), ("TS-33", 1), ("HD-44", 1)])),
                (first, lines(&[("HD-44", 1)])),
            ])
            .await
            .expect("records");

        assert_eq!(recorded.len(), 3);
        assert_eq!((recorded[0].units, recorded[1].units), (1, 4));
        assert!(recorded[2].duplicate, "the same message ID counts once");
        let hoodie = store.get_price("HD-44").await.expect("reads");
        assert_eq!(hoodie.map(|p| p.units_sold), Some(4));
        let shirt = store.get_price("TS-33").await.expect("reads");
        assert_eq!(shirt.map(|p| p.units_sold), Some(1));
    }
    on_both_backends!(a_batch_of_orders_counts_each_once_in_one_transaction);
}
