//! Events through the real RabbitMQ: an order committed at inventory and counted at pricing, a
//! price change reaching order-service's cache, and a broker link cut in the middle of the flow.

use serde_json::Value;

use crate::assert_eventually;
use crate::helpers::{
    Service, TestStack, logs_for, new_correlation_id, placed_events_applied, spawn_stack,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_placed_order_is_eventually_committed_at_inventory_and_counted_at_pricing() {
    let stack = spawn_stack().await;
    let sold_before = stack.price("TS-33").await["unitsSold"]
        .as_u64()
        .expect("a count");

    let order = stack.placed(&[("TS-33", 4)]).await;

    assert_eventually!(
        stack.stock("TS-33").await
            == serde_json::json!({ "sku": "TS-33", "onHand": 21, "reserved": 0, "available": 21 }),
        "the reservation is committed: {}",
        stack.stock("TS-33").await
    );
    assert_eventually!(
        stack.price("TS-33").await["unitsSold"] == sold_before + 4,
        "pricing counts the units sold: {}",
        stack.price("TS-33").await
    );
    let id = order["id"].as_str().expect("an id");
    assert_eq!(placed_events_applied(id), 1);

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_price_reaches_the_order_cache_which_prices_orders_while_pricing_is_down() {
    let mut stack = spawn_stack().await;
    let correlation_id = new_correlation_id();

    let response = stack
        .price_change("BK-12", 35.0)
        .header("x-correlation-id", &correlation_id)
        .send()
        .await
        .expect("PUT /api/prices/BK-12");
    assert_eq!(response.status(), 200);
    assert_eventually!(
        logs_for(&correlation_id)
            .iter()
            .any(|l| l["service"] == "order" && l["msg"] == "price cache refreshed"),
        "order-service consumed price.changed"
    );

    stack.stop(Service::Pricing).await;
    let order = stack.placed(&[("BK-12", 2)]).await;

    let line = &order["lines"][0];
    assert_eq!(line["priceSource"], "cache");
    assert_eq!(line["unitPrice"], serde_json::json!(35.0));
    assert_eq!(order["pricedFromCache"], true);
    assert_eq!(order["total"], serde_json::json!(70.0));

    stack.teardown().await;
}

/// Places `count` orders of one ST-01 each, asserting each is accepted, and returns their IDs.
async fn place_sticker_orders(stack: &TestStack, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let order = stack.placed(&[("ST-01", 1)]).await;
        ids.push(order["id"].as_str().expect("an id").to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_placed_while_the_broker_links_are_cut_are_committed_exactly_once_after_restore() {
    let stack = spawn_stack().await;

    let mut ids = place_sticker_orders(&stack, 3).await;
    // Cut right behind the last order: its event is likely still on its way.
    stack.broker_link(Service::Order).sever().await;
    stack.broker_link(Service::Inventory).sever().await;
    assert_eventually!(
        !stack.is_ready(Service::Order).await && !stack.is_ready(Service::Inventory).await,
        "order-service and inventory report not ready without their broker"
    );
    let (_, report) = stack.readiness(Service::Order).await;
    assert_eq!(report["checks"]["broker"]["ok"], false, "{report}");

    let during_cut = place_sticker_orders(&stack, 3).await;
    let stock = stack.stock("ST-01").await;
    assert!(
        stock["reserved"].as_u64() >= Some(3),
        "orders placed during the cut hold their reservations, uncommitted: {stock}"
    );
    ids.extend(during_cut);

    stack.broker_link(Service::Order).restore().await;
    stack.broker_link(Service::Inventory).restore().await;
    ids.extend(place_sticker_orders(&stack, 3).await);

    assert_eventually!(
        stack.is_ready(Service::Order).await && stack.is_ready(Service::Inventory).await,
        "both reconnect by themselves"
    );
    assert_eventually!(
        stack.stock("ST-01").await
            == serde_json::json!({ "sku": "ST-01", "onHand": 491, "reserved": 0, "available": 491 }),
        "all nine orders are committed: {}",
        stack.stock("ST-01").await
    );
    assert_eventually!(
        ids.iter().all(|id| placed_events_applied(id) >= 1),
        "inventory logged every commit"
    );
    let applied: Vec<usize> = ids.iter().map(|id| placed_events_applied(id)).collect();
    assert_eq!(applied, vec![1; 9], "each order committed exactly once");

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_reports_the_broker_connection() {
    let stack = spawn_stack().await;
    let (status, report): (u16, Value) = stack.readiness(Service::Inventory).await;
    assert_eq!(status, 200);
    assert_eq!(report["checks"]["broker"]["ok"], true, "{report}");

    stack.broker_link(Service::Inventory).sever().await;
    assert_eventually!(
        stack.readiness(Service::Inventory).await.0 == 503,
        "inventory is not ready while cut off from the broker"
    );
    stack.broker_link(Service::Inventory).restore().await;
    assert_eventually!(
        stack.is_ready(Service::Inventory).await,
        "inventory is ready again once the link is back"
    );

    stack.teardown().await;
}
