//! One correlation ID, sent by the client, found in the log lines of every hop of its request:
//! the HTTP hops (gateway → order → pricing and inventory) and the AMQP hops (order.placed →
//! inventory and pricing consumers).

use serde_json::Value;

use crate::assert_eventually;
use crate::helpers::{Service, logs_for, new_correlation_id, spawn_stack};

/// Whether `lines` hold one from `service` whose `msg` is `msg`.
fn has_line(lines: &[Value], service: &str, msg: &str) -> bool {
    lines
        .iter()
        .any(|line| line["service"] == service && line["msg"] == msg)
}

/// The services and messages of `lines`, for failure messages.
fn summary(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| format!("{}: {}", line["service"], line["msg"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_correlation_id_appears_in_the_log_lines_of_every_http_hop() {
    let stack = spawn_stack().await;
    let correlation_id = new_correlation_id();

    let response = stack
        .order_request(&[("BK-12", 1)])
        .header("x-correlation-id", &correlation_id)
        .send()
        .await
        .expect("POST /api/orders");

    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["x-correlation-id"],
        correlation_id.as_str(),
        "the ID is echoed"
    );
    let lines = logs_for(&correlation_id);
    let expected = [
        (Service::Gateway, "POST /api/orders"),
        (Service::Order, "POST /orders"),
        (Service::Pricing, "GET /prices/BK-12"),
        (Service::Inventory, "POST /reserve"),
    ];
    for (svc, msg) in expected {
        assert!(
            has_line(&lines, svc.name(), msg),
            "{} logged `{msg}` with the client's correlation ID; its lines: {:#?}",
            svc.name(),
            summary(&lines)
        );
    }

    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_correlation_id_appears_in_the_consumers_log_lines_of_the_events_it_caused() {
    let stack = spawn_stack().await;
    let correlation_id = new_correlation_id();

    let response = stack
        .order_request(&[("MG-07", 2)])
        .header("x-correlation-id", &correlation_id)
        .send()
        .await
        .expect("POST /api/orders");
    assert_eq!(response.status(), 201);

    // The effects first (cheap to poll), then the log lines written while causing them.
    assert_eventually!(
        stack.stock("MG-07").await["onHand"] == 48 && stack.price("MG-07").await["unitsSold"] == 2,
        "order.placed is committed at inventory and counted at pricing"
    );
    assert_eventually!(
        {
            let lines = logs_for(&correlation_id);
            has_line(&lines, Service::Inventory.name(), "order event applied")
                && has_line(&lines, Service::Pricing.name(), "units sold recorded")
        },
        "the consumers logged their work with the client's correlation ID; its lines: {:#?}",
        summary(&logs_for(&correlation_id))
    );
    let lines = logs_for(&correlation_id);
    let committed = lines
        .iter()
        .find(|l| l["service"] == "inventory" && l["msg"] == "order event applied")
        .expect("found above");
    assert_eq!(committed["event"], "order.placed");

    stack.teardown().await;
}
