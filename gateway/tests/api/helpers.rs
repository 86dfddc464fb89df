//! Spawning a gateway on port 0 in front of three faked upstreams (wiremock servers).

use std::time::Duration;

use gateway::config::Settings;
use gateway::startup::Application;
use shared::config::Env;
use tokio_util::sync::{CancellationToken, DropGuard};
use wiremock::MockServer;

/// The admin key the test gateways are configured with.
pub const ADMIN_KEY: &str = "test-admin-key";

/// A running gateway and the fake services behind it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// A client for talking to the gateway.
    pub http: reqwest::Client,
    /// Fake order-service.
    pub order: MockServer,
    /// Fake inventory-service.
    pub inventory: MockServer,
    /// Fake pricing-service.
    pub pricing: MockServer,
    /// The gateway's request budget.
    pub budget: Duration,
    _stop: DropGuard,
}

impl TestApp {
    /// A request to `path` on the gateway.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.address))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    /// `POST path`.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, path)
    }

    /// `PUT path`.
    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::PUT, path)
    }
}

/// Spawns a gateway with the settings a deployment would read, pointed at fresh fakes.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with `tweak` applied to the settings first (small budgets, breaker
/// thresholds, dead upstream addresses).
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let (order, inventory, pricing) = tokio::join!(
        MockServer::start(),
        MockServer::start(),
        MockServer::start()
    );
    let env = Env::from_pairs([
        ("HOST", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("ORDER_URL", order.uri()),
        ("INVENTORY_URL", inventory.uri()),
        ("PRICING_URL", pricing.uri()),
    ]);
    let mut settings = Settings::from_env(&env).expect("valid test settings");
    tweak(&mut settings);
    let budget = settings.request_budget;
    let app = Application::build(settings).await.expect("gateway builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until(stop.clone()));
    TestApp {
        address,
        http: reqwest::Client::new(),
        order,
        inventory,
        pricing,
        budget,
        _stop: stop.drop_guard(),
    }
}

/// An address where nothing listens: bound to find a free port, then released.
pub async fn unreachable_url() -> url::Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}").parse().expect("url")
}

/// Reads a response body as JSON.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("a JSON body")
}

/// Asserts that `response` is a problem document with `status`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()[reqwest::header::CONTENT_TYPE],
        shared::problem::CONTENT_TYPE,
        "content type"
    );
    let body = json(response).await;
    assert_eq!(body["status"], status, "status in the problem body: {body}");
    body
}
