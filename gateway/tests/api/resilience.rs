//! Upstream trouble never becomes a hang: timeouts answer 504 within the budget, and a failing
//! dependency's breaker opens so later calls fail fast without reaching it.

use std::time::{Duration, Instant};

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{assert_problem, spawn_app_with, unreachable_url};

#[tokio::test]
async fn a_hanging_upstream_is_a_504_problem_within_the_budget() {
    let budget = Duration::from_millis(400);
    let app = spawn_app_with(|s| s.request_budget = budget).await;
    Mock::given(method("GET"))
        .and(path("/orders/o-1"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&app.order)
        .await;

    let started = Instant::now();
    let response = app.get("/api/orders/o-1").send().await.expect("request");
    let elapsed = started.elapsed();

    assert_problem(response, 504).await;
    // The answer is due at the budget; the slack covers scheduling on a busy test machine only.
    assert!(
        elapsed < budget + Duration::from_millis(300),
        "took {elapsed:?}"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_503_problem() {
    let dead = unreachable_url().await;
    let app = spawn_app_with(|s| s.order.base_urls = vec![dead]).await;

    let response = app.get("/api/orders/o-1").send().await.expect("request");

    assert_problem(response, 503).await;
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_then_fails_fast() {
    let app = spawn_app_with(|s| {
        s.pricing.retry.max_attempts = 1;
        s.pricing.breaker.failure_threshold = 3;
        // Open far longer than the test runs, so no half-open probe reaches the upstream.
        s.pricing.breaker.open_for = Duration::from_secs(60);
    })
    .await;
    // Every request carries one correlation ID, so only this test's calls are counted upstream.
    let id = "breaker-test";
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&app.pricing)
        .await;
    let calls_upstream = || async {
        let received = app.pricing.received_requests().await.expect("recording");
        received
            .iter()
            .filter(|r| r.headers.get("x-correlation-id").is_some_and(|v| v == id))
            .count()
    };
    let get_price = || {
        app.get("/api/prices/BK-12")
            .header("x-correlation-id", id)
            .send()
    };

    // Failures are answered 502 until the breaker opens; then 503 without calling pricing.
    let mut opened = false;
    for _ in 0..10 {
        let response = get_price().await.expect("request");
        if response.status().as_u16() == 503 {
            assert!(response.headers().contains_key("retry-after"));
            opened = true;
            break;
        }
        assert_problem(response, 502).await;
    }
    assert!(opened, "the breaker never opened");
    let calls = calls_upstream().await;
    assert!(calls >= 3, "opened after {calls} upstream calls");

    for _ in 0..5 {
        let started = Instant::now();
        let response = get_price().await.expect("request");
        assert!(started.elapsed() < Duration::from_millis(200), "not fast");
        assert!(response.headers().contains_key("retry-after"));
        let body = assert_problem(response, 503).await;
        assert!(body["correlationId"].is_string());
    }
    let later = calls_upstream().await;
    assert_eq!(later, calls, "an open breaker must not call the upstream");

    let ready = app.get("/readyz").send().await.expect("request");
    assert_eq!(ready.status().as_u16(), 200, "breakers are informational");
    let report: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(report["checks"]["pricing"]["ok"], false, "{report}");
}

#[tokio::test]
async fn a_busy_upstream_is_a_503_problem_with_retry_after_not_a_429() {
    let app = spawn_app_with(|s| s.order.retry.max_attempts = 1).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "7"))
        .expect(1)
        .mount(&app.order)
        .await;

    let response = app.get("/api/orders/o-1").send().await.expect("request");

    assert_eq!(response.headers()["retry-after"], "7");
    let body = assert_problem(response, 503).await;
    assert_eq!(body["dependency"], "order");
}
