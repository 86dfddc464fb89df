//! The `http_client_*` metric families and the `/readyz` check.

use shared::client::{BreakerState, ClientRequest};
use shared::metrics::Metrics;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config};

#[tokio::test]
async fn several_clients_share_one_family_per_metric() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&upstream)
        .await;
    let mut pricing = config(&[&upstream]);
    pricing.name = "pricing";
    pricing.retry.max_attempts = 2;
    // One failed call (both attempts failed) opens it.
    pricing.breaker.failure_threshold = 1;
    let pricing = client(pricing);
    let inventory = client(config(&[&upstream]));
    let metrics = Metrics::new("order");
    pricing.register_metrics(&metrics);
    inventory.register_metrics(&metrics);

    let _ = pricing.send(ClientRequest::get("/prices/BK-12")).await;
    assert_eq!(pricing.breaker_state(), BreakerState::Open);
    let _ = pricing.send(ClientRequest::get("/prices/BK-12")).await;

    let text = metrics.render();
    let instance = upstream.uri().trim_start_matches("http://").to_owned();
    for family in [
        "http_client_breaker_state",
        "http_client_requests",
        "http_client_retries",
        "http_client_budget_exhausted",
        "http_client_hedges",
        "http_client_instance_ejected",
        "http_client_instance_in_flight",
        "http_client_instance_attempts",
    ] {
        let declared = format!("# TYPE {family} ");
        assert_eq!(text.matches(&declared).count(), 1, "{family} once:\n{text}");
    }
    for line in [
        r#"http_client_breaker_state{service="order",dependency="pricing"} 2"#,
        r#"http_client_breaker_state{service="order",dependency="inventory"} 0"#,
        r#"http_client_requests_total{service="order",dependency="pricing",outcome="server_error"} 1"#,
        r#"http_client_requests_total{service="order",dependency="pricing",outcome="circuit_open"} 1"#,
        r#"http_client_requests_total{service="order",dependency="inventory",outcome="success"} 0"#,
        r#"http_client_retries_total{service="order",dependency="pricing"} 1"#,
        r#"http_client_hedges_total{service="order",dependency="pricing"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
    for line in [
        format!(
            r#"http_client_instance_ejected{{service="order",dependency="pricing",instance="{instance}"}} 0"#
        ),
        format!(
            r#"http_client_instance_in_flight{{service="order",dependency="pricing",instance="{instance}"}} 0"#
        ),
        format!(
            r#"http_client_instance_attempts_total{{service="order",dependency="pricing",instance="{instance}",result="failure"}} 2"#
        ),
    ] {
        assert!(text.contains(&line), "missing {line}:\n{text}");
    }
}

#[tokio::test]
async fn the_health_check_reports_the_breaker_as_information() {
    let upstream = MockServer::start().await;
    let client = client(config(&[&upstream]));

    let check = client.health_check();

    assert!(check.ok);
    assert_eq!(check.detail["dependency"], "inventory");
    assert_eq!(check.detail["breaker"], "closed");
    let instances = check.detail["instances"].as_array().expect("a list");
    assert_eq!(instances.len(), 1);
    assert_eq!(
        instances[0]["address"],
        upstream.uri().trim_start_matches("http://")
    );
    assert_eq!(instances[0]["state"], "eligible");
    assert_eq!(instances[0]["inFlight"], 0);
}
