//! Placing and reading orders.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{order_body, spawn_app};

#[tokio::test]
async fn placing_an_order_answers_201_with_priced_lines_a_total_and_its_location() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_price("MG-07", 12.50).await;
    let book = app.given_stock("BK-12").await;
    let mug = app.given_stock("MG-07").await;

    let response = app
        .post_order_raw(
            order_body(&[("BK-12", 2), ("MG-07", 1)]),
            &[("x-correlation-id", "test-place-order-1")],
        )
        .await;

    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let order: Value = response.json().await.expect("order JSON");
    let id = order["id"].as_str().expect("an id");
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["status"], "placed");
    assert_eq!(order["total"], json!(92.3));
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["pricedFromCache"], false);
    assert!(order["createdAt"].is_string());
    assert_eq!(
        order["lines"],
        json!([
            { "sku": "BK-12", "qty": 2, "unitPrice": 39.9, "lineTotal": 79.8,
              "priceSource": "live", "reservationId": book },
            { "sku": "MG-07", "qty": 1, "unitPrice": 12.5, "lineTotal": 12.5,
              "priceSource": "live", "reservationId": mug },
        ])
    );

    let reserves = app.inventory_calls("/reserve").await;
    assert_eq!(reserves.len(), 1, "one reserve call for the whole order");
    let (request, body) = &reserves[0];
    assert_eq!(body["orderId"], id);
    assert_eq!(
        body["items"],
        json!([{ "sku": "BK-12", "qty": 2 }, { "sku": "MG-07", "qty": 1 }])
    );
    // Inventory keys each line `<key>:<sku>`: `order_id:sku`, as when lines were reserved singly.
    assert_eq!(request.headers["idempotency-key"], id);
    assert_eq!(request.headers["x-correlation-id"], "test-place-order-1");
    app.teardown().await;
}

#[tokio::test]
async fn a_three_line_order_is_reserved_in_exactly_one_request() {
    let app = spawn_app().await;
    let mut reservations = Vec::new();
    for (sku, price) in [("BK-12", 39.90), ("MG-07", 12.50), ("ST-01", 3.20)] {
        app.given_price(sku, price).await;
        reservations.push(app.given_stock(sku).await);
    }

    let order = app
        .placed(&[("BK-12", 1), ("MG-07", 2), ("ST-01", 3)])
        .await;

    let reserves = app.inventory_calls("/reserve").await;
    assert_eq!(reserves.len(), 1, "{reserves:?}");
    let lines: Vec<Value> = order["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|line| line["reservationId"].clone())
        .collect();
    assert_eq!(lines, json!(reservations).as_array().expect("ids").clone());
    app.teardown().await;
}

#[tokio::test]
async fn a_placed_order_is_published_as_order_placed() {
    let app = spawn_app().await;
    app.given_price("ST-01", 2.50).await;
    let reservation = app.given_stock("ST-01").await;

    let order = app.placed(&[("ST-01", 4)]).await;
    let id = order["id"].as_str().expect("an id");

    let event = app.wait_for_event("order.placed", id).await;
    assert_eq!(event["total"], json!(10.0));
    assert_eq!(event["currency"], "EUR");
    assert_eq!(
        event["lines"],
        json!([{ "sku": "ST-01", "qty": 4, "reservationId": reservation, "unitPrice": 2.5 }])
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_placed_order_can_be_read_back() {
    let app = spawn_app().await;
    app.given_price("TS-33", 19.99).await;
    app.given_stock("TS-33").await;
    let order = app.placed(&[("TS-33", 3)]).await;

    let response = app.get_order(order["id"].as_str().expect("an id")).await;

    assert_eq!(response.status(), 200);
    let read: Value = response.json().await.expect("order JSON");
    assert_eq!(read, order);
    assert_eq!(read["total"], json!(59.97));
    app.teardown().await;
}

#[tokio::test]
async fn an_unknown_or_malformed_order_id_is_404() {
    let app = spawn_app().await;

    for id in [Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let response = app.get_order(&id).await;
        assert_eq!(response.status(), 404, "GET /orders/{id}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    app.teardown().await;
}

#[tokio::test]
async fn duplicate_skus_in_one_order_are_merged_into_one_line() {
    let app = spawn_app().await;
    app.given_price("MG-07", 12.50).await;
    app.given_stock("MG-07").await;

    let order = app.placed(&[("MG-07", 1), ("MG-07", 2)]).await;

    assert_eq!(order["lines"].as_array().expect("lines").len(), 1);
    assert_eq!(order["lines"][0]["qty"], 3);
    let reserves = app.inventory_calls("/reserve").await;
    assert_eq!(reserves.len(), 1);
    assert_eq!(
        reserves[0].1["items"],
        json!([{ "sku": "MG-07", "qty": 3 }])
    );
    app.teardown().await;
}

#[tokio::test]
async fn short_stock_on_one_line_is_409_naming_it_and_releases_nothing_as_nothing_was_reserved() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_price("HD-44", 49.00).await;
    app.given_stock("BK-12").await;
    app.given_short_stock("HD-44", 3).await;
    app.given_releases_succeed().await;

    let response = app.post_order(&[("BK-12", 1), ("HD-44", 4)], None).await;

    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["sku"], "HD-44");
    assert_eq!(problem["requested"], 4);
    assert_eq!(problem["available"], 3);
    // All or none at inventory: the order's one call reserved nothing, so nothing is released.
    assert_eq!(app.inventory_calls("/reserve").await.len(), 1);
    assert!(app.released().await.is_empty());
    app.teardown().await;
}

#[tokio::test]
async fn an_unknown_sku_is_422_naming_it_and_releases_nothing_as_nothing_was_reserved() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_stock("BK-12").await;
    app.given_unknown_sku("NOPE-1").await;
    app.given_releases_succeed().await;

    let response = app.post_order(&[("BK-12", 1), ("NOPE-1", 1)], None).await;

    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["sku"], "NOPE-1");
    assert!(app.released().await.is_empty());
    app.teardown().await;
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;

    let response = app.post_order_raw("{\"items\": [".to_owned(), &[]).await;

    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.teardown().await;
}

#[tokio::test]
async fn an_order_without_items_or_with_a_bad_quantity_is_422_and_calls_nothing() {
    let app = spawn_app().await;
    let cases = [
        json!({ "items": [] }),
        json!({ "items": [{ "sku": "BK-12", "qty": 0 }] }),
        json!({ "items": [{ "sku": "BK-12", "qty": -1 }] }),
        json!({ "items": [{ "sku": "BK-12", "qty": 1.5 }] }),
        json!({ "items": [{ "sku": "", "qty": 1 }] }),
        json!({ "items": [{ "qty": 1 }] }),
        json!({}),
    ];

    for body in cases {
        let response = app.post_order_raw(body.to_string(), &[]).await;
        assert_eq!(response.status(), 422, "{body}");
    }
    assert!(
        app.pricing
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert!(
        app.inventory
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
    app.teardown().await;
}
