//! A dependency that is down, one that hangs, and one that fails now and then: the client always
//! gets a bounded answer, breakers open and shed load, the path recovers, and retries never take
//! stock twice.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use crate::assert_eventually;
use crate::helpers::{FaultPlan, Service, StackBuilder, logs_for, new_correlation_id};

/// The gateway's default edge budget (`REQUEST_BUDGET_MS`): no answer may take longer.
const EDGE_BUDGET: Duration = Duration::from_secs(5);

/// A call refused by an open breaker involves no network wait at all, only two local hops; half a
/// second is generous on a loaded test machine and still far below any timeout in the stack.
const FAIL_FAST: Duration = Duration::from_millis(500);

async fn inventory_breaker_at_order(stack: &crate::helpers::TestStack) -> String {
    let (_, report) = stack.readiness(Service::Order).await;
    report["checks"]["inventory"]["detail"]["breaker"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_inventory_stopped_orders_fail_in_time_then_fast_and_recover_when_it_returns() {
    // A one-second open window: long enough to observe the open breaker, short enough that
    // recovery shows up quickly once inventory is back.
    let mut stack = StackBuilder::new()
        .durable()
        .env("BREAKER_OPEN_MS", 1000)
        .spawn()
        .await;
    stack.placed(&[("BK-12", 1)]).await;
    stack.stop(Service::Inventory).await;

    let started = Instant::now();
    let response = stack.place_order(&[("BK-12", 1)]).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503, "inventory unreachable → 503");
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        elapsed < EDGE_BUDGET,
        "answered within the edge budget: {elapsed:?}"
    );

    // Each failed order is one failed call of order-service's inventory client (its three attempts
    // all refused); the breaker opens at five consecutive failed calls, so within a few orders.
    for _ in 0..5 {
        if inventory_breaker_at_order(&stack).await == "open" {
            break;
        }
        let response = stack.place_order(&[("BK-12", 1)]).await;
        assert!(response.status().is_server_error());
    }
    assert_eq!(inventory_breaker_at_order(&stack).await, "open");
    let metrics = stack.metrics(Service::Order).await;
    let gauge = metrics
        .lines()
        .find(|l| {
            l.starts_with("http_client_breaker_state{") && l.contains(r#"dependency="inventory""#)
        })
        .unwrap_or_else(|| panic!("the breaker state is exported: {metrics}"));
    assert!(gauge.ends_with(" 2"), "2 means open: {gauge}");

    let started = Instant::now();
    let response = stack.place_order(&[("BK-12", 1)]).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().contains_key("retry-after"),
        "a fast failure tells the client when to come back"
    );
    assert!(
        elapsed < FAIL_FAST,
        "the open breaker fails fast: {elapsed:?}"
    );

    // order-service answered every one of those 503s itself and named inventory as the cause, so
    // the gateway's breaker for order stays closed: reading orders still works.
    let (_, gateway) = stack.readiness(Service::Gateway).await;
    assert_eq!(
        gateway["checks"]["order"]["detail"]["breaker"], "closed",
        "a failure behind order-service does not open the gateway's breaker for it: {gateway}"
    );
    let problem: Value = stack
        .place_order(&[("BK-12", 1)])
        .await
        .json()
        .await
        .expect("problem JSON");
    assert_eq!(problem["dependency"], "inventory", "{problem}");

    stack.restart(Service::Inventory).await;
    assert_eventually!(
        stack.place_order(&[("BK-12", 1)]).await.status() == 201,
        "orders are placed again once inventory is back"
    );
    assert_eventually!(
        inventory_breaker_at_order(&stack).await == "closed",
        "the breaker closes again"
    );

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_inventory_gets_the_client_a_timely_504_from_order_service_not_the_gateway() {
    // A short edge budget keeps the test quick; order-service's 300 ms attempts (three of them,
    // with backoff, about a second) fit inside what the gateway forwards of it.
    let edge_budget = Duration::from_millis(1500);
    let stack = StackBuilder::new()
        .hanging_inventory()
        .env_for(
            Service::Gateway,
            "REQUEST_BUDGET_MS",
            edge_budget.as_millis(),
        )
        .env_for(Service::Order, "HTTP_ATTEMPT_TIMEOUT_MS", 300)
        .spawn()
        .await;
    let correlation_id = new_correlation_id();

    let started = Instant::now();
    let response = stack
        .order_request(&[("BK-12", 1)])
        .header("x-correlation-id", &correlation_id)
        .send()
        .await
        .expect("POST /api/orders");
    let elapsed = started.elapsed();

    assert_eq!(response.status(), 504);
    // Scheduling slack on a loaded machine; the point is that nobody waits for the hang.
    assert!(
        elapsed < edge_budget + Duration::from_millis(250),
        "the client got its answer within the edge budget: {elapsed:?}"
    );
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["correlationId"], correlation_id.as_str());
    assert_eq!(
        problem["detail"], "order answered 504 because inventory failed",
        "the gateway relays order-service's 504 rather than timing out itself: {problem}"
    );
    assert_eq!(
        problem["dependency"], "inventory",
        "the root cause is named"
    );
    // order-service itself answered (its own 504, logged with the client's correlation ID).
    let lines = logs_for(&correlation_id);
    let at_order = lines
        .iter()
        .find(|l| l["service"] == "order" && l["msg"] == "POST /orders")
        .unwrap_or_else(|| panic!("order-service logged its answer: {lines:#?}"));
    assert_eq!(at_order["status"], 504);

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn under_thirty_percent_injected_failures_every_order_succeeds_and_no_unit_is_reserved_twice()
{
    let stack = StackBuilder::new()
        .faulty_inventory(FaultPlan::fail(3, 10))
        .spawn()
        .await;
    // One reserve call per order (its lines are reserved together), so 20 orders make at least
    // 20 calls through the proxy and at least 6 of them fail.
    let orders = 20;

    for _ in 0..orders {
        let response = stack
            .order_request(&[("BK-12", 2), ("MG-07", 1)])
            .header("idempotency-key", Uuid::new_v4().to_string())
            .send()
            .await
            .expect("POST /api/orders");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(
            status, 201,
            "every order succeeds despite the faults: {body}"
        );
    }

    assert!(
        stack.faults().injected() >= 6,
        "faults were injected: {} of {} requests",
        stack.faults().injected(),
        stack.faults().seen()
    );
    // Reserved or already committed, the units taken equal the units ordered.
    assert_eq!(stack.stock("BK-12").await["available"], 100 - 2 * orders);
    assert_eq!(stack.stock("MG-07").await["available"], 50 - orders);
    // Once every order.placed is committed nothing stays reserved: a duplicate reservation
    // would linger until its TTL.
    assert_eventually!(
        stack.stock("BK-12").await["reserved"] == 0 && stack.stock("MG-07").await["reserved"] == 0,
        "every reservation is committed and none is left over: {} {}",
        stack.stock("BK-12").await,
        stack.stock("MG-07").await
    );
    assert_eq!(stack.stock("BK-12").await["onHand"], 100 - 2 * orders);
    assert_eq!(stack.stock("MG-07").await["onHand"], 50 - orders);

    stack.teardown().await;
}
