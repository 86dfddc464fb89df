//! `POST /reserve`, `POST /release` and reservation expiry.

use std::time::Duration;

use serde_json::{Value, json};
use shared::events::{EventLine, OrderPlaced};
use shared::money::Money;
use uuid::Uuid;

use crate::helpers::{assert_eventually, spawn_app, spawn_app_with};

#[tokio::test]
async fn reserving_takes_units_out_of_available_stock() {
    let app = spawn_app().await;

    let response = app.reserve("BK-12", 3, None).await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["sku"], "BK-12");
    assert_eq!(body["reserved"], 3);
    assert_eq!(body["remaining"], 97);
    assert!(
        body["reservationId"]
            .as_str()
            .is_some_and(|id| Uuid::parse_str(id).is_ok())
    );
    assert!(body["expiresAt"].is_string());
    assert_eq!(
        app.stock("BK-12").await,
        json!({"sku": "BK-12", "onHand": 100, "reserved": 3, "available": 97})
    );
    app.teardown().await;
}

#[tokio::test]
async fn reserving_more_than_is_available_is_a_409_naming_sku_and_available_and_changes_nothing() {
    let app = spawn_app().await;

    let response = app.reserve("HD-44", 4, None).await;

    assert_eq!(response.status(), 409);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["sku"], "HD-44");
    assert_eq!(problem["requested"], 4);
    assert_eq!(problem["available"], 3);
    assert_eq!(app.stock("HD-44").await["reserved"], 0);
    app.teardown().await;
}

#[tokio::test]
async fn reserving_an_unknown_sku_is_a_404() {
    let app = spawn_app().await;

    let response = app.reserve("NOPE-1", 1, None).await;

    assert_eq!(response.status(), 404);
    app.teardown().await;
}

