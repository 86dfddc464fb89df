//! The harness: an order-service on a free port with an in-memory database, pricing and inventory
//! faked by wiremock servers, and a connection to the real RabbitMQ under a namespace of its own
//! with a recorder of the events the service publishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use order_service::config::Settings;
use order_service::domain::PriceCache;
use order_service::startup::Application;
use reqwest::Response;
use serde_json::{Value, json};
use shared::config::Env;
use shared::events::{Event, OrderCancelled, OrderPlaced};
use shared::messaging::{
    Broker, ConsumerSpec, Handler, HandlerError, IncomingMessage, OutgoingMessage,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wiremock::matchers::{body_partial_json, method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A running service and what a test needs to drive it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// An HTTP client.
    pub client: reqwest::Client,
    /// Fake pricing-service.
    pub pricing: MockServer,
    /// Fake inventory-service.
    pub inventory: MockServer,
    /// The service's price cache.
    pub prices: PriceCache,
    /// What the fake inventory's whole-order `POST /reserve` answers for each SKU.
    stock: StubStock,
    recorded: Arc<Mutex<Vec<IncomingMessage>>>,
    service_broker: Broker,
    events: Broker,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

/// How the fake inventory treats a SKU; a SKU it was not told about is unknown.
#[derive(Debug, Clone, Copy)]
enum StubLine {
    /// Reserved under this reservation ID (any quantity).
    Stocked(Uuid),
    /// Only this many units available: any reservation is short.
    Short(u32),
    /// Not kept.
    Unknown,
}

type StubStock = Arc<Mutex<HashMap<String, StubLine>>>;

/// Inventory's answer to a whole-order `POST /reserve` body, as the real service gives it: all
/// lines or none; an unknown SKU is a `404` naming it, else a short line a `409` naming the first
/// short one (and listing all), else `200` with one reservation per line in request order.
fn reserve_answer(body: &Value, line: impl Fn(&str) -> StubLine) -> ResponseTemplate {
    let problem = |status: u16, extra: Value| {
        let mut problem = json!({ "type": "about:blank", "status": status });
        if let (Some(problem), Some(extra)) = (problem.as_object_mut(), extra.as_object()) {
            problem.extend(extra.clone());
        }
        ResponseTemplate::new(status)
            .insert_header("content-type", "application/problem+json")
            .set_body_json(problem)
    };
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let lines: Vec<(String, Value, StubLine)> = items
        .iter()
        .map(|item| {
            let sku = item["sku"].as_str().unwrap_or_default().to_owned();
            let answer = line(&sku);
            (sku, item["qty"].clone(), answer)
        })
        .collect();
    if lines.is_empty() {
        return problem(422, json!({ "title": "Invalid request" }));
    }
    if let Some((sku, ..)) = lines.iter().find(|(.., l)| matches!(l, StubLine::Unknown)) {
        return problem(404, json!({ "title": "Unknown SKU", "sku": sku }));
    }
    let shortages: Vec<Value> = lines
        .iter()
        .filter_map(|(sku, qty, l)| match l {
            StubLine::Short(available) => {
                Some(json!({ "sku": sku, "requested": qty, "available": available }))
            }
            _ => None,
        })
        .collect();
    if let Some(first) = shortages.first() {
        return problem(
            409,
            json!({
                "title": "Insufficient stock",
                "sku": first["sku"],
                "requested": first["requested"],
                "available": first["available"],
                "shortages": shortages,
            }),
        );
    }
    let reservations: Vec<Value> = lines
        .iter()
        .map(|(sku, qty, l)| {
            let StubLine::Stocked(id) = l else {
                unreachable!("unknown and short lines answered above")
            };
            json!({
                "sku": sku, "reserved": qty, "remaining": 10, "reservationId": id,
                "expiresAt": "2030-01-01T00:00:00Z",
            })
        })
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({
        "orderId": body["orderId"],
        "reservations": reservations,
    }))
}

/// Records every message delivered to the test's own queue.
struct Recorder(Arc<Mutex<Vec<IncomingMessage>>>);

impl Handler for Recorder {
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
        Box::pin(async { Ok(()) })
    }
}

/// Spawns the service with default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the service after `customise` has adjusted its settings, and waits until it is ready.
pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let test_app = start_app_with(customise).await;
    // Ready means the database answers and the price-events queue is declared and bound, so a
    // `price.changed` published from here on reaches it.
    assert_eventually("the service is ready", || async {
        test_app.readiness().await.0 == 200
    })
    .await;
    test_app
}

/// Spawns the service keeping its state in the PostgreSQL database at `database_url`.
pub async fn spawn_app_on(database_url: &str) -> TestApp {
    spawn_app_with(|settings| settings.database.url = database_url.to_owned()).await
}

