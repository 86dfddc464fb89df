//! The whole service on PostgreSQL: orders placed, read, cancelled and published end to end; two
//! replicas on one database; and a server that is away at startup.

use futures::future::join_all;
use serde_json::Value;
use shared::events::PriceChanged;
use shared::money::Money;
use shared::testing::postgres::TestDatabase;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{assert_eventually, spawn_app_on, start_app_with};

async fn outbox_rows(pool: &PgPool, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(pool)
        .await
        .expect("counts")
}

#[tokio::test]
async fn on_postgresql_an_order_is_placed_replayed_read_cancelled_once_and_published() {
    let database = TestDatabase::create().await;
    let app = spawn_app_on(database.url()).await;
    app.given_price("BK-12", 39.90).await;
    let reservation = app.given_stock("BK-12").await;
    let key = Uuid::new_v4().to_string();

    let placed = app.post_order(&[("BK-12", 2)], Some(&key)).await;
    let replayed = app.post_order(&[("BK-12", 2)], Some(&key)).await;
    let reused = app.post_order(&[("BK-12", 3)], Some(&key)).await;

    assert_eq!(placed.status(), 201);
    assert_eq!(replayed.status(), 201);
    assert_eq!(reused.status(), 422);
    let placed: Value = placed.json().await.expect("order JSON");
    let replayed: Value = replayed.json().await.expect("order JSON");
    assert_eq!(
        replayed, placed,
        "a replay answers the first order as stored"
    );
    let id = placed["id"].as_str().expect("an id");
    let read: Value = app.get_order(id).await.json().await.expect("order JSON");
    assert_eq!(read, placed);
    let event = app.wait_for_event("order.placed", id).await;
    assert_eq!(event["lines"][0]["reservationId"], reservation.to_string());

    let first = app.cancel(id).await;
    let second = app.cancel(id).await;

    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let cancelled: Value = first.json().await.expect("order JSON");
    assert_eq!(cancelled["status"], "cancelled");
    app.wait_for_event("order.cancelled", id).await;
    let pool = PgPool::connect(database.url()).await.expect("connects");
    assert_eq!(outbox_rows(&pool, "order.placed").await, 1);
    assert_eq!(outbox_rows(&pool, "order.cancelled").await, 1);
    assert_eventually("the relay marks every row sent", || async {
        shared::outbox::postgres::pending(&pool)
            .await
            .is_ok_and(|n| n == 0)
    })
    .await;
    pool.close().await;
    app.teardown().await;
}

#[tokio::test]
async fn on_postgresql_price_changes_reach_the_cache_once_and_an_older_version_is_ignored() {
    let database = TestDatabase::create().await;
    let app = spawn_app_on(database.url()).await;
    let price = |sku: &str, cents, version| PriceChanged {
        sku: sku.to_owned(),
        price: Money(cents),
        currency: "EUR".to_owned(),
        version,
    };

    app.publish(&price("MG-07", 1200, 2)).await;
    assert_eventually("the newer price reaches the cache", || async {
        app.prices
            .get("MG-07")
            .is_some_and(|p| p.price == Money(1200))
    })
    .await;
    app.publish(&price("MG-07", 1000, 1)).await;
    // One queue, handled in order: once the marker is cached the older price was handled.
    app.publish(&price("TS-33", 500, 1)).await;
    assert_eventually("the marker reaches the cache", || async {
        app.prices.get("TS-33").is_some()
    })
    .await;

    assert_eq!(app.prices.get("MG-07").map(|p| p.price), Some(Money(1200)));
    let pool = PgPool::connect(database.url()).await.expect("connects");
    let (cents, version): (i64, i64) =
        sqlx::query_as("SELECT price_cents, version FROM cached_prices WHERE sku = 'MG-07'")
            .fetch_one(&pool)
            .await
            .expect("reads");
    assert_eq!((cents, version), (1200, 2));
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .expect("counts");
    assert_eq!(handled, 3);
    pool.close().await;
    app.teardown().await;
}

#[tokio::test]
async fn two_replicas_on_one_database_place_one_order_per_key_and_cancel_it_once() {
    let database = TestDatabase::create().await;
    let a = spawn_app_on(database.url()).await;
    let b = spawn_app_on(database.url()).await;
    for replica in [&a, &b] {
        replica.given_price("BK-12", 39.90).await;
        replica.given_stock("BK-12").await;
    }
    let key = Uuid::new_v4().to_string();

    let placements = join_all((0..10).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.post_order(&[("BK-12", 1)], Some(&key))
    }))
    .await;

    let mut ids = Vec::new();
    for response in placements {
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.expect("order JSON");
        ids.push(order["id"].as_str().expect("an id").to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one order for the key: {ids:?}");
    let reserved =
        a.inventory_calls("/reserve").await.len() + b.inventory_calls("/reserve").await.len();
    assert_eq!(reserved, 1, "reserved once across both replicas");

    let id = &ids[0];
    let (from_a, from_b) = tokio::join!(a.cancel(id), b.cancel(id));

    assert_eq!(from_a.status(), 200);
    assert_eq!(from_b.status(), 200);
    let pool = PgPool::connect(database.url()).await.expect("connects");
    assert_eq!(outbox_rows(&pool, "order.cancelled").await, 1);
    assert_eq!(outbox_rows(&pool, "order.placed").await, 1);
    pool.close().await;
    a.teardown().await;
    b.teardown().await;
}

#[tokio::test]
async fn with_the_database_server_unreachable_the_service_starts_unready_naming_it_and_answers_503()
{
    // Port 1 refuses connections on every machine.
    let app = start_app_with(|settings| {
        settings.database.url = "postgres://postgres@127.0.0.1:1/x".to_owned();
    })
    .await;

    assert_eventually("readiness names the database", || async {
        let (status, body) = app.readiness().await;
        status == 503
            && body["checks"]["database"]["ok"] == false
            && body["checks"]["database"]["detail"]
                .as_str()
                .is_some_and(|why| why.contains("not migrated yet"))
    })
    .await;
    let liveness = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(liveness.status(), 200);
    let read = app.get_order(&Uuid::new_v4().to_string()).await;
    let key = Uuid::new_v4().to_string();
    let placed = app.post_order(&[("BK-12", 1)], Some(&key)).await;

    for response in [read, placed] {
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
    }
    app.teardown().await;
}