#[tokio::test]
async fn a_qty_that_is_not_a_positive_integer_is_a_422_saying_so() {
    let app = spawn_app().await;

    for qty in ["0", "-1", "1.5", "\"2\"", "null"] {
        let response = app
            .reserve_raw(format!(r#"{{"sku":"BK-12","qty":{qty}}}"#), None)
            .await;
        assert_eq!(response.status(), 422, "qty {qty}");
        let problem: Value = response.json().await.expect("JSON");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("qty"), "qty {qty}: {detail}");
    }
    let missing = app.reserve_raw(r#"{"sku":"BK-12"}"#.to_owned(), None).await;
    assert_eq!(missing.status(), 422);
    assert_eq!(app.stock("BK-12").await["reserved"], 0);
    app.teardown().await;
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;

    let response = app
        .reserve_raw(r#"{"sku":"BK-12","qty":"#.to_owned(), None)
        .await;

    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    app.teardown().await;
}

#[tokio::test]
async fn replaying_an_idempotency_key_answers_the_same_reservation_and_reserves_once() {
    let app = spawn_app().await;

    let first: Value = app
        .reserve("MG-07", 2, Some("order-1:MG-07"))
        .await
        .json()
        .await
        .expect("JSON");
    let replay = app.reserve("MG-07", 2, Some("order-1:MG-07")).await;

    assert_eq!(replay.status(), 200);
    let replay: Value = replay.json().await.expect("JSON");
    assert_eq!(replay, first);
    assert_eq!(app.stock("MG-07").await["reserved"], 2);
    app.teardown().await;
}

#[tokio::test]
async fn an_idempotency_key_reused_for_a_different_reservation_is_a_422() {
    let app = spawn_app().await;
    app.reserve("MG-07", 2, Some("order-2:MG-07")).await;

    let response = app.reserve("MG-07", 5, Some("order-2:MG-07")).await;

    assert_eq!(response.status(), 422);
    assert_eq!(app.stock("MG-07").await["reserved"], 2);
    app.teardown().await;
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_idempotency_key_reserve_once() {
    let app = spawn_app().await;

    let responses =
        futures::future::join_all((0..20).map(|_| app.reserve("TS-33", 1, Some("concurrent-key"))))
            .await;

    let mut ids = Vec::new();
    for response in responses {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("JSON");
        ids.push(body["reservationId"].as_str().map(str::to_owned));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one reservation for one key: {ids:?}");
    assert_eq!(app.stock("TS-33").await["reserved"], 1);
    app.teardown().await;
}

#[tokio::test]
async fn a_refused_reservation_is_not_remembered_so_its_replay_is_evaluated_again() {
    let app = spawn_app().await;
    let key = Some("retry-after-restock");
    assert_eq!(app.reserve("HD-44", 10, key).await.status(), 409);
    app.client
        .put(format!("{}/stock/HD-44", app.address))
        .json(&json!({ "onHand": 20 }))
        .send()
        .await
        .expect("PUT /stock");

    let replay = app.reserve("HD-44", 10, key).await;

    assert_eq!(replay.status(), 200);
    assert_eq!(app.stock("HD-44").await["available"], 10);
    app.teardown().await;
}

#[tokio::test]
async fn releasing_returns_the_units_and_is_idempotent() {
    let app = spawn_app().await;
    let reservation = app.reserved("ST-01", 10).await;
    let id = reservation["reservationId"].as_str().expect("id");

    let first = app.release(id).await;
    let again = app.release(id).await;

    assert_eq!(first.status(), 200);
    let body: Value = first.json().await.expect("JSON");
    assert_eq!(body, json!({"reservationId": id, "status": "released"}));
    assert_eq!(again.status(), 200);
    assert_eq!(app.stock("ST-01").await["available"], 500);
    app.teardown().await;
}

#[tokio::test]
async fn releasing_an_unknown_reservation_is_a_404() {
    let app = spawn_app().await;

    let response = app.release(&Uuid::new_v4().to_string()).await;

    assert_eq!(response.status(), 404);
    app.teardown().await;
}

#[tokio::test]
async fn an_uncommitted_reservation_expires_and_returns_its_units_while_a_committed_one_stays_taken()
 {
    // Long enough for the commit below to land first even on a loaded machine, short enough
    // to keep the test quick; the sweeper runs every 50 ms so expiry is seen promptly.
    let app = spawn_app_with(|settings| {
        settings.reservation_ttl = Duration::from_secs(2);
        settings.sweep_interval = Duration::from_millis(50);
    })
    .await;
    let kept = app.reserved("MG-07", 4).await;
    let abandoned = app.reserved("TS-33", 5).await;
    let kept_id = Uuid::parse_str(kept["reservationId"].as_str().expect("id")).expect("uuid");
    app.publish(
        Uuid::new_v4(),
        &OrderPlaced {
            order_id: Uuid::new_v4(),
            lines: vec![EventLine {
                sku: "MG-07".to_owned(),
                qty: 4,
                reservation_id: kept_id,
                unit_price: Money(1250),
            }],
            total: Money(5000),
            currency: "EUR".to_owned(),
        },
    )
    .await;
    assert_eventually("the order's reservation is committed", || async {
        app.stock("MG-07").await
            == json!({"sku": "MG-07", "onHand": 46, "reserved": 0, "available": 46})
    })
    .await;
    assert_eq!(app.stock("TS-33").await["reserved"], 5, "not expired yet");

    assert_eventually("the abandoned reservation expires", || async {
        app.stock("TS-33").await["reserved"] == 0
    })
    .await;

    assert_eq!(app.stock("TS-33").await["available"], 25);
    assert_eq!(app.stock("MG-07").await["onHand"], 46);
    let abandoned_id = abandoned["reservationId"].as_str().expect("id");
    assert_eq!(
        app.release(abandoned_id).await.status(),
        200,
        "expired is already released"
    );
    assert_eq!(
        app.release(&kept_id.to_string()).await.status(),
        409,
        "committed stays taken"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_whole_order_is_reserved_in_one_call_answering_each_line_in_request_order() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();

    let response = app
        .reserve_order(order_id, &[("MG-07", 2), ("BK-12", 3)], None)
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["orderId"], order_id.to_string());
    let reservations = body["reservations"].as_array().expect("a list");
    assert_eq!(reservations.len(), 2);
    for (reservation, (sku, qty, remaining)) in reservations
        .iter()
        .zip([("MG-07", 2, 48), ("BK-12", 3, 97)])
    {
        assert_eq!(reservation["sku"], sku);
        assert_eq!(reservation["reserved"], qty);
        assert_eq!(reservation["remaining"], remaining);
        assert!(reservation["reservationId"].is_string());
        assert!(reservation["expiresAt"].is_string());
    }
    assert_eq!(app.stock("MG-07").await["reserved"], 2);
    assert_eq!(app.stock("BK-12").await["reserved"], 3);
    app.teardown().await;
}

#[tokio::test]
async fn an_order_with_a_short_line_is_a_409_naming_it_and_reserves_nothing() {
    let app = spawn_app().await;

    let response = app
        .reserve_order(Uuid::new_v4(), &[("BK-12", 1), ("HD-44", 5)], None)
        .await;

    assert_eq!(response.status(), 409);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("JSON");
    // The one-line 409's fields, for the first short line, and every short line.
    assert_eq!(problem["sku"], "HD-44");
    assert_eq!(problem["requested"], 5);
    assert_eq!(problem["available"], 3);
    assert_eq!(
        problem["shortages"],
        json!([{"sku": "HD-44", "requested": 5, "available": 3}])
    );
    assert_eq!(app.stock("BK-12").await["reserved"], 0);
    assert_eq!(app.stock("HD-44").await["reserved"], 0);
    app.teardown().await;
}

#[tokio::test]
async fn an_order_with_an_unknown_sku_is_a_404_naming_it_and_reserves_nothing() {
    let app = spawn_app().await;

    let response = app
        .reserve_order(Uuid::new_v4(), &[("BK-12", 1), ("NOPE-2", 1)], None)
        .await;

    assert_eq!(response.status(), 404);
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["sku"], "NOPE-2");
    assert_eq!(app.stock("BK-12").await["reserved"], 0);
    app.teardown().await;
}

#[tokio::test]
async fn replaying_an_order_answers_the_same_reservations_and_reserves_once() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let key = order_id.to_string();
    let lines = [("TS-33", 1), ("ST-01", 4)];

    let first = app.reserve_order(order_id, &lines, Some(&key)).await;
    let replay = app.reserve_order(order_id, &lines, Some(&key)).await;
    let other = app
        .reserve_order(order_id, &[("TS-33", 1), ("ST-01", 5)], Some(&key))
        .await;

    assert_eq!(first.status(), 200);
    assert_eq!(replay.status(), 200);
    let first: Value = first.json().await.expect("JSON");
    assert_eq!(replay.json::<Value>().await.expect("JSON"), first);
    assert_eq!(other.status(), 422, "the key with another body");
    // The line's own key is the one a one-line call for the order carries.
    let line: Value = app
        .reserve("ST-01", 4, Some(&format!("{order_id}:ST-01")))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(line, first["reservations"][1]);
    assert_eq!(app.stock("TS-33").await["reserved"], 1);
    assert_eq!(app.stock("ST-01").await["reserved"], 4);
    app.teardown().await;
}

#[tokio::test]
async fn a_body_that_is_neither_one_line_nor_a_whole_order_is_a_422_saying_which_shapes_exist() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"sku": format!("S-{i}"), "qty": 1}))
        .collect();

    for (body, needle) in [
        (json!({}), "either one line"),
        (json!({"orderId": order_id}), "either one line"),
        (
            json!({"sku": "BK-12", "qty": 1, "orderId": order_id, "items": []}),
            "cannot be combined",
        ),
        (
            json!({"items": [{"sku": "BK-12", "qty": 1}]}),
            "needs its orderId",
        ),
        (
            json!({"orderId": order_id, "items": []}),
            "1 to 100 lines, got 0",
        ),
        (json!({"orderId": order_id, "items": many}), "got 101"),
        (
            json!({"orderId": order_id, "items": [{"sku": "BK-12", "qty": 1}, {"sku": "BK-12", "qty": 2}]}),
            "BK-12 appears more than once",
        ),
        (
            json!({"orderId": order_id, "items": [{"sku": "BK-12", "qty": 1}, {"sku": "MG-07", "qty": 0}]}),
            "items[1]: qty must be a positive integer",
        ),
        (
            json!({"orderId": order_id, "items": [{"sku": "BK-12"}]}),
            "qty",
        ),
    ] {
        let response = app.reserve_raw(body.to_string(), None).await;
        assert_eq!(response.status(), 422, "{body}");
        let problem: Value = response.json().await.expect("JSON");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "{body}: {detail}");
    }
    assert_eq!(app.stock("BK-12").await["reserved"], 0);
    app.teardown().await;
}
