//! Every metric the Grafana dashboard queries is exposed by a running service: the four release
//! binaries serve one order, then their `/metrics` are read and compared with the dashboard JSON.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::stack::{Stack, amqp_url};
use crate::{place_order, wait_until_both_consumers_applied};

const DASHBOARD: &str = "../deploy/observability/grafana/dashboards/services.json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the release binaries: cargo build --release, then run with --ignored"]
async fn every_metric_the_dashboard_queries_is_exposed_by_a_running_service() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("reads"))
        .expect("the dashboard is valid JSON");
    let queried = queried_metrics(&dashboard);
    assert!(
        queried.len() >= 10,
        "the dashboard queries metrics: {queried:?}"
    );

    // Two minutes bound the run; it takes a few seconds.
    let exposed = tokio::time::timeout(Duration::from_secs(120), exposed_after_one_order())
        .await
        .expect("the stack served an order in time");
    let missing: Vec<&String> = queried.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "queried but exposed by no service: {missing:?}"
    );
}

/// Metric names in the dashboard's queries: every identifier directly followed by a `{` selector
/// (each query names its metrics that way, so function names and `by (...)` labels never match).
fn queried_metrics(dashboard: &Value) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    collect_exprs(dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has queries");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let found = selectors(&expr);
        assert!(
            !found.is_empty(),
            "{expr:?} names its metrics with a {{...}} selector"
        );
        names.extend(found);
    }
    names
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn selectors(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut start = None;
    for (i, &b) in bytes.iter().enumerate() {
        let ident = b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        match (ident, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if b == b'{' {
                    names.push(expr[s..i].to_owned());
                }
                start = None;
            }
            _ => {}
        }
    }
    names
}

/// Sample names in every service's `/metrics` after one order went all the way through.
async fn exposed_after_one_order() -> BTreeSet<String> {
    let mut stack = Stack::start(None, &amqp_url()).await;
    let http = reqwest::Client::new();
    place_order(&http, &stack).await;
    wait_until_both_consumers_applied(&http, &stack, 1).await;
    let mut exposed = BTreeSet::new();
    for service in &stack.services {
        let text = http
            .get(service.url("/metrics"))
            .send()
            .await
            .expect("serves /metrics")
            .text()
            .await
            .expect("text");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            exposed.insert(line[..end].to_owned());
        }
    }
    stack.terminate().await;
    stack.cleanup().await;
    exposed
}

#[test]
fn selectors_are_the_identifiers_before_a_brace() {
    assert_eq!(
        selectors(
            r#"histogram_quantile(0.5, sum by (service, le) (rate(a_bucket{x="1"}[5m]))) / b{}"#
        ),
        vec!["a_bucket", "b"]
    );
}
