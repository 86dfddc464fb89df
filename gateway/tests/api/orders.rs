//! `/api/orders` is forwarded to order-service.

use serde_json::json;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{assert_problem, json, spawn_app};

fn placed_order(id: &str) -> serde_json::Value {
    json!({ "id": id, "status": "placed", "lines": [], "total": 79.8, "currency": "EUR",
            "pricedFromCache": false, "createdAt": "2026-11-22T10:00:00Z" })
}

#[tokio::test]
async fn placing_an_order_forwards_body_and_key_and_rewrites_the_location() {
    let app = spawn_app().await;
    let order = json!({ "items": [{ "sku": "BK-12", "qty": 2 }] });
    Mock::given(method("POST"))
        .and(path("/orders"))
        .and(header("content-type", "application/json"))
        .and(header("idempotency-key", "key-1"))
        .and(body_json(&order))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("location", "/orders/o-1")
                .set_body_json(placed_order("o-1")),
        )
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders")
        .header("idempotency-key", "key-1")
        .json(&order)
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["location"], "/api/orders/o-1");
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(json(response).await, placed_order("o-1"));
}

#[tokio::test]
async fn an_order_post_with_a_key_is_retried_after_a_transient_failure() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/orders"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&app.order)
        .await;
    Mock::given(method("POST"))
        .and(path("/orders"))
        .respond_with(ResponseTemplate::new(201).set_body_json(placed_order("o-2")))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders")
        .header("idempotency-key", "key-2")
        .json(&json!({ "items": [{ "sku": "MG-07", "qty": 1 }] }))
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(json(response).await["id"], "o-2");
}

#[tokio::test]
async fn an_order_post_without_a_key_is_never_retried() {
    let app = spawn_app().await;
    // Counted by correlation ID, so only this test's requests are counted.
    Mock::given(method("POST"))
        .and(path("/orders"))
        .and(header("x-correlation-id", "no-key-1"))
        .respond_with(ResponseTemplate::new(503))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders")
        .header("x-correlation-id", "no-key-1")
        .json(&json!({ "items": [{ "sku": "MG-07", "qty": 1 }] }))
        .send()
        .await
        .expect("request");

    assert!(response.status().is_server_error(), "{}", response.status());
}

#[tokio::test]
async fn a_409_from_order_service_passes_through_as_a_409_problem() {
    let app = spawn_app().await;
    let problem = json!({ "type": "about:blank", "title": "Insufficient stock", "status": 409,
                          "sku": "HD-44", "requested": 5, "available": 3 });
    Mock::given(method("POST"))
        .and(path("/orders"))
        .respond_with(
            ResponseTemplate::new(409)
                .insert_header("content-type", "application/problem+json")
                .set_body_json(&problem),
        )
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders")
        .json(&json!({ "items": [{ "sku": "HD-44", "qty": 5 }] }))
        .send()
        .await
        .expect("request");

    let body = assert_problem(response, 409).await;
    assert_eq!(body, problem);
}

#[tokio::test]
async fn malformed_json_is_a_400_problem_and_never_reaches_order_service() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .expect(0)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders")
        .header("content-type", "application/json")
        .body(r#"{"items": [{"sku": "BK-12", "qty": 1}"#)
        .send()
        .await
        .expect("request");

    let body = assert_problem(response, 400).await;
    assert_eq!(body["title"], "Malformed JSON");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem_and_never_reaches_order_service() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .expect(0)
        .mount(&app.order)
        .await;
    let huge = format!(
        r#"{{"note": "{}"}}"#,
        "x".repeat(shared::server::DEFAULT_BODY_LIMIT)
    );

    let response = app
        .post("/api/orders")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("request");

    assert_problem(response, 413).await;
}

#[tokio::test]
async fn an_order_is_fetched_from_order_service() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path("/orders/o-3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(placed_order("o-3")))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app.get("/api/orders/o-3").send().await.expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(json(response).await, placed_order("o-3"));
}

#[tokio::test]
async fn an_unknown_order_is_the_upstream_404_problem() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path("/orders/nope"))
        .respond_with(ResponseTemplate::new(404).set_body_json(
            json!({ "type": "about:blank", "title": "Order not found", "status": 404 }),
        ))
        .mount(&app.order)
        .await;

    let response = app.get("/api/orders/nope").send().await.expect("request");

    let body = assert_problem(response, 404).await;
    assert_eq!(body["title"], "Order not found");
}

#[tokio::test]
async fn cancelling_an_order_is_forwarded_to_order_service() {
    let app = spawn_app().await;
    let mut cancelled = placed_order("o-4");
    cancelled["status"] = json!("cancelled");
    Mock::given(method("POST"))
        .and(path("/orders/o-4/cancel"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&cancelled))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .post("/api/orders/o-4/cancel")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(json(response).await, cancelled);
}

#[tokio::test]
async fn an_order_id_with_encoded_slashes_cannot_leave_the_order_path() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path("/orders/..%2F..%2Fadmin"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app
        .get("/api/orders/..%2F..%2Fadmin")
        .send()
        .await
        .expect("request");

    assert_problem(response, 404).await;
}
