//! The harness: an inventory-service on a free port with an in-memory database (or a PostgreSQL
//! one a test names), connected to the real RabbitMQ under a namespace of its own, plus a
//! publisher in that namespace.

use inventory_service::config::Settings;
use inventory_service::startup::Application;
use reqwest::Response;
use serde_json::Value;
use shared::config::Env;
use shared::events::Event;
use shared::messaging::{Broker, OutgoingMessage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A running service and what a test needs to drive it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// An HTTP client.
    pub client: reqwest::Client,
    service_broker: Broker,
    events: Broker,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

/// Spawns the service with default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the service after `customise` has adjusted its settings, and waits until it is ready.
pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let test_app = start_app_with(customise).await;
    // Ready means the database answers and the consumer queue is declared and bound, so a
    // message published from here on reaches it.
    assert_eventually("the service is ready", || async {
        test_app
            .client
            .get(format!("{}/readyz", test_app.address))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    test_app
}

/// Spawns the service with its database at `database_url` (a PostgreSQL URL, say), waiting until
/// it is ready.
pub async fn spawn_app_on(database_url: &str) -> TestApp {
    spawn_app_with(|settings| settings.database.url = database_url.to_owned()).await
}

/// Spawns the service after `customise` has adjusted its settings, without waiting for it to be
/// ready (its database may be away); only the test publisher is waited for.
pub async fn start_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    shared::testing::init_test_logs();
    let namespace = format!("t-{}", Uuid::new_v4());
    let amqp_url = shared::testing::amqp_url();
    let env = Env::from_pairs([
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("DATABASE_URL", "sqlite::memory:"),
        ("AMQP_URL", amqp_url.as_str()),
        ("EVENTS_NAMESPACE", namespace.as_str()),
    ]);
    let mut settings = Settings::from_env(&env).expect("test settings are valid");
    customise(&mut settings);

    let app = Application::build(settings.clone())
        .await
        .expect("the service builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let service_broker = app.broker().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until(shutdown.clone()));
    let events = Broker::start("test", settings.messaging, Vec::new(), shutdown.clone());

    let test_app = TestApp {
        address,
        client: reqwest::Client::new(),
        service_broker,
        events,
        shutdown,
        server,
    };
    assert_eventually("the test publisher is connected", || async {
        test_app.events.is_connected()
    })
    .await;
    test_app
}

impl TestApp {
    /// `GET /stock/{sku}` as JSON (asserting `200`).
    pub async fn stock(&self, sku: &str) -> Value {
        let response = self
            .client
            .get(format!("{}/stock/{sku}", self.address))
            .send()
            .await
            .expect("GET /stock");
        assert_eq!(response.status(), 200, "GET /stock/{sku}");
        response.json().await.expect("stock JSON")
    }

    /// `POST /reserve` with a raw body and an optional `Idempotency-Key`.
    pub async fn reserve_raw(&self, body: String, key: Option<&str>) -> Response {
        let mut request = self
            .client
            .post(format!("{}/reserve", self.address))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.expect("POST /reserve")
    }

    /// `POST /reserve` of `qty` units of `sku`.
    pub async fn reserve(&self, sku: &str, qty: u32, key: Option<&str>) -> Response {
        let body = serde_json::json!({ "sku": sku, "qty": qty }).to_string();
        self.reserve_raw(body, key).await
    }

    /// `POST /reserve` of a whole order: `lines` of (sku, qty) for `order_id`.
    pub async fn reserve_order(
        &self,
        order_id: Uuid,
        lines: &[(&str, u32)],
        key: Option<&str>,
    ) -> Response {
        let items: Vec<Value> = lines
            .iter()
            .map(|(sku, qty)| serde_json::json!({ "sku": sku, "qty": qty }))
            .collect();
        let body = serde_json::json!({ "orderId": order_id, "items": items }).to_string();
        self.reserve_raw(body, key).await
    }

    /// Reserves and returns the reservation JSON (asserting `200`).
    pub async fn reserved(&self, sku: &str, qty: u32) -> Value {
        let response = self.reserve(sku, qty, None).await;
        assert_eq!(response.status(), 200, "reserving {qty} × {sku}");
        response.json().await.expect("reservation JSON")
    }

    /// `POST /release`.
    pub async fn release(&self, reservation_id: &str) -> Response {
        self.client
            .post(format!("{}/release", self.address))
            .json(&serde_json::json!({ "reservationId": reservation_id }))
            .send()
            .await
            .expect("POST /release")
    }

    /// Publishes `event` with `message_id` in this test's namespace, waiting for the confirm.
    pub async fn publish<E: Event>(&self, message_id: Uuid, event: &E) {
        let mut message = OutgoingMessage::new(event).expect("the event serialises");
        message.message_id = message_id;
        self.events
            .publisher()
            .publish(message)
            .await
            .expect("the broker confirms the message");
    }

    /// Stops the service and deletes every exchange and queue the test declared.
    pub async fn teardown(self) {
        self.shutdown.cancel();
        let served = self.server.await.expect("the server task ends");
        self.service_broker
            .delete_topology()
            .await
            .expect("the service's topology is deleted");
        self.events
            .delete_topology()
            .await
            .expect("the test publisher's topology is deleted");
        served.expect("the service stops cleanly");
    }
}

pub use shared::testing::assert_eventually;