/// Spawns the service after `customise` has adjusted its settings, without waiting for it to be
/// ready (for tests of a service whose dependencies are away).
pub async fn start_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    shared::testing::init_test_logs();
    let pricing = MockServer::start().await;
    let inventory = MockServer::start().await;
    let stock = StubStock::default();
    let known = stock.clone();
    // The lowest priority, so a test's own `/reserve` mock (a hang, a delay) is matched first.
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = request.body_json().unwrap_or(Value::Null);
            let known = known.lock().unwrap_or_else(|e| e.into_inner());
            reserve_answer(&body, |sku| {
                known.get(sku).copied().unwrap_or(StubLine::Unknown)
            })
        })
        .with_priority(u8::MAX)
        .mount(&inventory)
        .await;
    let namespace = format!("t-{}", Uuid::new_v4());
    let amqp_url = shared::testing::amqp_url();
    let pricing_url = pricing.uri();
    let inventory_url = inventory.uri();
    let env = Env::from_pairs([
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("DATABASE_URL", "sqlite::memory:"),
        ("AMQP_URL", amqp_url.as_str()),
        ("EVENTS_NAMESPACE", namespace.as_str()),
        ("PRICING_URL", pricing_url.as_str()),
        ("INVENTORY_URL", inventory_url.as_str()),
    ]);
    let mut settings = Settings::from_env(&env).expect("test settings are valid");
    customise(&mut settings);

    let app = Application::build(settings.clone())
        .await
        .expect("the service builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let service_broker = app.broker().clone();
    let prices = app.price_cache().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until(shutdown.clone()));
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let events = Broker::start(
        "order-test",
        settings.messaging,
        vec![ConsumerSpec {
            queue: "test.order-events".to_owned(),
            event_types: vec![OrderPlaced::TYPE, OrderCancelled::TYPE],
            handler: Arc::new(Recorder(recorded.clone())),
        }],
        shutdown.clone(),
    );

    let test_app = TestApp {
        address,
        client: reqwest::Client::new(),
        pricing,
        inventory,
        prices,
        stock,
        recorded,
        service_broker,
        events,
        shutdown,
        server,
    };
    assert_eventually("the test's event queue is declared", || async {
        test_app.events.is_connected()
    })
    .await;
    test_app
}

impl TestApp {
    /// `POST /orders` with a raw body and optional extra headers.
    pub async fn post_order_raw(&self, body: String, headers: &[(&str, &str)]) -> Response {
        let mut request = self
            .client
            .post(format!("{}/orders", self.address))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("POST /orders")
    }

    /// `POST /orders` of `items` (`(sku, qty)`), with an optional `Idempotency-Key`.
    pub async fn post_order(&self, items: &[(&str, u32)], key: Option<&str>) -> Response {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        self.post_order_raw(order_body(items), &headers).await
    }

    /// `GET /readyz`: its status and body (status 0 while the service cannot be reached).
    pub async fn readiness(&self) -> (u16, Value) {
        let Ok(response) = self
            .client
            .get(format!("{}/readyz", self.address))
            .send()
            .await
        else {
            return (0, Value::Null);
        };
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Places an order and returns it (asserting `201`).
    pub async fn placed(&self, items: &[(&str, u32)]) -> Value {
        let response = self.post_order(items, None).await;
        assert_eq!(response.status(), 201, "placing {items:?}");
        response.json().await.expect("order JSON")
    }

    /// `GET /orders/{id}`.
    pub async fn get_order(&self, id: &str) -> Response {
        self.client
            .get(format!("{}/orders/{id}", self.address))
            .send()
            .await
            .expect("GET /orders/{id}")
    }

    /// `POST /orders/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Response {
        self.client
            .post(format!("{}/orders/{id}/cancel", self.address))
            .send()
            .await
            .expect("POST /orders/{id}/cancel")
    }

    /// Pricing knows `sku` at `price` EUR.
    pub async fn given_price(&self, sku: &str, price: f64) {
        price_mock(sku, price).mount(&self.pricing).await;
    }

