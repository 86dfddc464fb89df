//! The store's contract, run against both backends, and the rules that make PostgreSQL replicas
//! correct together, raced with two stores (two pools, as two replicas have) on one database.

use std::sync::Arc;

use shared::db::Database;
use shared::pg::PgDatabase;
use shared::testing::postgres::TestDatabase;
use sqlx::Row;

use super::*;
use crate::domain::{OrderLine, OrderStatus, PriceSource};

/// Defines the async test function `$name(store: TestStore)` as two tests, `$name::on_sqlite`
/// (in memory) and `$name::on_postgres` (a database of its own), so every contract test runs
/// against both backends without being written twice.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn on_sqlite() {
                super::$name(super::TestStore::sqlite().await).await;
            }

            #[tokio::test]
            async fn on_postgres() {
                let database = shared::testing::postgres::TestDatabase::create().await;
                super::$name(super::TestStore::postgres(&database).await).await;
            }
        }
    };
}

/// A repository and the database under it (to count what the contract does not expose).
struct TestStore {
    repo: Arc<dyn OrderRepository>,
    backend: TestBackend,
}

enum TestBackend {
    Sqlite(Database),
    Postgres(PgDatabase),
}

impl TestStore {
    async fn sqlite() -> Self {
        let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
            .await
            .expect("the database opens");
        Self {
            repo: Arc::new(SqliteOrderRepository::new(database.clone())),
            backend: TestBackend::Sqlite(database),
        }
    }

    /// A store on `database`; called twice on one database, two replicas.
    async fn postgres(database: &TestDatabase) -> Self {
        let database = PgDatabase::connect(database.url(), PG_MIGRATIONS)
            .await
            .expect("the database opens");
        Self {
            repo: Arc::new(PgOrderRepository::new(database.clone())),
            backend: TestBackend::Postgres(database),
        }
    }

    async fn count(&self, sql_sqlite: &str, sql_postgres: &str, value: &str) -> i64 {
        let row = match &self.backend {
            TestBackend::Sqlite(db) => sqlx::query(sql_sqlite)
                .bind(value)
                .fetch_one(db.pool())
                .await
                .map(|row| row.try_get::<i64, _>("n")),
            TestBackend::Postgres(db) => sqlx::query(sql_postgres)
                .bind(value)
                .fetch_one(db.pool())
                .await
                .map(|row| row.try_get::<i64, _>("n")),
        };
        row.expect("counts").expect("a count")
    }

    /// The PostgreSQL pool (for the replica tests, which run on PostgreSQL only).
    fn pg_pool(&self) -> &sqlx::PgPool {
        match &self.backend {
            TestBackend::Postgres(db) => db.pool(),
            TestBackend::Sqlite(_) => panic!("a PostgreSQL store was expected"),
        }
    }

    async fn outbox_rows(&self, event_type: &str) -> i64 {
        self.count(
            "SELECT COUNT(*) AS n FROM outbox WHERE event_type = ?1",
            "SELECT COUNT(*) AS n FROM outbox WHERE event_type = $1",
            event_type,
        )
        .await
    }

    async fn cached_price(&self, sku: &str) -> i64 {
        self.count(
            "SELECT price_cents AS n FROM cached_prices WHERE sku = ?1",
            "SELECT price_cents AS n FROM cached_prices WHERE sku = $1",
            sku,
        )
        .await
    }
}

fn order(id: Uuid) -> Order {
    let line = |sku: &str, qty, cents| OrderLine {
        sku: sku.to_owned(),
        qty,
        unit_price: Money(cents),
        price_source: PriceSource::Cache,
        reservation_id: Uuid::new_v4(),
    };
    Order::placed(
        id,
        vec![line("BK-12", 2, 3990), line("MG-07", 1, 1100)],
        "EUR".to_owned(),
        OffsetDateTime::now_utc(),
    )
    .expect("fits")
}

fn price_change(sku: &str, cents: i64, version: u64) -> PriceChange {
    PriceChange {
        message_id: Uuid::new_v4(),
        sku: sku.to_owned(),
        price: Money(cents),
        currency: "EUR".to_owned(),
        version,
    }
}

/// A claim made now is never stale with this cut-off.
const NOTHING_IS_STALE: i64 = 0;
/// Every claim made before the end of time is stale with this one.
const EVERYTHING_IS_STALE: i64 = i64::MAX;

