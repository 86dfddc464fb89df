//! The trace of an order across the four **release binaries**, each a separate process exporting
//! over OTLP/HTTP to a receiver inside this test, and across RabbitMQ into both consumers, also
//! after the event waited in the outbox while the broker was away.
//!
//! It needs `cargo build --release` first, so `cargo test --workspace` skips it (ignored);
//! `.ci/run` runs it after the release build:
//!
//! ```text
//! cargo build --release && cargo test -p e2e --test trace -- --ignored --nocapture
//! ```
//!
//! The same binary checks the Grafana dashboard against a running stack (`dashboard.rs`).
//!
//! The services export with `OTEL_BSP_SCHEDULE_DELAY` at ten minutes, so no batch leaves on its
//! timer: every span the receiver gets was flushed on SIGTERM, which is what proves that shutdown
//! loses no finished span.

mod dashboard;
mod receiver;
#[allow(dead_code)] // the crash test's kill and restart are not used here
mod stack;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use receiver::{CLIENT, CONSUMER, PRODUCER, Receiver, SERVER, STATUS_ERROR, Span};
use serde_json::json;
use stack::{BrokerProxy, Stack};
use tokio::time::Instant;

/// The whole scenario's bound: it takes about ten seconds (most of it the relay's wait for the
/// broker); two minutes only expires when something hangs.
const SCENARIO_WITHIN: Duration = Duration::from_secs(120);
/// How long an asynchronous effect (a delivery, a reconnect, a gauge) may take: the relay's
/// backoff is at most 5 s and a publish waits up to the operation timeout, so 30 s only expires
/// on a real failure.
const EFFECT_WITHIN: Duration = Duration::from_secs(30);
/// No batch export on a timer during the test (see the module documentation).
const NO_TIMED_EXPORT_MS: u64 = 600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the release binaries: cargo build --release, then run with --ignored"]
async fn an_order_is_one_trace_across_four_processes_and_both_consumers_even_after_the_outbox() {
    tokio::time::timeout(SCENARIO_WITHIN, scenario())
        .await
        .expect("the scenario finished in time");
}

async fn scenario() {
    let receiver = Receiver::start().await;
    let proxy = BrokerProxy::start().await;
    let mut stack =
        Stack::start(Some((&receiver.endpoint, NO_TIMED_EXPORT_MS)), &proxy.url()).await;
    let http = reqwest::Client::new();

    // Order 1, with the broker up.
    place_order(&http, &stack).await;
    wait_until_both_consumers_applied(&http, &stack, 1).await;

    // Order 2 while order-service cannot reach the broker: the event waits in the outbox and
    // the relay's first publishes fail; then the broker comes back.
    proxy.cut();
    wait_for_metric(
        &http,
        &stack,
        "order",
        "messaging_broker_connected{",
        "",
        0.0,
    )
    .await;
    place_order(&http, &stack).await;
    wait_for_metric(&http, &stack, "order", "outbox_pending_rows{", "", 1.0).await;
    wait_for_metric(
        &http,
        &stack,
        "order",
        "messaging_publishes_total{",
        "disconnected",
        1.0,
    )
    .await;
    proxy.restore();
    wait_until_both_consumers_applied(&http, &stack, 2).await;

    stack.terminate().await;
    let spans = receiver.spans();
    let mut orders: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "gateway" && s.kind == SERVER && s.name == "POST /api/orders")
        .collect();
    orders.sort_by_key(|s| s.start_ns);
    assert_eq!(orders.len(), 2, "two orders, two traces");
    for (i, root) in orders.iter().enumerate() {
        let trace: Vec<&Span> = spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .collect();
        println!(
            "\norder {} — trace {}:\n{}",
            i + 1,
            root.trace_id,
            render(&trace)
        );
        check_trace(root, &trace);
    }
    let after_outage: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == orders[1].trace_id && s.kind == PRODUCER)
        .collect();
    assert!(
        after_outage.iter().any(|s| s.status == STATUS_ERROR),
        "the publishes that failed while the broker was away are in the trace"
    );
    stack.cleanup().await;
}

/// Places one order of one `BK-12` through the gateway.
pub(crate) async fn place_order(http: &reqwest::Client, stack: &Stack) {
    let response = http
        .post(stack.service("gateway").url("/api/orders"))
        .json(&json!({"items": [{"sku": "BK-12", "qty": 1}]}))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
}

/// Waits until inventory and pricing have each applied `events` deliveries of `order.placed`.
pub(crate) async fn wait_until_both_consumers_applied(
    http: &reqwest::Client,
    stack: &Stack,
    events: u32,
) {
    for consumer in ["inventory", "pricing"] {
        let family = "messaging_deliveries_total{";
        wait_for_metric(http, stack, consumer, family, "applied", f64::from(events)).await;
    }
}