    /// Pricing answers `503` to every lookup.
    pub async fn given_pricing_is_down(&self) {
        Mock::given(method("GET"))
            .and(path_regex("^/prices/"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&self.pricing)
            .await;
    }

    /// Inventory reserves `sku` (any quantity) under a fixed reservation ID, which is returned.
    pub async fn given_stock(&self, sku: &str) -> Uuid {
        let reservation_id = Uuid::new_v4();
        self.given_line(sku, StubLine::Stocked(reservation_id));
        reservation_id
    }

    /// Inventory has only `available` units of `sku`: every order with it is short (and, all or
    /// none, reserves nothing).
    pub async fn given_short_stock(&self, sku: &str, available: u32) {
        self.given_line(sku, StubLine::Short(available));
    }

    /// Neither pricing nor inventory knows `sku`.
    pub async fn given_unknown_sku(&self, sku: &str) {
        Mock::given(method("GET"))
            .and(path(format!("/prices/{sku}")))
            .respond_with(
                ResponseTemplate::new(404)
                    .insert_header("content-type", "application/problem+json")
                    .set_body_json(
                        json!({ "type": "about:blank", "title": "Not found", "status": 404 }),
                    ),
            )
            .mount(&self.pricing)
            .await;
        self.given_line(sku, StubLine::Unknown);
    }

    fn given_line(&self, sku: &str, line: StubLine) {
        self.stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sku.to_owned(), line);
    }

    /// Inventory accepts every release.
    pub async fn given_releases_succeed(&self) {
        Mock::given(method("POST"))
            .and(path("/release"))
            .respond_with(|request: &wiremock::Request| {
                let body: Value = request.body_json().unwrap_or(Value::Null);
                ResponseTemplate::new(200).set_body_json(json!({
                    "reservationId": body["reservationId"],
                    "status": "released",
                }))
            })
            .mount(&self.inventory)
            .await;
    }

    /// Every request inventory received on `path`, with its JSON body.
    pub async fn inventory_calls(&self, on: &str) -> Vec<(wiremock::Request, Value)> {
        self.inventory
            .received_requests()
            .await
            .expect("wiremock records requests")
            .into_iter()
            .filter(|r| r.url.path() == on)
            .map(|r| {
                let body = r.body_json().unwrap_or(Value::Null);
                (r, body)
            })
            .collect()
    }

    /// The reservation IDs inventory was asked to release.
    pub async fn released(&self) -> Vec<String> {
        self.inventory_calls("/release")
            .await
            .into_iter()
            .filter_map(|(_, body)| body["reservationId"].as_str().map(str::to_owned))
            .collect()
    }

    /// Publishes `event` in this test's namespace, retrying until the broker routes it (the
    /// service's queue for it may still be in declaration).
    pub async fn publish<E: Event>(&self, event: &E) {
        let message = OutgoingMessage::new(event).expect("the event serialises");
        let publisher = self.events.publisher();
        assert_eventually("the broker accepts the event", || {
            let publisher = publisher.clone();
            let message = message.clone();
            async move { publisher.publish(message).await.is_ok() }
        })
        .await;
    }

    /// The events of `event_type` about order `order_id` received so far.
    pub fn events_for(&self, event_type: &str, order_id: &str) -> Vec<Value> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|m| m.event_type == event_type)
            .filter_map(|m| serde_json::from_slice::<Value>(&m.data).ok())
            .filter(|data| data["orderId"] == order_id)
            .collect()
    }

    /// Waits until an event of `event_type` about `order_id` has arrived and returns it.
    pub async fn wait_for_event(&self, event_type: &str, order_id: &str) -> Value {
        assert_eventually(&format!("{event_type} for {order_id} arrives"), || async {
            !self.events_for(event_type, order_id).is_empty()
        })
        .await;
        self.events_for(event_type, order_id).remove(0)
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
            .expect("the test's topology is deleted");
        served.expect("the service stops cleanly");
    }
}

/// The JSON body of an order for `items`.
pub fn order_body(items: &[(&str, u32)]) -> String {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, qty)| json!({ "sku": sku, "qty": qty }))
        .collect();
    json!({ "items": items }).to_string()
}

/// A pricing answer for `sku` at `price` EUR.
pub fn price_mock(sku: &str, price: f64) -> Mock {
    Mock::given(method("GET"))
        .and(path(format!("/prices/{sku}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "sku": sku,
            "name": sku,
            "price": price,
            "currency": "EUR",
            "unitsSold": 0,
        })))
}

/// An inventory answer reserving a whole order of `sku` under `reservation_id`.
pub fn reserve_mock(sku: &str, reservation_id: Uuid) -> Mock {
    let sku = sku.to_owned();
    Mock::given(method("POST"))
        .and(path("/reserve"))
        .and(body_partial_json(json!({ "items": [{ "sku": sku }] })))
        .respond_with(move |request: &wiremock::Request| {
            let body: Value = request.body_json().unwrap_or(Value::Null);
            reserve_answer(&body, |line| {
                if line == sku {
                    StubLine::Stocked(reservation_id)
                } else {
                    StubLine::Unknown
                }
            })
        })
}

pub use shared::testing::assert_eventually;
