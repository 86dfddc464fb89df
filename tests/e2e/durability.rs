//! Nothing acknowledged is lost: state survives restarts of every service (SQLite files), an event
//! committed but not yet published goes out after a restart, and orders accepted while the broker
//! is away are delivered once it returns — each applied exactly once.

use serde_json::{Value, json};

use crate::assert_eventually;
use crate::helpers::{Service, StackBuilder, TestStack, placed_events_applied, spawn_stack};

/// Everything a client or operator can see of the stack's state.
async fn snapshot(stack: &TestStack, order_ids: &[&str]) -> Value {
    let mut orders = Vec::new();
    for id in order_ids {
        orders.push(stack.order(id).await);
    }
    let stock: Value = stack
        .client
        .get(format!("{}/stock", stack.url_of(Service::Inventory)))
        .send()
        .await
        .expect("GET /stock")
        .json()
        .await
        .expect("stock JSON");
    let prices: Value = stack
        .get("/api/prices/HD-44")
        .await
        .json()
        .await
        .expect("price JSON");
    let all_prices: Value = stack
        .client
        .get(format!("{}/prices", stack.url_of(Service::Pricing)))
        .send()
        .await
        .expect("GET /prices")
        .json()
        .await
        .expect("prices JSON");
    json!({ "orders": orders, "stock": stock, "price": prices, "prices": all_prices })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_order_reservation_and_price_is_as_before_after_every_service_restarts() {
    let mut stack = StackBuilder::new().durable().spawn().await;
    let kept = stack.placed(&[("BK-12", 2), ("MG-07", 1)]).await;
    let cancelled = stack.placed(&[("TS-33", 1)]).await;
    let kept = kept["id"].as_str().expect("an id");
    let cancelled = cancelled["id"].as_str().expect("an id");
    let response = stack
        .client
        .post(format!(
            "{}/api/orders/{cancelled}/cancel",
            stack.gateway_url
        ))
        .send()
        .await
        .expect("POST cancel");
    assert_eq!(response.status(), 200);
    let response = stack
        .price_change("HD-44", 55.0)
        .send()
        .await
        .expect("PUT price");
    assert_eq!(response.status(), 200);
    // A reservation no order has committed yet: it must survive as a reservation.
    let held: Value = stack
        .client
        .post(format!("{}/reserve", stack.url_of(Service::Inventory)))
        .json(&json!({ "sku": "ST-01", "qty": 7 }))
        .send()
        .await
        .expect("POST /reserve")
        .json()
        .await
        .expect("reservation JSON");
    let held_id = held["reservationId"].as_str().expect("a reservation id");

    // Quiet first: every event applied, so the snapshot cannot change by itself.
    assert_eventually!(
        stack.stock("BK-12").await["onHand"] == 98
            && stack.stock("MG-07").await["onHand"] == 49
            && stack.stock("TS-33").await
                == json!({ "sku": "TS-33", "onHand": 25, "reserved": 0, "available": 25 })
            && stack.price("BK-12").await["unitsSold"] == 2
            && stack.price("TS-33").await["unitsSold"] == 1,
        "every event of the orders is applied"
    );
    let before = snapshot(&stack, &[kept, cancelled]).await;
    assert_eq!(before["price"]["price"], json!(55.0));
    assert_eq!(before["orders"][1]["status"], "cancelled");

    stack.stop_all().await;
    stack.restart_all().await;

    let after = snapshot(&stack, &[kept, cancelled]).await;
    assert_eq!(after, before);
    assert_eq!(stack.stock("ST-01").await["reserved"], 7);
    let released = stack
        .client
        .post(format!("{}/release", stack.url_of(Service::Inventory)))
        .json(&json!({ "reservationId": held_id }))
        .send()
        .await
        .expect("POST /release");
    assert_eq!(
        released.status(),
        200,
        "the held reservation is still known"
    );
    assert_eq!(stack.stock("ST-01").await["available"], 500);

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_committed_but_not_published_before_a_stop_are_published_after_the_restart() {
    let mut stack = StackBuilder::new().durable().spawn().await;
    stack.broker_link(Service::Order).sever().await;
    assert_eventually!(
        !stack.is_ready(Service::Order).await,
        "order-service notices it lost the broker"
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        let order = stack.placed(&[("BK-12", 1)]).await;
        ids.push(order["id"].as_str().expect("an id").to_owned());
    }
    // Stored with their outbox rows, but not published: nothing is committed at inventory.
    assert_eq!(
        stack.stock("BK-12").await,
        json!({ "sku": "BK-12", "onHand": 100, "reserved": 3, "available": 97 })
    );

    stack.stop(Service::Order).await;
    stack.broker_link(Service::Order).restore().await;
    stack.restart(Service::Order).await;

    assert_eventually!(
        stack.stock("BK-12").await
            == json!({ "sku": "BK-12", "onHand": 97, "reserved": 0, "available": 97 }),
        "the restarted relay publishes and inventory commits: {}",
        stack.stock("BK-12").await
    );
    assert_eventually!(
        stack.price("BK-12").await["unitsSold"] == 3,
        "pricing counts each order once: {}",
        stack.price("BK-12").await
    );
    assert_eventually!(
        ids.iter().all(|id| placed_events_applied(id) >= 1),
        "inventory logged every commit"
    );
    let applied: Vec<usize> = ids.iter().map(|id| placed_events_applied(id)).collect();
    assert_eq!(applied, vec![1; 3], "each order committed exactly once");

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_accepted_while_the_broker_is_away_are_delivered_once_it_returns() {
    let stack = spawn_stack().await;
    for svc in Service::WITH_BROKER {
        stack.broker_link(svc).sever().await;
    }
    assert_eventually!(
        !stack.is_ready(Service::Order).await
            && !stack.is_ready(Service::Inventory).await
            && !stack.is_ready(Service::Pricing).await,
        "no service with a broker connection is ready"
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        let order = stack.placed(&[("MG-07", 2)]).await;
        ids.push(order["id"].as_str().expect("an id").to_owned());
    }

    for svc in Service::WITH_BROKER {
        stack.broker_link(svc).restore().await;
    }
    assert_eventually!(
        stack.stock("MG-07").await
            == json!({ "sku": "MG-07", "onHand": 44, "reserved": 0, "available": 44 }),
        "every order is committed once the broker is back: {}",
        stack.stock("MG-07").await
    );
    assert_eventually!(
        stack.price("MG-07").await["unitsSold"] == 6,
        "pricing counts every order: {}",
        stack.price("MG-07").await
    );
    assert_eventually!(
        ids.iter().all(|id| placed_events_applied(id) >= 1),
        "inventory logged every commit"
    );
    let applied: Vec<usize> = ids.iter().map(|id| placed_events_applied(id)).collect();
    assert_eq!(applied, vec![1; 3], "each order committed exactly once");

    stack.teardown().await;
}
