//! Hedged requests: a slow attempt gets company on another instance, within the retry budget.

use std::time::{Duration, Instant};

use shared::client::{ClientConfig, ClientRequest};
use shared::metrics::Metrics;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, received};

const HEDGE_DELAY: Duration = Duration::from_millis(50);

fn hedging(config: ClientConfig) -> ClientConfig {
    ClientConfig {
        hedge_delay: Some(HEDGE_DELAY),
        ..config
    }
}

async fn hanging_and_healthy() -> (MockServer, MockServer) {
    let (hanging, healthy) = (MockServer::start().await, MockServer::start().await);
    // Any method, any path.
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&hanging)
        .await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&healthy)
        .await;
    (hanging, healthy)
}

#[tokio::test]
async fn with_one_of_two_instances_hanging_a_get_and_a_keyed_post_answer_within_the_hedge_delay() {
    let (hanging, healthy) = hanging_and_healthy().await;
    let client = client(hedging(config(&[&hanging, &healthy])));

    for _ in 0..10 {
        for request in [
            ClientRequest::get("/stock/BK-12"),
            ClientRequest::post_json("/reserve", &serde_json::json!({"sku": "BK-12"}))
                .idempotency_key("order-1"),
        ] {
            let started = Instant::now();
            client.send(request).await.expect("the hedge answers");
            // The hedge delay plus a normal attempt, far from the 2 s attempt timeout.
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{:?}",
                started.elapsed()
            );
        }
    }
    // Every call was answered by the healthy instance, first or as a hedge.
    assert!(received(&healthy).await.len() >= 20);
}

#[tokio::test]
async fn a_slow_attempt_is_hedged_on_the_same_instance_when_it_is_the_only_one() {
    let upstream = MockServer::start().await;
    // The first request hangs, every later one answers at once.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let client = client(hedging(config(&[&upstream])));
    let metrics = Metrics::new("order");
    client.register_metrics(&metrics);

    let started = Instant::now();
    client
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect("hedged");

    assert!(started.elapsed() >= HEDGE_DELAY, "{:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(received(&upstream).await.len(), 2);
    assert!(
        metrics
            .render()
            .contains(r#"http_client_hedges_total{service="order",dependency="inventory"} 1"#),
        "{}",
        metrics.render()
    );
}

#[tokio::test]
async fn a_plain_post_is_never_hedged() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_millis(300)))
        .mount(&upstream)
        .await;
    let client = client(hedging(config(&[&upstream])));

    let started = Instant::now();
    client
        .send(ClientRequest::post_json("/orders", &serde_json::json!({})))
        .await
        .expect("slow but fine");

    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(received(&upstream).await.len(), 1);
}

#[tokio::test]
async fn with_every_instance_hanging_hedges_stop_when_the_budget_is_spent() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    for server in [&a, &b] {
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
            .mount(server)
            .await;
    }
    let mut config = hedging(config(&[&a, &b]));
    config.attempt_timeout = Duration::from_millis(100);
    // No share of calls funds retries or hedges, and each budget's floor is 10 over the 10 s
    // window.
    config.retry.budget_ratio = 0.0;
    config.retry.hedge_budget_ratio = 0.0;
    config.retry.budget_min_per_sec = 1;
    let client = client(config);

    for _ in 0..20 {
        let _ = client.send(ClientRequest::get("/stock/BK-12")).await;
    }

    // One first attempt per call, and exactly the ten hedges and ten retries the two budgets
    // had (three attempts per call would have been 60).
    let upstream_requests = received(&a).await.len() + received(&b).await.len();
    assert_eq!(upstream_requests, 20 + 10 + 10);
}

#[tokio::test]
async fn no_hedge_starts_once_the_deadline_leaves_the_callee_nothing() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&upstream)
        .await;
    let client = client(hedging(config(&[&upstream])));

    // At the hedge delay (50 ms) only 10 ms of the 60 ms are left, less than the 25 ms margin.
    let result = shared::deadline::scope(
        shared::deadline::Deadline::after(Duration::from_millis(60)),
        client.send(ClientRequest::get("/stock/BK-12")),
    )
    .await;

    assert!(result.is_err(), "{result:?}");
    assert_eq!(received(&upstream).await.len(), 1);
}
