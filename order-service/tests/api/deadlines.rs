//! Request deadlines: no work without budget, no answer later than the budget.

use std::time::{Duration, Instant};

use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{assert_eventually, order_body, reserve_mock, spawn_app};

#[tokio::test]
async fn a_request_without_budget_left_is_504_without_calling_downstream() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    app.given_stock("BK-12").await;

    let response = app
        .post_order_raw(
            order_body(&[("BK-12", 1)]),
            &[("x-request-timeout-ms", "0")],
        )
        .await;

    assert_eq!(response.status(), 504);
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

#[tokio::test]
async fn a_hanging_inventory_is_answered_with_a_timely_504() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    // Far longer than the request's budget: only the deadline can end the wait.
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&app.inventory)
        .await;
    let budget = Duration::from_millis(400);

    let started = Instant::now();
    let response = app
        .post_order_raw(
            order_body(&[("BK-12", 1)]),
            &[("x-request-timeout-ms", "400")],
        )
        .await;
    let elapsed = started.elapsed();

    assert_eq!(response.status(), 504);
    // The budget plus generous slack for a loaded CI machine, far below the 30 s hang.
    assert!(
        elapsed < budget + Duration::from_secs(1),
        "took {elapsed:?}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_reservation_whose_answer_never_came_is_looked_up_by_its_key_and_released() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    // The first reserve and its hedges (a keyed POST is hedged: at most three attempts) hang past
    // the budget, so its outcome is unknown to order-service; the replay with the same
    // idempotency key reveals the reservation.
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .up_to_n_times(3)
        .mount(&app.inventory)
        .await;
    let reservation = Uuid::new_v4();
    reserve_mock("BK-12", reservation)
        .mount(&app.inventory)
        .await;
    app.given_releases_succeed().await;

    let response = app
        .post_order_raw(
            order_body(&[("BK-12", 1)]),
            &[("x-request-timeout-ms", "300")],
        )
        .await;

    assert_eq!(response.status(), 504);
    assert_eventually("the unseen reservation is released", || async {
        app.released().await == [reservation.to_string()]
    })
    .await;
    let keys: Vec<String> = app
        .inventory_calls("/reserve")
        .await
        .iter()
        .map(|(request, _)| {
            request.headers["idempotency-key"]
                .to_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert!(keys.len() >= 2, "{keys:?}");
    assert!(
        keys.iter().all(|key| *key == keys[0]),
        "hedges and the lookup replay the same key: {keys:?}"
    );
    app.teardown().await;
}
