//! `GET /prices`, `GET /prices/{sku}`, `PUT /prices/{sku}` and the `price.changed` it publishes.

use serde_json::{Value, json};
use shared::money::Money;

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_price_of_a_seeded_sku_is_served_with_name_currency_and_units_sold() {
    let app = spawn_app().await;

    let price = app.price("BK-12").await;

    assert_eq!(
        price,
        json!({
            "sku": "BK-12", "name": "The Rust Book", "price": 39.9,
            "currency": "EUR", "unitsSold": 0, "version": 1
        })
    );
    app.teardown().await;
}

#[tokio::test]
async fn the_price_list_holds_the_whole_seeded_catalogue() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(format!("{}/prices", app.address))
        .send()
        .await
        .expect("GET /prices");

    assert_eq!(response.status(), 200);
    let list: Vec<Value> = response.json().await.expect("JSON");
    let prices: Vec<(&str, f64)> = list
        .iter()
        .filter_map(|p| Some((p["sku"].as_str()?, p["price"].as_f64()?)))
        .collect();
    assert_eq!(
        prices,
        [
            ("BK-12", 39.9),
            ("HD-44", 49.0),
            ("MG-07", 12.5),
            ("ST-01", 2.5),
            ("TS-33", 19.99)
        ]
    );
    app.teardown().await;
}

#[tokio::test]
async fn the_price_of_an_unknown_sku_is_a_404_problem() {
    let app = spawn_app().await;

    let response = app.get_price("NOPE-1").await;

    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.teardown().await;
}

#[tokio::test]
async fn putting_a_price_changes_it_and_publishes_price_changed() {
    let app = spawn_app().await;

    let response = app.put_price("MG-07", r#"{"price": 13.75}"#).await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["price"], 13.75);
    assert_eq!(body["currency"], "EUR");
    assert_eq!(body["version"], 2, "the seeded price was version 1");
    assert_eq!(app.price("MG-07").await["price"], 13.75);
    let (message, event) = app.next_price_changed().await;
    assert_eq!(message.event_type, "price.changed");
    assert_eq!(event.sku, "MG-07");
    assert_eq!(event.price, Money(1375));
    assert_eq!(event.currency, "EUR");
    assert_eq!(event.version, 2);
    app.teardown().await;
}

#[tokio::test]
async fn putting_a_price_for_a_new_sku_creates_it_named_after_itself() {
    let app = spawn_app().await;

    let response = app
        .put_price("NEW-1", r#"{"price": 5, "currency": "USD"}"#)
        .await;

    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/prices/NEW-1");
    assert_eq!(
        app.price("NEW-1").await,
        json!({
            "sku": "NEW-1", "name": "NEW-1", "price": 5.0, "currency": "USD", "unitsSold": 0,
            "version": 1
        })
    );
    let (_, event) = app.next_price_changed().await;
    assert_eq!((event.sku.as_str(), event.price), ("NEW-1", Money(500)));
    app.teardown().await;
}

#[tokio::test]
async fn putting_the_same_price_again_answers_200_and_publishes_again() {
    let app = spawn_app().await;

    let first = app.put_price("ST-01", r#"{"price": 2.5}"#).await;
    let second = app.put_price("ST-01", r#"{"price": 2.5}"#).await;

    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let (first, _) = app.next_price_changed().await;
    let (second, event) = app.next_price_changed().await;
    assert_ne!(first.message_id, second.message_id);
    assert_eq!((event.price, event.version), (Money(250), 3));
    app.teardown().await;
}

#[tokio::test]
async fn an_invalid_price_or_currency_is_a_422_and_changes_nothing() {
    let app = spawn_app().await;

    for body in [
        r#"{"price": -1}"#,
        r#"{"price": 1.234}"#,
        r#"{"price": "12.50"}"#,
        r#"{}"#,
        r#"{"price": 12.5, "currency": "euro"}"#,
    ] {
        let response = app.put_price("BK-12", body).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(app.price("BK-12").await["price"], 39.9);
    app.teardown().await;
}

#[tokio::test]
async fn a_malformed_body_is_a_400() {
    let app = spawn_app().await;

    let response = app.put_price("BK-12", r#"{"price": "#).await;

    assert_eq!(response.status(), 400);
    app.teardown().await;
}
