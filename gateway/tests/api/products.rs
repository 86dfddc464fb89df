//! `/api/products/{sku}`: pricing and inventory asked in parallel, merged, partial when one fails.

use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{assert_problem, json, spawn_app, spawn_app_with, unreachable_url};

async fn price_is(server: &MockServer, sku: &str, price: f64) {
    Mock::given(method("GET"))
        .and(path(format!("/prices/{sku}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "sku": sku, "name": "The Rust Book", "price": price, "currency": "EUR", "unitsSold": 7
        })))
        .mount(server)
        .await;
}

async fn stock_is(server: &MockServer, sku: &str, available: i64) {
    Mock::given(method("GET"))
        .and(path(format!("/stock/{sku}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "sku": sku, "onHand": available + 2, "reserved": 2, "available": available
        })))
        .mount(server)
        .await;
}

async fn answers(server: &MockServer, status: u16) {
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(status))
        .mount(server)
        .await;
}

#[tokio::test]
async fn a_product_merges_price_and_availability() {
    let app = spawn_app().await;
    price_is(&app.pricing, "BK-12", 39.9).await;
    stock_is(&app.inventory, "BK-12", 98).await;

    let response = app
        .get("/api/products/BK-12")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        json(response).await,
        json!({ "sku": "BK-12", "name": "The Rust Book", "price": 39.9, "currency": "EUR",
                "available": 98, "missing": [] })
    );
}

#[tokio::test]
async fn price_and_availability_are_fetched_in_parallel() {
    let app = spawn_app().await;
    // Each side takes 300 ms (inside the 500 ms read attempt); asked one after the other they
    // would take at least 600 ms.
    let slow = Duration::from_millis(300);
    Mock::given(method("GET"))
        .and(path("/prices/BK-12"))
        .respond_with(ResponseTemplate::new(200).set_delay(slow).set_body_json(
            json!({ "sku": "BK-12", "name": "The Rust Book", "price": 39.9, "currency": "EUR" }),
        ))
        .mount(&app.pricing)
        .await;
    Mock::given(method("GET"))
        .and(path("/stock/BK-12"))
        .respond_with(
            ResponseTemplate::new(200).set_delay(slow).set_body_json(
                json!({ "sku": "BK-12", "onHand": 1, "reserved": 0, "available": 1 }),
            ),
        )
        .mount(&app.inventory)
        .await;

    let started = Instant::now();
    let response = app
        .get("/api/products/BK-12")
        .send()
        .await
        .expect("request");
    let elapsed = started.elapsed();

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(json(response).await["missing"], json!([]));
    assert!(
        elapsed < 2 * slow,
        "took {elapsed:?}: the calls ran one after the other"
    );
}

#[tokio::test]
async fn with_inventory_down_the_product_has_its_price_and_misses_availability() {
    let app = spawn_app().await;
    price_is(&app.pricing, "MG-07", 12.5).await;
    answers(&app.inventory, 503).await;

    let response = app
        .get("/api/products/MG-07")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        json(response).await,
        json!({ "sku": "MG-07", "name": "The Rust Book", "price": 12.5, "currency": "EUR",
                "available": null, "missing": ["availability"] })
    );
}

#[tokio::test]
async fn with_pricing_unreachable_the_product_has_availability_and_misses_the_price() {
    let dead = unreachable_url().await;
    let app = spawn_app_with(|s| s.pricing.base_urls = vec![dead]).await;
    stock_is(&app.inventory, "TS-33", 25).await;

    let response = app
        .get("/api/products/TS-33")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        json(response).await,
        json!({ "sku": "TS-33", "name": null, "price": null, "currency": null,
                "available": 25, "missing": ["price"] })
    );
}

#[tokio::test]
async fn with_inventory_hanging_the_product_is_answered_without_availability() {
    let app = spawn_app_with(|s| {
        // One short attempt, so the hanging side is given up on well inside the edge budget.
        s.inventory.attempt_timeout = Duration::from_millis(200);
        s.inventory.retry.max_attempts = 1;
    })
    .await;
    price_is(&app.pricing, "ST-01", 2.5).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&app.inventory)
        .await;

    let response = app
        .get("/api/products/ST-01")
        .send()
        .await
        .expect("request");

    assert_eq!(response.status().as_u16(), 200);
    let body = json(response).await;
    assert_eq!(body["missing"], json!(["availability"]));
    assert_eq!(body["price"], 2.5);
}

#[tokio::test]
async fn with_inventory_hanging_the_product_is_answered_within_its_lookup_budget_and_then_fast() {
    // The default clients: 500 ms read attempts, retries, the breaker after 5 failures.
    let app = spawn_app().await;
    price_is(&app.pricing, "ST-01", 2.5).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&app.inventory)
        .await;

    let mut elapsed = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let response = app
            .get("/api/products/ST-01")
            .send()
            .await
            .expect("request");
        elapsed.push(started.elapsed());
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(json(response).await["missing"], json!(["availability"]));
    }

    // Each slow answer is bounded by the 1.2 s lookup budget, not the 5 s edge budget; every
    // attempt of a lookup (hedges included) runs out, so each lookup is a failed call, five of
    // them open the breaker, and then the gap is known at once.
    assert!(
        elapsed.iter().all(|e| *e < Duration::from_millis(1500)),
        "{elapsed:?}"
    );
    assert!(elapsed[5] < Duration::from_millis(200), "{elapsed:?}");
}

#[tokio::test]
async fn with_both_sides_down_the_product_is_an_upstream_problem() {
    let app = spawn_app().await;
    answers(&app.pricing, 503).await;
    answers(&app.inventory, 500).await;

    let response = app
        .get("/api/products/BK-12")
        .send()
        .await
        .expect("request");

    let status = response.status().as_u16();
    assert!([502, 503, 504].contains(&status), "status {status}");
    assert_problem(response, status).await;
}

#[tokio::test]
async fn a_sku_neither_side_knows_is_a_404_problem() {
    let app = spawn_app().await;
    answers(&app.pricing, 404).await;
    answers(&app.inventory, 404).await;

    let response = app
        .get("/api/products/XX-99")
        .send()
        .await
        .expect("request");

    let body = assert_problem(response, 404).await;
    assert_eq!(body["sku"], "XX-99");
}
