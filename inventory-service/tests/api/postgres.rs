//! The whole service on PostgreSQL: its endpoints and consumer end to end, two replicas sharing
//! one database, and a database server that cannot be reached.

use std::time::Duration;

use serde_json::{Value, json};
use shared::events::{EventLine, OrderPlaced};
use shared::money::Money;
use shared::testing::postgres::TestDatabase;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_eventually, spawn_app_on, spawn_app_with, start_app_with};

fn order_placed(reservation: &Value) -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::new_v4(),
        lines: vec![EventLine {
            sku: reservation["sku"].as_str().expect("sku").to_owned(),
            qty: u32::try_from(reservation["reserved"].as_u64().expect("qty")).expect("small"),
            reservation_id: Uuid::parse_str(reservation["reservationId"].as_str().expect("id"))
                .expect("uuid"),
            unit_price: Money(100),
        }],
        total: Money(0),
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn on_postgresql_stock_reservations_releases_and_order_events_work_end_to_end() {
    let database = TestDatabase::create().await;
    let app = spawn_app_on(database.url()).await;

    // The seeded catalogue.
    assert_eq!(
        app.stock("HD-44").await,
        json!({"sku": "HD-44", "onHand": 3, "reserved": 0, "available": 3})
    );
    // A restock of a new SKU.
    let restocked = app
        .client
        .put(format!("{}/stock/PG-1", app.address))
        .json(&json!({"onHand": 10}))
        .send()
        .await
        .expect("PUT /stock");
    assert_eq!(restocked.status(), 200);

    // A keyed reservation and its replay.
    let first: Value = app
        .reserve("PG-1", 4, Some("order-1:PG-1"))
        .await
        .json()
        .await
        .expect("JSON");
    let replay: Value = app
        .reserve("PG-1", 4, Some("order-1:PG-1"))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(replay, first);
    assert_eq!(first["remaining"], 6);
    assert_eq!(app.reserve("PG-1", 7, None).await.status(), 409);

    // order.placed commits it, once although delivered twice.
    let placed = order_placed(&first);
    let message_id = Uuid::new_v4();
    app.publish(message_id, &placed).await;
    app.publish(message_id, &placed).await;
    assert_eventually("the order is committed", || async {
        app.stock("PG-1").await
            == json!({"sku": "PG-1", "onHand": 6, "reserved": 0, "available": 6})
    })
    .await;

    // A release gives units back; a committed reservation cannot be released.
    let released = app.reserved("PG-1", 2).await;
    let answer = app
        .release(released["reservationId"].as_str().expect("id"))
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(app.stock("PG-1").await["reserved"], 0);
    let refused = app
        .release(first["reservationId"].as_str().expect("id"))
        .await;
    assert_eq!(refused.status(), 409);
    app.teardown().await;
}

#[tokio::test]
async fn on_postgresql_an_uncommitted_reservation_expires_and_its_units_come_back() {
    let database = TestDatabase::create().await;
    let app = spawn_app_with(|settings| {
        settings.database.url = database.url().to_owned();
        settings.reservation_ttl = Duration::from_secs(2);
        settings.sweep_interval = Duration::from_millis(50);
    })
    .await;

    app.reserved("TS-33", 5).await;
    assert_eq!(app.stock("TS-33").await["reserved"], 5);

    assert_eventually("the sweeper gives the units back", || async {
        app.stock("TS-33").await["reserved"] == 0
    })
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn two_replicas_on_one_database_and_one_queue_sell_the_last_units_once_agree_on_a_key_and_commit_each_order_once()
 {
    let database = TestDatabase::create().await;
    let namespace = format!("t-{}", Uuid::new_v4());
    let replica = |namespace: String| {
        let url = database.url().to_owned();
        spawn_app_with(move |settings| {
            settings.database.url = url;
            // One queue for both: their consumers compete, as replicas' do.
            settings.messaging.namespace = namespace;
        })
    };
    let a = replica(namespace.clone()).await;
    let b = replica(namespace).await;

    let answers = futures::future::join_all((0..8).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move {
            let response = app.reserve("HD-44", 1, None).await;
            let status = response.status();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    }))
    .await;
    let taken: Vec<Value> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body.clone())
        .collect();
    assert_eq!(taken.len(), 3, "the three hoodies, once each: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, _)| *status == 200 || *status == 409)
    );

    let keyed = futures::future::join_all([&a, &b, &a, &b].into_iter().map(|app| async move {
        let body: Value = app
            .reserve("BK-12", 2, Some("order-9:BK-12"))
            .await
            .json()
            .await
            .expect("JSON");
        body["reservationId"].clone()
    }))
    .await;
    assert!(keyed.iter().all(|id| *id == keyed[0]), "{keyed:?}");
    assert_eq!(b.stock("BK-12").await["reserved"], 2);

    // Each order published twice under one message ID: the replicas' consumers compete for the
    // deliveries, and each order is committed once.
    for reservation in &taken {
        let placed = order_placed(reservation);
        let message_id = Uuid::new_v4();
        a.publish(message_id, &placed).await;
        a.publish(message_id, &placed).await;
    }
    assert_eventually("the three orders are committed", || async {
        b.stock("HD-44").await
            == json!({"sku": "HD-44", "onHand": 0, "reserved": 0, "available": 0})
    })
    .await;
    // Both read the same state, whichever replica wrote it.
    assert_eq!(a.stock("HD-44").await, b.stock("HD-44").await);
    teardown_all([a, b]).await;
}

async fn teardown_all(apps: [TestApp; 2]) {
    for app in apps {
        app.teardown().await;
    }
}

#[tokio::test]
async fn with_its_database_unreachable_the_service_starts_is_not_ready_naming_the_database_and_answers_503()
 {
    // Port 1 refuses connections on every machine.
    let app = start_app_with(|settings| {
        settings.database.url = "postgres://postgres@127.0.0.1:1/x".to_owned();
    })
    .await;

    let health = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);

    let readiness = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .expect("GET /readyz");
    assert_eq!(readiness.status(), 503);
    let report: Value = readiness.json().await.expect("JSON");
    assert_eq!(report["checks"]["database"]["ok"], false, "{report}");
    assert!(
        report["checks"]["database"]["detail"]
            .as_str()
            .is_some_and(|why| why.contains("not migrated yet")),
        "{report}"
    );

    let refused = app.reserve("BK-12", 1, None).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    app.teardown().await;
}
