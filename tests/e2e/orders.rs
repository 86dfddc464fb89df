//! Orders through the gateway: placed and read back, refused on short stock, replayed by
//! idempotency key (sequentially and concurrently), cancelled with the stock coming back.

use std::collections::BTreeSet;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::assert_eventually;
use crate::helpers::spawn_stack;

#[tokio::test(flavor = "multi_thread")]
async fn an_order_placed_through_the_gateway_can_be_read_back() {
    let stack = spawn_stack().await;

    let response = stack.place_order(&[("BK-12", 2), ("MG-07", 1)]).await;

    assert_eq!(response.status(), 201);
    let location = response
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .map(str::to_owned)
        .expect("a Location header");
    let order: Value = response.json().await.expect("order JSON");
    let id = order["id"].as_str().expect("an id");
    assert_eq!(location, format!("/api/orders/{id}"));
    assert_eq!(order["status"], "placed");
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["total"], json!(92.3));
    let lines = order["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["sku"], "BK-12");
    assert_eq!(lines[0]["qty"], 2);
    assert_eq!(lines[0]["unitPrice"], json!(39.9));
    assert_eq!(lines[0]["lineTotal"], json!(79.8));
    assert_eq!(lines[0]["priceSource"], "live");
    assert_eq!(lines[1]["sku"], "MG-07");
    assert_eq!(lines[1]["unitPrice"], json!(12.5));

    let read_back = stack.get(&location).await;
    assert_eq!(read_back.status(), 200);
    assert_eq!(read_back.json::<Value>().await.expect("order JSON"), order);

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_for_more_than_the_stock_is_refused_and_leaves_the_stock_unchanged() {
    let stack = spawn_stack().await;
    let skus = ["BK-12", "HD-44", "MG-07"];
    let mut before = Vec::new();
    for sku in skus {
        before.push(stack.stock(sku).await);
    }

    // Three lines, the middle one short: inventory reserves the order's lines all or none, so
    // the lines that could be reserved never were, and there is nothing to release.
    let response = stack
        .place_order(&[("BK-12", 1), ("HD-44", 4), ("MG-07", 1)])
        .await;

    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["sku"], "HD-44");
    assert_eq!(problem["requested"], 4);
    assert_eq!(problem["available"], 3);
    // At once, not eventually: no reservation was made that a compensation would give back.
    for (sku, before) in skus.iter().zip(before) {
        assert_eq!(stack.stock(sku).await, before, "{sku}");
    }

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_replayed_with_the_same_idempotency_key_is_the_same_order_reserved_once() {
    let stack = spawn_stack().await;
    let key = uuid::Uuid::new_v4().to_string();
    let place = || {
        stack
            .order_request(&[("TS-33", 3)])
            .header("idempotency-key", &key)
            .send()
    };

    let first = place().await.expect("first POST");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("order JSON");
    let replay = place().await.expect("replayed POST");
    assert_eq!(replay.status(), 201);
    let replay: Value = replay.json().await.expect("order JSON");

    assert_eq!(replay, first);
    let stock = stack.stock("TS-33").await;
    assert_eq!(stock["available"], 22, "25 in stock, 3 taken once: {stock}");

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_posts_with_one_key_place_one_order_with_one_reservation_per_line() {
    let stack = spawn_stack().await;
    let key = uuid::Uuid::new_v4().to_string();

    let responses = join_all((0..50).map(|_| {
        stack
            .order_request(&[("BK-12", 1), ("ST-01", 10)])
            .header("idempotency-key", &key)
            .send()
    }))
    .await;

    let mut ids = BTreeSet::new();
    for response in responses {
        let response = response.expect("POST /api/orders");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(status, 201, "every concurrent POST gets the order: {body}");
        ids.insert(body["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    assert_eq!(stack.stock("BK-12").await["available"], 99);
    assert_eq!(stack.stock("ST-01").await["available"], 490);

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_order_eventually_returns_its_stock() {
    let stack = spawn_stack().await;
    let order = stack.placed(&[("MG-07", 5)]).await;
    let id = order["id"].as_str().expect("an id");
    assert_eq!(stack.stock("MG-07").await["available"], 45);

    let response = stack
        .client
        .post(format!("{}/api/orders/{id}/cancel", stack.gateway_url))
        .send()
        .await
        .expect("POST cancel");

    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.expect("order JSON");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(stack.order(id).await["status"], "cancelled");
    // Released asynchronously: order.cancelled reaches inventory through the broker.
    assert_eventually!(
        stack.stock("MG-07").await
            == json!({ "sku": "MG-07", "onHand": 50, "reserved": 0, "available": 50 }),
        "MG-07 is back to 50 on hand, none reserved: {}",
        stack.stock("MG-07").await
    );

    stack.teardown().await;
}
