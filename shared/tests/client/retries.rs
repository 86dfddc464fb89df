//! Which failures are retried, for which requests, how often, and within what budget.

use std::time::Duration;

use http::StatusCode;
use shared::client::{ClientError, ClientRequest, IDEMPOTENCY_KEY};
use shared::metrics::Metrics;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, received, refused_url};

#[tokio::test]
async fn transient_statuses_are_retried_until_the_dependency_answers() {
    for status in [500, 502, 503, 504, 429] {
        let upstream = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status))
            .up_to_n_times(2)
            .mount(&upstream)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true})))
            .mount(&upstream)
            .await;

        let response = client(config(&[&upstream]))
            .send(ClientRequest::get("/stock/BK-12"))
            .await
            .unwrap_or_else(|e| panic!("{status} should have been retried: {e}"));

        let body: serde_json::Value = response.json().expect("json");
        assert_eq!(body["ok"], true);
        assert_eq!(received(&upstream).await.len(), 3, "status {status}");
    }
}

#[tokio::test]
async fn a_persistent_failure_is_returned_after_max_attempts() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .expect(3)
        .mount(&upstream)
        .await;

    let error = client(config(&[&upstream]))
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect_err("always 500");

    assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    match error {
        ClientError::Status { body, .. } => assert_eq!(body, "boom"),
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn client_errors_and_not_implemented_are_not_retried() {
    for status in [400, 404, 409, 501] {
        let upstream = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status))
            .expect(1)
            .mount(&upstream)
            .await;

        let error = client(config(&[&upstream]))
            .send(ClientRequest::get("/stock/NOPE"))
            .await
            .expect_err("non-2xx");

        assert_eq!(error.status().map(|s| s.as_u16()), Some(status));
        assert!(!error.is_transient());
    }
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_the_next_instance() {
    let healthy = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&healthy)
        .await;
    let mut config = config(&[]);
    config.base_urls = vec![refused_url(), crate::helpers::url(&healthy)];

    let response = client(config)
        .send(ClientRequest::get("/stock/BK-12"))
        .await;

    assert!(response.is_ok(), "{response:?}");
}

#[tokio::test]
async fn an_unreachable_dependency_is_a_503_with_retry_after() {
    let mut config = config(&[]);
    config.base_urls = vec![refused_url()];

    let error = client(config)
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect_err("nothing listens");

    assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");
    let problem = error.to_problem();
    assert_eq!(problem.status, 503);
    assert_eq!(problem.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(problem.extensions["dependency"], "inventory");
}

#[tokio::test]
async fn a_post_without_idempotency_key_is_never_retried() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .expect(1)
        .mount(&upstream)
        .await;

    let error = client(config(&[&upstream]))
        .send(ClientRequest::post_json(
            "/reserve",
            &serde_json::json!({"sku": "BK-12", "qty": 1}),
        ))
        .await
        .expect_err("503");

    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn a_post_that_timed_out_without_idempotency_key_is_not_retried() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
        .expect(1)
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.attempt_timeout = Duration::from_millis(100);

    let error = client(config)
        .send(ClientRequest::post_json(
            "/reserve",
            &serde_json::json!({"sku": "BK-12"}),
        ))
        .await
        .expect_err("too slow");

    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert_eq!(error.to_problem().status, 504);
}

#[tokio::test]
async fn a_post_with_idempotency_key_is_retried_with_the_same_key() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&upstream)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;

    let request =
        ClientRequest::post_json("/reserve", &serde_json::json!({"sku": "BK-12", "qty": 1}))
            .idempotency_key("order-7:BK-12");
    client(config(&[&upstream]))
        .send(request)
        .await
        .expect("retried");

    let requests = received(&upstream).await;
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert_eq!(r.headers[&IDEMPOTENCY_KEY], "order-7:BK-12");
        assert_eq!(r.headers[http::header::CONTENT_TYPE], "application/json");
        assert_eq!(r.body, br#"{"qty":1,"sku":"BK-12"}"#);
    }
}

#[tokio::test]
async fn a_timed_out_get_is_retried() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
        .expect(3)
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.attempt_timeout = Duration::from_millis(100);

    let error = client(config)
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect_err("too slow");

    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn retry_after_is_honoured_before_retrying() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let started = tokio::time::Instant::now();

    client(config(&[&upstream]))
        .send(ClientRequest::get("/prices/BK-12"))
        .await
        .expect("second attempt succeeds");

    // The backoff alone is at most 5 ms; only Retry-After explains a full second.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(received(&upstream).await.len(), 2);
}

#[tokio::test]
async fn the_retry_budget_stops_retries_under_sustained_failure() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    // One retry per five calls, and no floor: 10 failing calls that each want one retry get 2.
    config.retry.max_attempts = 2;
    config.retry.budget_ratio = 0.2;
    config.retry.budget_min_per_sec = 0;
    let client = client(config);
    let metrics = Metrics::new("order");
    client.register_metrics(&metrics);

    for _ in 0..10 {
        let error = client
            .send(ClientRequest::get("/stock/BK-12"))
            .await
            .expect_err("500");
        assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    }

    assert_eq!(received(&upstream).await.len(), 10 + 2);
    let exposition = metrics.render();
    assert!(
        exposition
            .contains(r#"http_client_retries_total{service="order",dependency="inventory"} 2"#),
        "{exposition}"
    );
    assert!(
        exposition.contains(
            r#"http_client_budget_exhausted_total{service="order",dependency="inventory"} 8"#
        ),
        "{exposition}"
    );
}
