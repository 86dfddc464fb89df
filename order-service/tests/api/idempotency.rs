//! `Idempotency-Key`: one key, one order, however often and however concurrently it is sent.

use std::collections::HashSet;

use futures::future::join_all;
use serde_json::Value;
use uuid::Uuid;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_same_key_twice_returns_the_same_order_and_reserves_once() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_price("MG-07", 12.50).await;
    app.given_stock("BK-12").await;
    app.given_stock("MG-07").await;
    let key = Uuid::new_v4().to_string();
    let items = [("BK-12", 1), ("MG-07", 2)];

    let first = app.post_order(&items, Some(&key)).await;
    let second = app.post_order(&items, Some(&key)).await;

    assert_eq!(first.status(), 201);
    assert_eq!(second.status(), 201);
    let first: Value = first.json().await.expect("order JSON");
    let second: Value = second.json().await.expect("order JSON");
    assert_eq!(first, second);
    assert_eq!(
        app.inventory_calls("/reserve").await.len(),
        1,
        "one reserve call for the one order"
    );
    app.teardown().await;
}

#[tokio::test]
async fn the_same_key_with_a_different_body_is_422() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_stock("BK-12").await;
    let key = Uuid::new_v4().to_string();

    let first = app.post_order(&[("BK-12", 1)], Some(&key)).await;
    let reused = app.post_order(&[("BK-12", 5)], Some(&key)).await;

    assert_eq!(first.status(), 201);
    assert_eq!(reused.status(), 422);
    assert_eq!(app.inventory_calls("/reserve").await.len(), 1);
    app.teardown().await;
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_key_place_one_order() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_price("TS-33", 19.99).await;
    app.given_stock("BK-12").await;
    app.given_stock("TS-33").await;
    let key = Uuid::new_v4().to_string();
    let items = [("BK-12", 1), ("TS-33", 1)];

    let responses = join_all((0..20).map(|_| app.post_order(&items, Some(&key)))).await;

    let mut ids = HashSet::new();
    for response in responses {
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.expect("order JSON");
        ids.insert(order["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(ids.len(), 1, "one order: {ids:?}");
    assert_eq!(
        app.inventory_calls("/reserve").await.len(),
        1,
        "one reserve call for the one order"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_duplicate_of_an_order_still_being_placed_is_told_to_come_back_after_a_second() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    // The first request's reservation takes 1.8 s (inside the 2 s attempt timeout): its owner is
    // slow (or, in production, dead).
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(std::time::Duration::from_millis(1800))
                .set_body_json(serde_json::json!({
                    "orderId": Uuid::new_v4(),
                    "reservations": [{
                        "sku": "BK-12", "reserved": 1, "remaining": 10,
                        "reservationId": Uuid::new_v4(), "expiresAt": "2030-01-01T00:00:00Z",
                    }],
                })),
        )
        .mount(&app.inventory)
        .await;
    let key = Uuid::new_v4().to_string();

    let first = app.post_order(&[("BK-12", 1)], Some(&key));
    let duplicate = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let response = app.post_order(&[("BK-12", 1)], Some(&key)).await;
        (response, started.elapsed())
    };
    let (first, (duplicate, waited)) = tokio::join!(first, duplicate);

    assert_eq!(duplicate.status(), 409);
    assert_eq!(
        duplicate
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(
        waited < std::time::Duration::from_millis(1500),
        "answered before the owner finished: {waited:?}"
    );
    let problem: Value = duplicate.json().await.expect("problem JSON");
    assert_eq!(problem["title"], "Idempotency-Key in use");
    assert_eq!(first.status(), 201, "the owner still places its order");
    app.teardown().await;
}

#[tokio::test]
async fn a_key_whose_first_attempt_failed_can_be_retried() {
    let app = spawn_app().await;
    app.given_price("HD-44", 49.00).await;
    // The first reservation is short; by the retry, stock has been replenished.
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .and(body_partial_json(
            serde_json::json!({ "items": [{ "sku": "HD-44" }] }),
        ))
        .respond_with(ResponseTemplate::new(409).set_body_json(serde_json::json!({
            "title": "Insufficient stock", "status": 409, "sku": "HD-44", "available": 0,
        })))
        .up_to_n_times(1)
        .mount(&app.inventory)
        .await;
    app.given_stock("HD-44").await;
    let key = Uuid::new_v4().to_string();

    let failed = app.post_order(&[("HD-44", 1)], Some(&key)).await;
    let retried = app.post_order(&[("HD-44", 1)], Some(&key)).await;

    assert_eq!(failed.status(), 409);
    assert_eq!(retried.status(), 201);
    app.teardown().await;
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_400() {
    let app = spawn_app().await;
    let long = "k".repeat(256);

    for key in ["", long.as_str(), "has space"] {
        let response = app
            .post_order_raw(
                crate::helpers::order_body(&[("BK-12", 1)]),
                &[("idempotency-key", key)],
            )
            .await;
        assert_eq!(response.status(), 400, "key {key:?}");
    }
    app.teardown().await;
}
