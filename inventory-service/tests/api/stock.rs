//! `GET /stock`, `GET /stock/{sku}`, `PUT /stock/{sku}`.

use serde_json::{Value, json};

use crate::helpers::spawn_app;

#[tokio::test]
async fn stock_of_a_seeded_sku_shows_on_hand_reserved_and_available() {
    let app = spawn_app().await;

    let stock = app.stock("BK-12").await;

    assert_eq!(
        stock,
        json!({"sku": "BK-12", "onHand": 100, "reserved": 0, "available": 100})
    );
    app.teardown().await;
}

#[tokio::test]
async fn the_stock_list_holds_the_whole_seeded_catalogue() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(format!("{}/stock", app.address))
        .send()
        .await
        .expect("GET /stock");

    assert_eq!(response.status(), 200);
    let list: Vec<Value> = response.json().await.expect("JSON");
    let skus: Vec<&str> = list.iter().filter_map(|s| s["sku"].as_str()).collect();
    assert_eq!(skus, ["BK-12", "HD-44", "MG-07", "ST-01", "TS-33"]);
    app.teardown().await;
}

#[tokio::test]
async fn stock_of_an_unknown_sku_is_a_404_problem() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(format!("{}/stock/NOPE-1", app.address))
        .send()
        .await
        .expect("GET /stock");

    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.teardown().await;
}

#[tokio::test]
async fn putting_stock_sets_on_hand_and_creates_a_new_sku() {
    let app = spawn_app().await;
    let put = |sku: &'static str, on_hand: i64| {
        app.client
            .put(format!("{}/stock/{sku}", app.address))
            .json(&json!({ "onHand": on_hand }))
            .send()
    };

    let restocked = put("HD-44", 40).await.expect("PUT /stock");
    let created = put("NEW-1", 7).await.expect("PUT /stock");

    assert_eq!(restocked.status(), 200);
    assert_eq!(app.stock("HD-44").await["available"], 40);
    assert_eq!(created.status(), 200);
    assert_eq!(
        app.stock("NEW-1").await,
        json!({"sku": "NEW-1", "onHand": 7, "reserved": 0, "available": 7})
    );
    app.teardown().await;
}

#[tokio::test]
async fn putting_stock_below_what_is_reserved_or_below_zero_is_a_422() {
    let app = spawn_app().await;
    app.reserved("HD-44", 2).await;
    let put = |on_hand: i64| {
        app.client
            .put(format!("{}/stock/HD-44", app.address))
            .json(&json!({ "onHand": on_hand }))
            .send()
    };

    let below_reserved = put(1).await.expect("PUT /stock");
    let negative = put(-1).await.expect("PUT /stock");

    assert_eq!(below_reserved.status(), 422);
    assert_eq!(negative.status(), 422);
    assert_eq!(app.stock("HD-44").await["onHand"], 3);
    app.teardown().await;
}
