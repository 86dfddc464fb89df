//! Pricing from the cache when pricing is down (DESIGN §5 flow 3).

use serde_json::{Value, json};
use shared::events::PriceChanged;
use shared::money::Money;

use crate::helpers::{assert_eventually, price_mock, spawn_app};

#[tokio::test]
async fn with_pricing_down_a_price_from_a_price_changed_event_is_used_and_marked_cached() {
    let app = spawn_app().await;
    app.publish(&PriceChanged {
        sku: "MG-07".to_owned(),
        price: Money(1100),
        currency: "EUR".to_owned(),
        version: 1,
    })
    .await;
    assert_eventually("the price reaches the cache", || async {
        app.prices.get("MG-07").is_some()
    })
    .await;
    app.given_pricing_is_down().await;
    app.given_stock("MG-07").await;

    let response = app.post_order(&[("MG-07", 2)], None).await;

    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("order JSON");
    assert_eq!(order["pricedFromCache"], true);
    assert_eq!(order["lines"][0]["priceSource"], "cache");
    assert_eq!(order["lines"][0]["unitPrice"], json!(11.0));
    assert_eq!(order["total"], json!(22.0));
    app.teardown().await;
}

#[tokio::test]
async fn with_pricing_down_a_price_seen_in_an_earlier_live_lookup_is_used() {
    let app = spawn_app().await;
    app.given_stock("BK-12").await;
    let live = price_mock("BK-12", 39.90)
        .mount_as_scoped(&app.pricing)
        .await;
    let first = app.placed(&[("BK-12", 1)]).await;
    assert_eq!(first["lines"][0]["priceSource"], "live");
    drop(live);
    app.given_pricing_is_down().await;

    let second = app.placed(&[("BK-12", 1)]).await;

    assert_eq!(second["lines"][0]["priceSource"], "cache");
    assert_eq!(second["lines"][0]["unitPrice"], json!(39.9));
    assert_eq!(second["pricedFromCache"], true);
    app.teardown().await;
}

#[tokio::test]
async fn with_pricing_down_and_nothing_cached_the_order_is_503_with_retry_after_and_released() {
    let app = spawn_app().await;
    app.given_pricing_is_down().await;
    let reservation = app.given_stock("TS-33").await;
    app.given_releases_succeed().await;

    let response = app.post_order(&[("TS-33", 1)], None).await;

    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let response_dependency_header = response.headers()["x-failed-dependency"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["sku"], "TS-33");
    assert_eq!(problem["dependency"], "pricing");
    assert_eq!(response_dependency_header, "pricing");
    assert_eq!(app.released().await, [reservation.to_string()]);
    app.teardown().await;
}

#[tokio::test]
async fn with_pricing_hanging_the_line_is_priced_from_the_cache_well_within_the_budget() {
    let app = spawn_app().await;
    app.given_stock("BK-12").await;
    let live = price_mock("BK-12", 39.90)
        .mount_as_scoped(&app.pricing)
        .await;
    app.placed(&[("BK-12", 1)]).await;
    drop(live);
    // Pricing accepts the request and never answers in time.
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_delay(std::time::Duration::from_secs(30)),
        )
        .mount(&app.pricing)
        .await;

    let started = std::time::Instant::now();
    let order = app.placed(&[("BK-12", 1)]).await;

    // The live lookup gives up after its own budget (about 1.2 s), not the request's 5 s.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(order["lines"][0]["priceSource"], "cache");
    assert_eq!(order["lines"][0]["unitPrice"], json!(39.9));
    app.teardown().await;
}
