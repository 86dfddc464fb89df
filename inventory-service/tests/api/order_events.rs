//! `order.placed` and `order.cancelled`, published through the real broker.

use serde_json::json;
use shared::events::{EventLine, OrderCancelled, OrderPlaced};
use shared::money::Money;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_eventually, spawn_app, spawn_app_with};

/// One delivery at a time, so messages on the queue are handled in publishing order and a later
/// "marker" message taking effect proves that the ones before it were handled.
async fn spawn_sequential_app() -> TestApp {
    spawn_app_with(|settings| settings.messaging.prefetch = 1).await
}

/// Publishes an order for a fresh reservation of a sticker pack and waits until it is committed:
/// every message published before it has then been handled.
async fn publish_marker(app: &TestApp) {
    let before = app.stock("ST-01").await["onHand"].as_i64().expect("onHand");
    let marker = reserve_line(app, "ST-01", 1).await;
    app.publish(Uuid::new_v4(), &placed(Uuid::new_v4(), vec![marker]))
        .await;
    assert_eventually("the marker order is committed", || async {
        app.stock("ST-01").await["onHand"] == before - 1
    })
    .await;
}

async fn reserve_line(app: &TestApp, sku: &str, qty: u32) -> EventLine {
    let reservation = app.reserved(sku, qty).await;
    EventLine {
        sku: sku.to_owned(),
        qty,
        reservation_id: Uuid::parse_str(reservation["reservationId"].as_str().expect("id"))
            .expect("uuid"),
        unit_price: Money(100),
    }
}

fn placed(order_id: Uuid, lines: Vec<EventLine>) -> OrderPlaced {
    OrderPlaced {
        order_id,
        lines,
        total: Money(0),
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn order_placed_commits_the_reservation_once_even_when_delivered_twice() {
    let app = spawn_sequential_app().await;
    let line = reserve_line(&app, "BK-12", 2).await;
    let event = placed(Uuid::new_v4(), vec![line]);
    let message_id = Uuid::new_v4();

    app.publish(message_id, &event).await;
    app.publish(message_id, &event).await;
    publish_marker(&app).await;

    assert_eq!(
        app.stock("BK-12").await,
        json!({"sku": "BK-12", "onHand": 98, "reserved": 0, "available": 98})
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_second_message_with_a_handled_message_id_has_no_effect_at_all() {
    let app = spawn_sequential_app().await;
    let first = reserve_line(&app, "BK-12", 1).await;
    let second = reserve_line(&app, "MG-07", 1).await;
    let message_id = Uuid::new_v4();

    // The same ID on a different payload: only the inbox can tell it was handled already.
    app.publish(message_id, &placed(Uuid::new_v4(), vec![first]))
        .await;
    app.publish(message_id, &placed(Uuid::new_v4(), vec![second]))
        .await;
    publish_marker(&app).await;

    assert_eq!(app.stock("BK-12").await["onHand"], 99);
    assert_eq!(
        app.stock("MG-07").await,
        json!({"sku": "MG-07", "onHand": 50, "reserved": 1, "available": 49})
    );
    app.teardown().await;
}

#[tokio::test]
async fn order_cancelled_returns_the_units_of_a_committed_order() {
    let app = spawn_app().await;
    let line = reserve_line(&app, "MG-07", 5).await;
    let order_id = Uuid::new_v4();
    app.publish(Uuid::new_v4(), &placed(order_id, vec![line.clone()]))
        .await;
    assert_eventually("the order is committed", || async {
        app.stock("MG-07").await["onHand"] == 45
    })
    .await;

    app.publish(
        Uuid::new_v4(),
        &OrderCancelled {
            order_id,
            lines: vec![line],
        },
    )
    .await;

    assert_eventually("the units are back", || async {
        app.stock("MG-07").await
            == json!({"sku": "MG-07", "onHand": 50, "reserved": 0, "available": 50})
    })
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn order_cancelled_releases_a_reservation_not_yet_committed() {
    let app = spawn_app().await;
    let line = reserve_line(&app, "TS-33", 3).await;

    app.publish(
        Uuid::new_v4(),
        &OrderCancelled {
            order_id: Uuid::new_v4(),
            lines: vec![line],
        },
    )
    .await;

    assert_eventually("the reservation is released", || async {
        app.stock("TS-33").await
            == json!({"sku": "TS-33", "onHand": 25, "reserved": 0, "available": 25})
    })
    .await;
    app.teardown().await;
}
