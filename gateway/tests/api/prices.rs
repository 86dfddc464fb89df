//! `/api/prices/{sku}`: reads pass through; changes need the admin key.

use serde_json::json;
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{ADMIN_KEY, assert_problem, json, spawn_app};

fn price(sku: &str, price: f64) -> serde_json::Value {
    json!({ "sku": sku, "name": "Ferris mug", "price": price, "currency": "EUR", "unitsSold": 0 })
}

#[tokio::test]
async fn a_price_is_passed_through_from_pricing() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path("/prices/MG-07"))
        .respond_with(ResponseTemplate::new(200).set_body_json(price("MG-07", 12.5)))
        .expect(1)
        .mount(&app.pricing)
        .await;

    let response = app.get("/api/prices/MG-07").send().await.expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(json(response).await, price("MG-07", 12.5));
}

#[tokio::test]
async fn changing_a_price_without_the_api_key_is_401_and_pricing_is_not_called() {
    let app = spawn_app().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.pricing)
        .await;

    let response = app
        .put("/api/prices/MG-07")
        .json(&json!({ "price": 13.0 }))
        .send()
        .await
        .expect("request");

    assert_problem(response, 401).await;
}

#[tokio::test]
async fn changing_a_price_with_a_wrong_api_key_is_401_and_pricing_is_not_called() {
    let app = spawn_app().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.pricing)
        .await;

    for wrong in [
        "dev-admin-key",
        "test-admin-kez",
        "test-admin-key-and-more",
        "",
    ] {
        let response = app
            .put("/api/prices/MG-07")
            .header("x-api-key", wrong)
            .json(&json!({ "price": 13.0 }))
            .send()
            .await
            .expect("request");
        assert_problem(response, 401).await;
    }
}

#[tokio::test]
async fn the_api_key_is_checked_before_the_body_is_read() {
    let app = spawn_app().await;

    let response = app
        .put("/api/prices/MG-07")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");

    assert_problem(response, 401).await;
}

#[tokio::test]
async fn changing_a_price_with_the_api_key_is_forwarded_without_the_key() {
    let app = spawn_app().await;
    let change = json!({ "price": 13.0, "currency": "EUR" });
    Mock::given(method("PUT"))
        .and(path("/prices/MG-07"))
        .and(body_json(&change))
        .respond_with(ResponseTemplate::new(200).set_body_json(price("MG-07", 13.0)))
        .expect(1)
        .mount(&app.pricing)
        .await;

    let response = app
        .put("/api/prices/MG-07")
        .header("x-api-key", ADMIN_KEY)
        .json(&change)
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(json(response).await, price("MG-07", 13.0));
    let received = app.pricing.received_requests().await.expect("recording");
    assert!(
        received
            .iter()
            .all(|r| !r.headers.contains_key("x-api-key")),
        "the admin key must stay at the edge"
    );
}

#[tokio::test]
async fn a_new_price_keeps_pricings_201() {
    let app = spawn_app().await;
    Mock::given(method("PUT"))
        .and(path("/prices/NEW-1"))
        .respond_with(ResponseTemplate::new(201).set_body_json(price("NEW-1", 1.0)))
        .expect(1)
        .mount(&app.pricing)
        .await;

    let response = app
        .put("/api/prices/NEW-1")
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({ "price": 1.0 }))
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 201);
}

#[tokio::test]
async fn an_invalid_price_is_pricings_422_problem() {
    let app = spawn_app().await;
    Mock::given(method("PUT"))
        .and(path("/prices/MG-07"))
        .respond_with(ResponseTemplate::new(422).set_body_json(
            json!({ "type": "about:blank", "title": "Invalid price", "status": 422 }),
        ))
        .expect(1)
        .mount(&app.pricing)
        .await;

    let response = app
        .put("/api/prices/MG-07")
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({ "price": -1 }))
        .send()
        .await
        .expect("request");

    let body = assert_problem(response, 422).await;
    assert_eq!(body["title"], "Invalid price");
}
