//! The harness: a pricing-service on a free port with an in-memory database, connected to the
//! real RabbitMQ under a namespace of its own, plus a test connection in that namespace that
//! publishes events and receives every `price.changed`.

use std::sync::Arc;

use futures::future::BoxFuture;
use pricing_service::config::Settings;
use pricing_service::startup::Application;
use shared::config::Env;
use shared::events::{Event, PriceChanged};
use shared::messaging::{
    Broker, ConsumerSpec, Handler, HandlerError, IncomingMessage, OutgoingMessage,
};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Hands every message of the test's queue to the test.
struct Forward(mpsc::UnboundedSender<IncomingMessage>);

impl Handler for Forward {
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        // The receiver only goes away when the test ends; the message is of no use then.
        let _ = self.0.send(message);
        Box::pin(async { Ok(()) })
    }
}

/// A running service and what a test needs to drive it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// An HTTP client.
    pub client: reqwest::Client,
    service_broker: Broker,
    events: Broker,
    price_changes: Mutex<mpsc::UnboundedReceiver<IncomingMessage>>,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    settings: Settings,
}

/// Another process of the same service: same database, same broker namespace (so it competes
/// for the same queues), its own port.
pub struct Replica {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    /// Stops the replica; the topology it shares stays for [`TestApp::teardown`].
    pub async fn stop(self) {
        self.shutdown.cancel();
        let served = self.server.await.expect("the server task ends");
        served.expect("the replica stops cleanly");
    }
}

/// Spawns the service with default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the service after `customise` has adjusted its settings, and waits until it is ready.
pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let test_app = spawn_unready_app_with(customise).await;
    // Ready means the database answers and the consumer queue is declared and bound, so a
    // message published from here on reaches it.
    assert_eventually("the service is ready", || async {
        test_app.get("/readyz").await.status() == 200
    })
    .await;
    test_app
}

/// Spawns the service after `customise` has adjusted its settings, without waiting for its
/// database (which may be away); only the test connection to the broker is waited for.
pub async fn spawn_unready_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
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
    let (sender, receiver) = mpsc::unbounded_channel();
    let events = Broker::start(
        "test",
        settings.messaging.clone(),
        vec![ConsumerSpec {
            queue: "test.price-events".to_owned(),
            event_types: vec![PriceChanged::TYPE],
            handler: Arc::new(Forward(sender)),
        }],
        shutdown.clone(),
    );

    let test_app = TestApp {
        address,
        client: reqwest::Client::new(),
        service_broker,
        events,
        price_changes: Mutex::new(receiver),
        shutdown,
        server,
        settings,
    };
    // Connected means the test queue is bound too, so `price.changed` is routable.
    assert_eventually("the test connection is ready", || async {
        test_app.events.is_connected()
    })
    .await;
    test_app
}

impl TestApp {
    /// `GET {path}`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET /prices/{sku}`.
    pub async fn get_price(&self, sku: &str) -> reqwest::Response {
        self.get(&format!("/prices/{sku}")).await
    }

    /// `GET /prices/{sku}` as JSON (asserting `200`).
    pub async fn price(&self, sku: &str) -> serde_json::Value {
        let response = self.get_price(sku).await;
        assert_eq!(response.status(), 200, "GET /prices/{sku}");
        response.json().await.expect("price JSON")
    }

    /// `PUT /prices/{sku}` with a raw JSON body.
    pub async fn put_price(&self, sku: &str, body: &str) -> reqwest::Response {
        self.client
            .put(format!("{}/prices/{sku}", self.address))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("PUT /prices")
    }

    /// The next `price.changed` the service published, failing after [`EVENTUALLY`](shared::testing::EVENTUALLY).
    pub async fn next_price_changed(&self) -> (IncomingMessage, PriceChanged) {
        let mut receiver = self.price_changes.lock().await;
        let message = tokio::time::timeout(shared::testing::EVENTUALLY, receiver.recv())
            .await
            .expect("price.changed is published in time")
            .expect("the test consumer is running");
        let event = message.decode().expect("price.changed decodes");
        (message, event)
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

    /// Starts a second process of the service with this one's settings, and waits until it is
    /// ready.
    pub async fn spawn_replica(&self) -> Replica {
        let app = Application::build(self.settings.clone())
            .await
            .expect("the replica builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until(shutdown.clone()));
        assert_eventually("the replica is ready", || async {
            self.client
                .get(format!("{address}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        Replica {
            address,
            shutdown,
            server,
        }
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
            .expect("the test connection's topology is deleted");
        served.expect("the service stops cleanly");
    }
}

pub use shared::testing::assert_eventually;
