//! The whole service on PostgreSQL: its endpoints and consumer end to end, two replicas on one
//! database, and a start while the server is away.

use futures::future::join_all;
use serde_json::Value;
use shared::events::{EventLine, OrderPlaced};
use shared::money::Money;
use shared::testing::postgres::TestDatabase;
use uuid::Uuid;

use crate::helpers::{assert_eventually, spawn_app_with, spawn_unready_app_with};

fn placed(sku: &str, qty: u32) -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::new_v4(),
        lines: vec![EventLine {
            sku: sku.to_owned(),
            qty,
            reservation_id: Uuid::new_v4(),
            unit_price: Money(100),
        }],
        total: Money(0),
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn on_postgresql_prices_are_served_changed_and_published_and_units_sold_are_counted_once() {
    let test = TestDatabase::create().await;
    let app = spawn_app_with(|settings| settings.database.url = test.url().to_owned()).await;

    assert_eq!(app.price("BK-12").await["price"], 39.9);
    let changed = app.put_price("MG-07", r#"{"price": 13.75}"#).await;
    assert_eq!(changed.status(), 200);
    let created = app
        .put_price("NEW-1", r#"{"price": 5, "currency": "USD"}"#)
        .await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/prices/NEW-1");
    let (_, first) = app.next_price_changed().await;
    let (_, second) = app.next_price_changed().await;
    assert_eq!(
        (first.sku.as_str(), first.price, first.version),
        ("MG-07", Money(1375), 2)
    );
    assert_eq!(
        (second.sku.as_str(), second.price, second.version),
        ("NEW-1", Money(500), 1)
    );
    let list: Vec<Value> = app.get("/prices").await.json().await.expect("JSON");
    assert_eq!(list.len(), 6);

    let message_id = Uuid::new_v4();
    let order = placed("HD-44", 2);
    app.publish(message_id, &order).await;
    app.publish(message_id, &order).await;
    app.publish(Uuid::new_v4(), &placed("ST-01", 1)).await;
    assert_eventually("the orders are counted", || async {
        app.price("HD-44").await["unitsSold"] == 2 && app.price("ST-01").await["unitsSold"] == 1
    })
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn two_replicas_on_one_database_publish_each_change_once_with_distinct_versions_and_count_each_order_once()
 {
    let test = TestDatabase::create().await;
    let app = spawn_app_with(|settings| settings.database.url = test.url().to_owned()).await;
    let replica = app.spawn_replica().await;
    const CHANGES: usize = 10;

    let puts = (0..CHANGES).map(|i| {
        let address = if i % 2 == 0 {
            app.address.clone()
        } else {
            replica.address.clone()
        };
        let request = app
            .client
            .put(format!("{address}/prices/TS-33"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"price": {}}}"#, 20 + i));
        async move { request.send().await.expect("PUT /prices").status() }
    });
    for status in join_all(puts).await {
        assert_eq!(status, 200);
    }
    let mut events = Vec::new();
    for _ in 0..CHANGES {
        events.push(app.next_price_changed().await.1);
    }
    let mut versions: Vec<u64> = events.iter().map(|event| event.version).collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=11).collect::<Vec<u64>>(),
        "each version once"
    );
    let stored: Value = app
        .client
        .get(format!("{}/prices/TS-33", replica.address))
        .send()
        .await
        .expect("GET /prices")
        .json()
        .await
        .expect("JSON");
    let latest = events
        .iter()
        .max_by_key(|event| event.version)
        .expect("changes were published");
    assert_eq!(stored["version"], 11);
    assert_eq!(
        serde_json::from_value::<Money>(stored["price"].clone()).ok(),
        Some(latest.price),
        "the stored price is the one with the highest version"
    );

    let redelivered = Uuid::new_v4();
    for _ in 0..20 {
        app.publish(Uuid::new_v4(), &placed("BK-12", 1)).await;
    }
    app.publish(redelivered, &placed("BK-12", 1)).await;
    app.publish(redelivered, &placed("BK-12", 1)).await;
    assert_eventually("every order is counted", || async {
        app.price("BK-12").await["unitsSold"] == 21
    })
    .await;
    replica.stop().await;
    app.teardown().await;
}

#[tokio::test]
async fn with_the_server_unreachable_the_service_starts_and_readyz_names_the_database_while_healthz_is_200()
 {
    // Port 1 refuses connections on every machine.
    let app = spawn_unready_app_with(|settings| {
        settings.database.url = "postgres://postgres@127.0.0.1:1/x".to_owned();
    })
    .await;

    assert_eventually("readiness names the unreachable database", || async {
        let response = app.get("/readyz").await;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        let database = &body["checks"]["database"];
        status == 503
            && database["ok"] == false
            && database["detail"]
                .as_str()
                .is_some_and(|why| why.contains("not migrated yet"))
    })
    .await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    let price = app.get_price("BK-12").await;
    assert_eq!(price.status(), 503);
    assert!(price.headers().contains_key("retry-after"));
    app.teardown().await;
}