/// Waits until the sum of `service`'s metric lines starting with `family` and containing `label`
/// reaches `at_least` (or, for `0.0`, is exactly zero).
pub(crate) async fn wait_for_metric(
    http: &reqwest::Client,
    stack: &Stack,
    service: &str,
    family: &str,
    label: &str,
    at_least: f64,
) {
    let deadline = Instant::now() + EFFECT_WITHIN;
    let url = stack.service(service).url("/metrics");
    loop {
        let text = match http.get(&url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(family) && l.contains(label))
            .collect();
        let sum: f64 = lines
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let reached = if at_least == 0.0 {
            !lines.is_empty() && sum == 0.0
        } else {
            sum >= at_least
        };
        if reached {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service}: {family}..{label} did not reach {at_least} within {EFFECT_WITHIN:?}: {lines:?}\n{}",
            stack::tail(&stack.service(service).log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The checks on one order's trace.
fn check_trace(root: &Span, trace: &[&Span]) {
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let parent = |span: &Span| by_id.get(span.parent.as_str()).copied();

    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["gateway", "inventory", "order", "pricing"]),
        "spans from all four services"
    );
    assert!(root.parent.is_empty(), "the gateway starts the trace");
    for span in trace {
        if span.span_id != root.span_id {
            assert!(
                parent(span).is_some(),
                "{} {} has its parent in the trace",
                span.service,
                span.name
            );
        }
    }

    // HTTP: every server span but the root answers one client attempt of its caller.
    let expected_caller = |service: &str| match service {
        "order" => "gateway",
        "pricing" | "inventory" => "order",
        other => panic!("unexpected server span in {other}"),
    };
    let servers: Vec<&&Span> = trace
        .iter()
        .filter(|s| s.kind == SERVER && s.span_id != root.span_id)
        .collect();
    assert!(
        servers
            .iter()
            .any(|s| s.service == "order" && s.name == "POST /orders"),
        "order-service's span"
    );
    for service in ["pricing", "inventory"] {
        assert!(
            servers.iter().any(|s| s.service == service),
            "{service}'s span"
        );
    }
    for server in &servers {
        let attempt = parent(server).expect("resolved above");
        assert_eq!(
            attempt.kind, CLIENT,
            "{} {} is called by an attempt",
            server.service, server.name
        );
        assert_eq!(attempt.service, expected_caller(&server.service));
    }
    let answered: Vec<&&Span> = trace
        .iter()
        .filter(|s| s.kind == CLIENT && s.attributes.contains_key("http.response.status_code"))
        .collect();
    for attempt in &answered {
        let children = servers
            .iter()
            .filter(|s| s.parent == attempt.span_id)
            .count();
        assert_eq!(
            children, 1,
            "one attempt, one server span: {}",
            attempt.name
        );
    }

    // AMQP: both consumers' spans are children of a successful publish by order-service.
    for consumer in ["inventory", "pricing"] {
        let process = trace
            .iter()
            .find(|s| {
                s.service == consumer && s.kind == CONSUMER && s.name == "process order.placed"
            })
            .unwrap_or_else(|| panic!("{consumer}'s consumer span joins the trace"));
        let publish = parent(process).expect("resolved above");
        assert_eq!(publish.kind, PRODUCER);
        assert_eq!(publish.service, "order");
        assert_eq!(publish.name, "publish order.placed");
        assert_ne!(
            publish.status, STATUS_ERROR,
            "consumed from a confirmed publish"
        );
        assert_eq!(
            process
                .attributes
                .get("messaging.system")
                .map(String::as_str),
            Some("rabbitmq")
        );
    }
}

/// The trace as an indented tree: service, kind, name and duration per span, children by start.
fn render(trace: &[&Span]) -> String {
    let mut out = String::new();
    let roots: Vec<&Span> = trace
        .iter()
        .filter(|s| !trace.iter().any(|p| p.span_id == s.parent))
        .copied()
        .collect();
    for root in roots {
        render_span(trace, root, 0, &mut out);
    }
    out
}

fn render_span(trace: &[&Span], span: &Span, depth: usize, out: &mut String) {
    let kind = match span.kind {
        SERVER => "server",
        CLIENT => "client",
        PRODUCER => "producer",
        CONSUMER => "consumer",
        _ => "internal",
    };
    let failed = if span.status == STATUS_ERROR {
        "  ✗"
    } else {
        ""
    };
    out.push_str(&format!(
        "{:indent$}{:<9} {:<8} {:<28} {:>8.2} ms{failed}\n",
        "",
        span.service,
        kind,
        span.name,
        span.millis(),
        indent = depth * 2
    ));
    let mut children: Vec<&Span> = trace
        .iter()
        .filter(|s| s.parent == span.span_id)
        .copied()
        .collect();
    children.sort_by_key(|s| s.start_ns);
    for child in children {
        render_span(trace, child, depth + 1, out);
    }
}
