//! The circuit breaker in front of a real upstream: trips, fails fast, probes, recovers.

use std::time::Duration;

use http::StatusCode;
use shared::client::{BreakerState, ClientError, ClientRequest, ResilientClient};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, jump_clock, received};

const OPEN_FOR: Duration = Duration::from_secs(5);

/// A client that opens after 3 failed attempts and retries nothing, so attempts = calls.
fn fragile_client(upstream: &MockServer) -> ResilientClient {
    let mut config = config(&[upstream]);
    config.retry.max_attempts = 1;
    config.breaker.failure_threshold = 3;
    config.breaker.open_for = OPEN_FOR;
    client(config)
}

async fn failing(upstream: &MockServer) {
    upstream.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(upstream)
        .await;
}

async fn healthy(upstream: &MockServer, delay: Duration) {
    upstream.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(delay))
        .mount(upstream)
        .await;
}

async fn trip(client: &ResilientClient) {
    for _ in 0..3 {
        let error = client
            .send(ClientRequest::get("/prices/BK-12"))
            .await
            .expect_err("500");
        assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    }
    assert_eq!(client.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn an_open_breaker_fails_fast_without_calling_the_dependency() {
    let upstream = MockServer::start().await;
    failing(&upstream).await;
    let client = fragile_client(&upstream);

    trip(&client).await;
    let error = client
        .send(ClientRequest::get("/prices/BK-12"))
        .await
        .expect_err("open");

    match error {
        ClientError::CircuitOpen { retry_after, .. } => {
            assert!(retry_after <= OPEN_FOR && retry_after > OPEN_FOR - Duration::from_secs(1));
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    assert_eq!(received(&upstream).await.len(), 3);
    let check = client.health_check();
    assert!(!check.ok);
    assert_eq!(check.detail["breaker"], "open");
}

#[tokio::test]
async fn client_errors_do_not_trip_the_breaker() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&upstream)
        .await;
    let client = fragile_client(&upstream);

    for _ in 0..10 {
        let _ = client.send(ClientRequest::get("/prices/NOPE")).await;
    }

    assert_eq!(client.breaker_state(), BreakerState::Closed);
    assert!(client.health_check().ok);
}

#[tokio::test]
async fn after_open_for_a_successful_probe_closes_the_breaker() {
    let upstream = MockServer::start().await;
    failing(&upstream).await;
    let client = fragile_client(&upstream);
    trip(&client).await;

    healthy(&upstream, Duration::ZERO).await;
    jump_clock(OPEN_FOR).await;
    assert_eq!(client.breaker_state(), BreakerState::HalfOpen);
    client
        .send(ClientRequest::get("/prices/BK-12"))
        .await
        .expect("probe succeeds");

    assert_eq!(client.breaker_state(), BreakerState::Closed);
    assert_eq!(received(&upstream).await.len(), 1);
}

#[tokio::test]
async fn after_open_for_a_failed_probe_reopens_the_breaker() {
    let upstream = MockServer::start().await;
    failing(&upstream).await;
    let client = fragile_client(&upstream);
    trip(&client).await;

    jump_clock(OPEN_FOR).await;
    let probe = client.send(ClientRequest::get("/prices/BK-12")).await;
    let next = client.send(ClientRequest::get("/prices/BK-12")).await;

    assert_eq!(
        probe.expect_err("still failing").status(),
        Some(StatusCode::INTERNAL_SERVER_ERROR)
    );
    assert!(
        matches!(next, Err(ClientError::CircuitOpen { .. })),
        "{next:?}"
    );
    assert_eq!(client.breaker_state(), BreakerState::Open);
    // Three calls that tripped it and the one probe; the call after the probe was never sent.
    assert_eq!(received(&upstream).await.len(), 4);
}

#[tokio::test]
async fn half_open_lets_only_one_probe_through_at_a_time() {
    let upstream = MockServer::start().await;
    failing(&upstream).await;
    let client = fragile_client(&upstream);
    trip(&client).await;

    // The probe takes a while, so the second call arrives while it is in flight.
    healthy(&upstream, Duration::from_millis(200)).await;
    jump_clock(OPEN_FOR).await;
    let (probe, second) = tokio::join!(
        client.send(ClientRequest::get("/prices/BK-12")),
        client.send(ClientRequest::get("/prices/BK-12")),
    );

    assert!(probe.is_ok(), "{probe:?}");
    assert!(
        matches!(second, Err(ClientError::CircuitOpen { .. })),
        "{second:?}"
    );
    assert_eq!(received(&upstream).await.len(), 1);
    assert_eq!(client.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_timeout_counts_against_the_dependency_only_if_it_had_its_full_attempt_timeout() {
    let upstream = MockServer::start().await;
    healthy(&upstream, Duration::from_secs(5)).await;
    let mut config = config(&[&upstream]);
    config.retry.max_attempts = 1;
    config.breaker.failure_threshold = 1;
    config.attempt_timeout = Duration::from_millis(200);
    let client = client(config);

    // Cut short by the caller's 100 ms deadline: the dependency never had a fair chance.
    let clipped = shared::deadline::scope(
        shared::deadline::Deadline::after(Duration::from_millis(100)),
        client.send(ClientRequest::get("/prices/BK-12")),
    )
    .await;
    assert!(
        matches!(clipped, Err(ClientError::Timeout { .. })),
        "{clipped:?}"
    );
    assert_eq!(client.breaker_state(), BreakerState::Closed);

    // Silent for the whole attempt timeout: that is the dependency's failure.
    let full = client.send(ClientRequest::get("/prices/BK-12")).await;
    assert!(matches!(full, Err(ClientError::Timeout { .. })), "{full:?}");
    assert_eq!(client.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn failures_a_dependency_reports_from_behind_it_neither_trip_the_breaker_nor_retry() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).insert_header("x-failed-dependency", "inventory"))
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.breaker.failure_threshold = 3;
    let client = client(config);

    for _ in 0..5 {
        let error = client
            .send(ClientRequest::get("/orders/1"))
            .await
            .expect_err("503");
        assert!(
            matches!(&error, ClientError::Status { downstream: Some(d), .. } if d == "inventory"),
            "{error:?}"
        );
    }

    // The dependency itself answered every time: it is healthy, and it already retried.
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    assert_eq!(received(&upstream).await.len(), 5);
}

#[tokio::test]
async fn full_attempt_timeouts_inside_a_longer_request_deadline_open_the_breaker() {
    let upstream = MockServer::start().await;
    healthy(&upstream, Duration::from_secs(5)).await;
    let mut config = config(&[&upstream]);
    // One call whose every attempt timed out is one failed call.
    config.breaker.failure_threshold = 1;
    config.attempt_timeout = Duration::from_millis(200);
    let client = client(config);

    let result = shared::deadline::scope(
        shared::deadline::Deadline::after(Duration::from_secs(3)),
        client.send(ClientRequest::get("/prices/BK-12").idempotency_key("k")),
    )
    .await;

    assert!(result.is_err(), "{result:?}");
    assert_eq!(client.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn an_attempt_clipped_by_the_deadline_does_not_reset_the_failure_count() {
    let upstream = MockServer::start().await;
    healthy(&upstream, Duration::from_secs(5)).await;
    let mut config = config(&[&upstream]);
    config.breaker.failure_threshold = 2;
    config.attempt_timeout = Duration::from_millis(200);
    let client = client(config);

    // Each call: two full 200 ms attempts (failures), then one clipped by the 500 ms deadline
    // (no information, and no success either). Each call therefore failed, and two failed calls
    // reach the threshold.
    for _ in 0..2 {
        let result = shared::deadline::scope(
            shared::deadline::Deadline::after(Duration::from_millis(500)),
            client.send(ClientRequest::get("/prices/BK-12")),
        )
        .await;
        assert!(result.is_err(), "{result:?}");
    }

    assert_eq!(client.breaker_state(), BreakerState::Open);
}

/// Answers `503` to a pseudo-random `share` of requests (seeded, so every run is the same).
struct FailingShare {
    share: f64,
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

impl wiremock::Respond for FailingShare {
    fn respond(&self, _request: &wiremock::Request) -> ResponseTemplate {
        use rand::Rng;
        let roll: f64 = self.rng.lock().expect("lock").random();
        ResponseTemplate::new(if roll < self.share { 503 } else { 200 })
    }
}

async fn failing_share(share: f64) -> MockServer {
    use rand::SeedableRng;
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(FailingShare {
            share,
            rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(14)),
        })
        .mount(&upstream)
        .await;
    upstream
}

/// The defaults a service runs with (5 failed calls, 3 attempts, the default budget), with
/// backoff shortened so 1,000 calls take a moment.
fn default_client(upstream: &MockServer) -> ResilientClient {
    let mut config =
        shared::client::ClientConfig::new("inventory", vec![crate::helpers::url(upstream)]);
    config.retry.base_delay = Duration::from_millis(1);
    config.retry.max_delay = Duration::from_millis(2);
    config.hedge_delay = None;
    client(config)
}

#[tokio::test]
async fn a_dependency_failing_thirty_percent_of_attempts_does_not_open_the_breaker_in_1000_calls() {
    let upstream = failing_share(0.3).await;
    let client = default_client(&upstream);

    let mut failed = 0;
    for _ in 0..1000 {
        match client.send(ClientRequest::get("/stock/BK-12")).await {
            Ok(_) => {}
            Err(ClientError::CircuitOpen { .. }) => panic!("the breaker opened"),
            Err(_) => failed += 1,
        }
    }

    assert_eq!(client.breaker_state(), BreakerState::Closed);
    // A call fails only when its three attempts all did: about 0.3³ = 2.7 % of them.
    assert!(failed < 60, "{failed} calls failed");
    let attempts = received(&upstream).await.len();
    // Retries cost about 0.3 + 0.09 extra attempts per call.
    assert!(attempts < 1500, "{attempts} attempts");
}

#[tokio::test]
async fn a_dependency_failing_every_attempt_opens_the_breaker_on_the_fifth_call() {
    let upstream = failing_share(1.0).await;
    let client = default_client(&upstream);

    for call in 1..=5 {
        assert_eq!(
            client.breaker_state(),
            BreakerState::Closed,
            "before call {call}"
        );
        let error = client
            .send(ClientRequest::get("/stock/BK-12"))
            .await
            .expect_err("503");
        assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    assert_eq!(client.breaker_state(), BreakerState::Open);
    let sixth = client.send(ClientRequest::get("/stock/BK-12")).await;
    assert!(
        matches!(sixth, Err(ClientError::CircuitOpen { .. })),
        "{sixth:?}"
    );
    assert_eq!(received(&upstream).await.len(), 5 * 3);
}