on_both_backends!(only_the_first_claim_of_a_key_wins);
async fn only_the_first_claim_of_a_key_wins(store: TestStore) {
    let first = Uuid::new_v4();

    let won = store
        .repo
        .claim_key("key-1", "fp-a", first, NOTHING_IS_STALE)
        .await;
    let lost = store
        .repo
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

on_both_backends!(a_key_given_back_can_be_claimed_again);
async fn a_key_given_back_can_be_claimed_again(store: TestStore) {
    let first = Uuid::new_v4();
    store
        .repo
        .claim_key("key-1", "fp", first, NOTHING_IS_STALE)
        .await
        .expect("claims");

    store
        .repo
        .release_key("key-1", first)
        .await
        .expect("releases");
    let again = store
        .repo
        .claim_key("key-1", "fp", Uuid::new_v4(), NOTHING_IS_STALE)
        .await;

    assert_eq!(again.expect("claims"), KeyClaim::Claimed);
}

on_both_backends!(a_stale_claim_is_taken_over_only_if_its_order_was_never_stored);
async fn a_stale_claim_is_taken_over_only_if_its_order_was_never_stored(store: TestStore) {
    let crashed = Uuid::new_v4();
    let finished = Uuid::new_v4();
    store
        .repo
        .claim_key("crashed", "fp", crashed, NOTHING_IS_STALE)
        .await
        .expect("claims");
    store
        .repo
        .claim_key("finished", "fp", finished, NOTHING_IS_STALE)
        .await
        .expect("claims");
    store
        .repo
        .insert_placed(&order(finished))
        .await
        .expect("stores");

    let takeover = store
        .repo
        .claim_key("crashed", "fp", Uuid::new_v4(), EVERYTHING_IS_STALE)
        .await;
    let no_takeover = store
        .repo
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

on_both_backends!(a_stored_order_reads_back_unchanged_with_its_event_enqueued);
async fn a_stored_order_reads_back_unchanged_with_its_event_enqueued(store: TestStore) {
    let placed = order(Uuid::new_v4());

    store.repo.insert_placed(&placed).await.expect("stores");

    assert_eq!(
        store.repo.get(placed.id).await.expect("reads"),
        Some(placed)
    );
    assert_eq!(store.outbox_rows("order.placed").await, 1);
    assert_eq!(store.repo.get(Uuid::new_v4()).await.expect("reads"), None);
}

on_both_backends!(cancelling_twice_enqueues_order_cancelled_once);
async fn cancelling_twice_enqueues_order_cancelled_once(store: TestStore) {
    let placed = order(Uuid::new_v4());
    store.repo.insert_placed(&placed).await.expect("stores");

    let first = store.repo.cancel(placed.id).await.expect("cancels");
    let second = store.repo.cancel(placed.id).await.expect("cancels");

    let first = first.expect("the order exists");
    let second = second.expect("the order exists");
    assert!(first.newly_cancelled);
    assert!(!second.newly_cancelled);
    assert_eq!(first.order.status, OrderStatus::Cancelled);
    assert_eq!(second.order, first.order);
    assert_eq!(store.outbox_rows("order.cancelled").await, 1);
    assert_eq!(store.repo.cancel(Uuid::new_v4()).await.expect("runs"), None);
}

on_both_backends!(a_price_change_is_applied_once_however_often_it_is_delivered);
async fn a_price_change_is_applied_once_however_often_it_is_delivered(store: TestStore) {
    let change = price_change("BK-12", 3500, 1);

    let first = store
        .repo
        .apply_price_changes(std::slice::from_ref(&change))
        .await;
    let again = store
        .repo
        .apply_price_changes(&[change.clone(), change])
        .await;

    assert_eq!(first.expect("applies"), [PriceChangeOutcome::Applied]);
    assert_eq!(
        again.expect("applies"),
        [PriceChangeOutcome::Duplicate, PriceChangeOutcome::Duplicate]
    );
    assert_eq!(store.cached_price("BK-12").await, 3500);
}

on_both_backends!(an_older_price_version_never_overwrites_a_newer_one);
async fn an_older_price_version_never_overwrites_a_newer_one(store: TestStore) {
    let outcomes = store
        .repo
        .apply_price_changes(&[
            price_change("BK-12", 3000, 2),
            price_change("BK-12", 2000, 1),
            price_change("MG-07", 900, 5),
        ])
        .await;
    let later = store
        .repo
        .apply_price_changes(&[
            price_change("MG-07", 800, 4),
            price_change("BK-12", 3300, 3),
        ])
        .await;

    assert_eq!(
        outcomes.expect("applies"),
        [
            PriceChangeOutcome::Applied,
            PriceChangeOutcome::Superseded,
            PriceChangeOutcome::Applied,
        ]
    );
    assert_eq!(
        later.expect("applies"),
        [PriceChangeOutcome::Superseded, PriceChangeOutcome::Applied]
    );
    assert_eq!(store.cached_price("BK-12").await, 3300);
    assert_eq!(store.cached_price("MG-07").await, 900);
}

on_both_backends!(without_versions_the_last_price_change_wins);
async fn without_versions_the_last_price_change_wins(store: TestStore) {
    let outcomes = store
        .repo
        .apply_price_changes(&[
            price_change("BK-12", 3000, 0),
            price_change("BK-12", 2000, 0),
        ])
        .await;

    assert_eq!(
        outcomes.expect("applies"),
        [PriceChangeOutcome::Applied, PriceChangeOutcome::Applied]
    );
    assert_eq!(store.cached_price("BK-12").await, 2000);
}

on_both_backends!(the_database_answers_a_ping);
async fn the_database_answers_a_ping(store: TestStore) {
    store.repo.ping().await.expect("answers");
}

/// The cross-replica rules: two stores with pools of their own on one database, racing.
mod replicas {
    use futures::future::join_all;

    use super::*;

    /// How many times each race is run at once: enough to interleave the two pools' statements
    /// in every order on two cores, few enough to stay well under a second.
    const RACERS: usize = 50;

    async fn two_replicas() -> (TestDatabase, TestStore, TestStore) {
        let database = TestDatabase::create().await;
        let a = TestStore::postgres(&database).await;
        let b = TestStore::postgres(&database).await;
        (database, a, b)
    }

    fn replica(i: usize, a: &TestStore, b: &TestStore) -> Arc<dyn OrderRepository> {
        if i.is_multiple_of(2) {
            a.repo.clone()
        } else {
            b.repo.clone()
        }
    }

    #[tokio::test]
    async fn the_same_idempotency_key_claimed_from_two_replicas_at_once_names_one_order() {
        let (_database, a, b) = two_replicas().await;

        let claims = join_all((0..RACERS).map(|i| {
            let repo = replica(i, &a, &b);
            let order_id = Uuid::new_v4();
            tokio::spawn(async move {
                let claim = repo
                    .claim_key("shared-key", "fp", order_id, NOTHING_IS_STALE)
                    .await
                    .expect("claims");
                (order_id, claim)
            })
        }))
        .await;

        let claims: Vec<_> = claims.into_iter().map(|c| c.expect("runs")).collect();
        let winners: Vec<Uuid> = claims
            .iter()
            .filter(|(_, claim)| *claim == KeyClaim::Claimed)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(winners.len(), 1, "{claims:?}");
        for (_, claim) in &claims {
            if let KeyClaim::Held { order_id, .. } = claim {
                assert_eq!(
                    *order_id, winners[0],
                    "every loser is told the winner's order"
                );
            }
        }
    }

    #[tokio::test]
    async fn two_replicas_cancelling_one_order_at_once_enqueue_order_cancelled_once() {
        let (_database, a, b) = two_replicas().await;
        let placed = order(Uuid::new_v4());
        a.repo.insert_placed(&placed).await.expect("stores");

        let cancellations = join_all((0..RACERS).map(|i| {
            let repo = replica(i, &a, &b);
            tokio::spawn(async move { repo.cancel(placed.id).await.expect("cancels") })
        }))
        .await;

        let newly = cancellations
            .into_iter()
            .map(|c| c.expect("runs").expect("the order exists"))
            .inspect(|c| assert_eq!(c.order.status, OrderStatus::Cancelled))
            .filter(|c| c.newly_cancelled)
            .count();
        assert_eq!(newly, 1);
        assert_eq!(a.outbox_rows("order.cancelled").await, 1);
    }

    #[tokio::test]
    async fn the_same_price_change_delivered_to_two_replicas_at_once_is_applied_once() {
        let (_database, a, b) = two_replicas().await;
        let change = price_change("BK-12", 3500, 7);

        let outcomes = join_all((0..RACERS).map(|i| {
            let repo = replica(i, &a, &b);
            let change = change.clone();
            tokio::spawn(async move { repo.apply_price_changes(&[change]).await.expect("applies") })
        }))
        .await;

        let outcomes: Vec<_> = outcomes
            .into_iter()
            .flat_map(|o| o.expect("runs"))
            .collect();
        let applied = outcomes
            .iter()
            .filter(|o| **o == PriceChangeOutcome::Applied)
            .count();
        assert_eq!(applied, 1, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| matches!(
            o,
            PriceChangeOutcome::Applied | PriceChangeOutcome::Duplicate
        )));
        let inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE message_id = $1")
            .bind(change.message_id.to_string())
            .fetch_one(b.pg_pool())
            .await
            .expect("counts");
        assert_eq!(inbox, 1);
    }

    #[tokio::test]
    async fn price_versions_applied_out_of_order_by_two_replicas_leave_the_newest_price() {
        let (_database, a, b) = two_replicas().await;
        // Versions 1..=RACERS in a scrambled order, split over the two replicas.
        let mut versions: Vec<u64> = (1..=RACERS as u64).collect();
        versions.reverse();
        versions.rotate_left(RACERS / 3);

        let outcomes = join_all(versions.iter().enumerate().map(|(i, &version)| {
            let repo = replica(i, &a, &b);
            let change = price_change("BK-12", 1000 + stored_version(version), version);
            tokio::spawn(async move {
                let outcome = repo.apply_price_changes(&[change]).await.expect("applies");
                (version, outcome[0])
            })
        }))
        .await;

        assert_eq!(a.cached_price("BK-12").await, 1000 + RACERS as i64);
        let outcomes: Vec<_> = outcomes.into_iter().map(|o| o.expect("runs")).collect();
        assert!(
            outcomes.contains(&(RACERS as u64, PriceChangeOutcome::Applied)),
            "the newest version is applied: {outcomes:?}"
        );
        let stored_version: i64 =
            sqlx::query_scalar("SELECT version FROM cached_prices WHERE sku = 'BK-12'")
                .fetch_one(b.pg_pool())
                .await
                .expect("reads");
        assert_eq!(stored_version, RACERS as i64);
    }

    #[tokio::test]
    async fn orders_placed_from_two_replicas_at_once_each_commit_with_their_event() {
        let (_database, a, b) = two_replicas().await;
        let orders: Vec<Order> = (0..RACERS).map(|_| order(Uuid::new_v4())).collect();

        let stored = join_all(orders.iter().enumerate().map(|(i, placed)| {
            let repo = replica(i, &a, &b);
            let placed = placed.clone();
            tokio::spawn(async move { repo.insert_placed(&placed).await })
        }))
        .await;

        for result in stored {
            result.expect("runs").expect("stores");
        }
        assert_eq!(a.outbox_rows("order.placed").await, RACERS as i64);
        for placed in &orders {
            assert_eq!(
                b.repo.get(placed.id).await.expect("reads").as_ref(),
                Some(placed)
            );
        }
    }

    #[tokio::test]
    async fn a_store_whose_database_is_not_migrated_yet_fails_transiently() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        // Port 1 refuses connections on every machine.
        let database = PgDatabase::start(
            "postgres://postgres@127.0.0.1:1/x",
            PG_MIGRATIONS,
            shutdown.clone(),
        )
        .expect("a valid URL");
        let repo = PgOrderRepository::new(database);

        let read = repo.get(Uuid::new_v4()).await.expect_err("no server");
        let claim = repo
            .claim_key("k", "fp", Uuid::new_v4(), NOTHING_IS_STALE)
            .await
            .expect_err("no server");
        let applied = repo
            .apply_price_changes(&[price_change("BK-12", 1, 1)])
            .await
            .expect_err("no server");

        for error in [read, claim, applied] {
            assert!(error.is_transient(), "{error}");
        }
        assert!(repo.ping().await.is_err());
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_store_whose_connections_are_killed_fails_transiently_and_recovers_without_a_restart()
    {
        let (database, a, _b) = two_replicas().await;
        let placed = order(Uuid::new_v4());
        a.repo.insert_placed(&placed).await.expect("stores");
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(database.url())
            .await
            .expect("connects");

        // As a server restart does: every session of the store's pool ends.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&mut admin)
        .await
        .expect("terminates");
        let mut failures = Vec::new();
        let mut recovered = None;
        for _ in 0..20 {
            match a.repo.get(placed.id).await {
                Ok(order) => {
                    recovered = order;
                    break;
                }
                Err(error) => failures.push(error),
            }
        }

        assert!(
            failures.iter().all(StoreError::is_transient),
            "{failures:?}"
        );
        assert_eq!(recovered.as_ref(), Some(&placed));
    }
}
