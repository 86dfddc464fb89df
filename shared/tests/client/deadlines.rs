//! Correlation IDs and deadlines on every attempt; no attempt and no sleep past the deadline.

use std::time::Duration;

use http::StatusCode;
use shared::client::{ClientError, ClientRequest};
use shared::correlation::{self, CorrelationId};
use shared::deadline::{self, Deadline};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, received};

fn budget_ms(request: &wiremock::Request) -> u64 {
    request.headers[&deadline::HEADER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole milliseconds")
}

#[tokio::test]
async fn every_attempt_carries_the_correlation_id_and_a_shrinking_budget() {
    let upstream = MockServer::start().await;
    // Each answer takes 20 ms, so every retry has measurably less time left than the one before.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(20)))
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.attempt_timeout = Duration::from_secs(10);
    let id = CorrelationId::new();

    let result = correlation::scope(
        id.clone(),
        deadline::scope(
            Deadline::after(Duration::from_secs(2)),
            client(config).send(ClientRequest::get("/stock/BK-12")),
        ),
    )
    .await;

    assert_eq!(
        result.expect_err("503").status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let requests = received(&upstream).await;
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert_eq!(r.headers[&correlation::HEADER], id.as_str());
    }
    let budgets: Vec<u64> = requests.iter().map(budget_ms).collect();
    // The request's 2 s minus the 25 ms margin, then less and less.
    assert!(budgets[0] <= 1975 && budgets[0] > 1900, "{budgets:?}");
    assert!(budgets.windows(2).all(|w| w[1] < w[0]), "{budgets:?}");
}

#[tokio::test]
async fn without_a_request_deadline_each_attempt_gets_the_attempt_timeout() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.attempt_timeout = Duration::from_millis(1500);

    client(config)
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect("ok");

    let requests = received(&upstream).await;
    // The attempt timeout minus the 25 ms margin: the callee gives up before we do.
    assert_eq!(budget_ms(&requests[0]), 1475);
    assert!(!requests[0].headers.contains_key(&correlation::HEADER));
}

#[tokio::test]
async fn a_request_may_ask_for_shorter_attempts_but_never_longer_ones() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let mut config = config(&[&upstream]);
    config.attempt_timeout = Duration::from_millis(1500);
    let client = client(config);

    for timeout in [Duration::from_millis(500), Duration::from_secs(10)] {
        client
            .send(ClientRequest::get("/stock/BK-12").attempt_timeout(timeout))
            .await
            .expect("ok");
    }

    let budgets: Vec<u64> = received(&upstream).await.iter().map(budget_ms).collect();
    // Each attempt's timeout minus the 25 ms margin: 500 ms asked for, 1.5 s at most.
    assert_eq!(budgets, [475, 1475]);
}

#[tokio::test]
async fn nothing_is_sent_when_the_deadline_leaves_less_than_the_margin() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&upstream)
        .await;

    let error = deadline::scope(
        Deadline::after(Duration::from_millis(10)),
        client(config(&[&upstream])).send(ClientRequest::get("/stock/BK-12")),
    )
    .await
    .expect_err("no time left");

    assert!(
        matches!(error, ClientError::DeadlineExceeded { .. }),
        "{error:?}"
    );
    assert_eq!(error.to_problem().status, 504);
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_returns_the_error_at_once() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "30"))
        .expect(1)
        .mount(&upstream)
        .await;
    let started = tokio::time::Instant::now();

    let error = deadline::scope(
        Deadline::after(Duration::from_secs(3)),
        client(config(&[&upstream])).send(ClientRequest::get("/prices/BK-12")),
    )
    .await
    .expect_err("503");

    // Sleeping 30 s (or even until the deadline) would only delay the same answer.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    match &error {
        ClientError::Status {
            status,
            retry_after,
            ..
        } => {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(*retry_after, Some(Duration::from_secs(30)));
        }
        other => panic!("expected the 503, got {other:?}"),
    }
    let problem = error.to_problem();
    assert_eq!(problem.status, 503);
    assert_eq!(problem.retry_after, Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn an_attempt_is_cut_off_when_the_request_deadline_passes() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&upstream)
        .await;
    let started = tokio::time::Instant::now();

    let error = deadline::scope(
        Deadline::after(Duration::from_millis(300)),
        client(config(&[&upstream])).send(ClientRequest::get("/stock/BK-12")),
    )
    .await
    .expect_err("too slow");

    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    // We listen until the deadline itself (the callee was told 25 ms less), never past it.
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The attempt used the whole budget, so no retry could fit.
    assert_eq!(received(&upstream).await.len(), 1);
}
