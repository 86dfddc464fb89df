//! Cancelling orders.

use serde_json::Value;
use uuid::Uuid;

use crate::helpers::spawn_app;

#[tokio::test]
async fn cancelling_an_order_marks_it_cancelled_and_publishes_order_cancelled_once() {
    let app = spawn_app().await;
    app.given_price("BK-12", 39.90).await;
    let reservation = app.given_stock("BK-12").await;
    let order = app.placed(&[("BK-12", 1)]).await;
    let id = order["id"].as_str().expect("an id");

    let first = app.cancel(id).await;
    let second = app.cancel(id).await;

    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let first: Value = first.json().await.expect("order JSON");
    let second: Value = second.json().await.expect("order JSON");
    assert_eq!(first["status"], "cancelled");
    assert_eq!(second, first);
    let read: Value = app.get_order(id).await.json().await.expect("order JSON");
    assert_eq!(read["status"], "cancelled");

    let event = app.wait_for_event("order.cancelled", id).await;
    assert_eq!(event["lines"][0]["reservationId"], reservation.to_string());
    // The outbox is relayed in order: once a later order's cancellation has arrived, a duplicate
    // of the first one would have arrived before it.
    let marker = app.placed(&[("BK-12", 1)]).await;
    let marker_id = marker["id"].as_str().expect("an id");
    assert_eq!(app.cancel(marker_id).await.status(), 200);
    app.wait_for_event("order.cancelled", marker_id).await;
    assert_eq!(app.events_for("order.cancelled", id).len(), 1);
    app.teardown().await;
}

#[tokio::test]
async fn cancelling_an_unknown_order_is_404() {
    let app = spawn_app().await;

    let response = app.cancel(&Uuid::new_v4().to_string()).await;

    assert_eq!(response.status(), 404);
    app.teardown().await;
}
