//! Upstreams and client configurations shared by the client tests.

use std::time::Duration;

use shared::client::{ClientConfig, ResilientClient};
use url::Url;
use wiremock::MockServer;

/// A config for `upstreams` whose timings keep tests fast: backoff of a few milliseconds, a
/// retry budget large enough never to interfere (tests of the budget set their own), a breaker
/// that only trips where a test wants it to, and no hedging (the tests of retries and deadlines
/// count attempts; the hedging tests turn it on).
pub fn config(upstreams: &[&MockServer]) -> ClientConfig {
    let mut config = ClientConfig::new("inventory", upstreams.iter().map(|s| url(s)).collect());
    config.retry.base_delay = Duration::from_millis(1);
    config.retry.max_delay = Duration::from_millis(5);
    config.retry.budget_min_per_sec = 1000;
    config.breaker.failure_threshold = 1000;
    config.hedge_delay = None;
    config
}

pub fn client(config: ClientConfig) -> ResilientClient {
    ResilientClient::new(config).expect("valid client config")
}

pub fn url(server: &MockServer) -> Url {
    Url::parse(&server.uri()).expect("wiremock uri")
}

/// A URL nothing listens on: the port was just free, so connecting is refused.
pub fn refused_url() -> Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    Url::parse(&format!("http://127.0.0.1:{port}")).expect("url")
}

pub async fn received(server: &MockServer) -> Vec<wiremock::Request> {
    server.received_requests().await.expect("recording is on")
}

/// Moves tokio's clock forward by `by` without waiting, then lets it run again in real time.
/// Only valid on the current-thread runtime of `#[tokio::test]`.
pub async fn jump_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}
