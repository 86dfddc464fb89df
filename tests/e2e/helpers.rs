//! The harness: all four services in this process on free ports, each with its own database and
//! its own cuttable link to the real RabbitMQ under a namespace per stack, plus the fault
//! injectors the resilience tests put between them, and the captured JSON log lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::{Value, json};
use shared::config::Env;
use shared::messaging::Broker;
use shared::telemetry::{
    CapturedLogs, LogFormat, TelemetrySettings, get_subscriber, init_subscriber,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use uuid::Uuid;

/// The development broker; `AMQP_URL` overrides it (CI, a remote broker).
const LOCAL_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The admin key every test stack's gateway is configured with.
pub const ADMIN_API_KEY: &str = "e2e-admin-key";

/// How long an asynchronous effect may take before a test fails. A message crosses a local broker
/// in milliseconds, but a cut broker link is only rebuilt after the supervisor's backoff (capped at
/// 5 s), so 15 s only ever runs out on a real failure.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// How often a condition is polled while waiting for it: often enough to add little latency to a
/// test, rarely enough that polling does not compete with the services for the two cores.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls a condition (an expression that may `.await`) until it holds, failing the test with the
/// message after [`EVENTUALLY`] (or the `within` given). Never a fixed sleep: the test goes on the
/// moment the condition holds.
///
/// ```ignore
/// assert_eventually!(stack.stock("BK-12").await["reserved"] == 0, "BK-12 is committed");
/// assert_eventually!(within = Duration::from_secs(2), stack.is_ready(Service::Order).await, "ready");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (within = $within:expr, $condition:expr, $($message:tt)+) => {{
        let within: ::std::time::Duration = $within;
        let deadline = ::tokio::time::Instant::now() + within;
        loop {
            if $condition {
                break;
            }
            if ::tokio::time::Instant::now() >= deadline {
                panic!("still not true after {within:?}: {}", format!($($message)+));
            }
            ::tokio::time::sleep($crate::helpers::POLL).await;
        }
    }};
    ($condition:expr, $($message:tt)+) => {
        $crate::assert_eventually!(within = $crate::helpers::EVENTUALLY, $condition, $($message)+)
    };
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

static LOGS: OnceLock<CapturedLogs> = OnceLock::new();

/// The process-wide log capture, installed on first use: one JSON subscriber for all services of
/// all stacks (they tell themselves apart by the `service` field of their spans). Lines are also
/// echoed to stdout when `TEST_LOG` is set.
pub fn captured_logs() -> &'static CapturedLogs {
    LOGS.get_or_init(|| {
        let captured = CapturedLogs::default();
        let writer = TestLogWriter {
            captured: captured.clone(),
            echo: std::env::var_os("TEST_LOG").is_some(),
        };
        let settings = TelemetrySettings {
            format: LogFormat::Json,
            filter: "info".to_owned(),
            otlp_endpoint: None,
        };
        init_subscriber(get_subscriber("e2e", &settings, writer))
            .expect("no other global subscriber is installed in the e2e binary");
        captured
    })
}

/// Every captured log line carrying `correlation_id`.
pub fn logs_for(correlation_id: &str) -> Vec<Value> {
    captured_logs()
        .lines()
        .into_iter()
        .filter(|line| line["correlationId"] == correlation_id)
        .collect()
}

/// How many times inventory applied `order.placed` for `order_id` (a redelivery that its inbox
/// recognised is logged as a skipped duplicate, not counted here).
pub fn placed_events_applied(order_id: &str) -> usize {
    captured_logs()
        .lines()
        .iter()
        .filter(|line| {
            line["service"] == inventory_service::SERVICE
                && line["msg"] == "order event applied"
                && line["event"] == "order.placed"
                && line["order_id"] == order_id
        })
        .count()
}

/// A fresh correlation ID for one test request, recognisable in the logs.
pub fn new_correlation_id() -> String {
    format!("e2e-{}", Uuid::new_v4())
}

/// Writes each line to the capture buffer and, with `TEST_LOG`, to stdout.
#[derive(Clone)]
struct TestLogWriter {
    captured: CapturedLogs,
    echo: bool,
}

impl std::io::Write for TestLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.echo {
            std::io::stdout().write_all(buf)?;
        }
        self.captured.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for TestLogWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The stack
// ---------------------------------------------------------------------------------------------

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The public edge.
    Gateway,
    /// order-service.
    Order,
    /// inventory-service.
    Inventory,
    /// pricing-service.
    Pricing,
}

impl Service {
    /// The services with a broker connection.
    pub const WITH_BROKER: [Service; 3] = [Service::Inventory, Service::Pricing, Service::Order];

    /// The `service` field of this service's log lines.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => gateway::SERVICE,
            Service::Order => order_service::SERVICE,
            Service::Inventory => inventory_service::SERVICE,
            Service::Pricing => pricing_service::SERVICE,
        }
    }
}

/// What order-service finds at its `INVENTORY_URL`.
#[derive(Debug, Clone, Copy)]
enum InventoryLink {
    /// inventory itself.
    Direct,
    /// A [`FaultyProxy`] in front of inventory.
    Faulty(FaultPlan),
    /// A [`HangingUpstream`] that accepts connections and never answers.
    Hanging,
}

/// How to build a [`TestStack`]; [`spawn_stack`] takes the defaults.
#[derive(Debug, Clone)]
pub struct StackBuilder {
    durable: bool,
    common: Vec<(String, String)>,
    per_service: Vec<(Service, String, String)>,
    inventory_link: InventoryLink,
}

/// A stack with in-memory databases and default settings.
pub async fn spawn_stack() -> TestStack {
    StackBuilder::new().spawn().await
}

impl Default for StackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackBuilder {
    /// In-memory databases, default settings.
    pub fn new() -> Self {
        Self {
            durable: false,
            common: Vec::new(),
            per_service: Vec::new(),
            inventory_link: InventoryLink::Direct,
        }
    }

    /// SQLite files in a temporary directory instead of in-memory databases, so a service keeps
    /// its state across [`TestStack::restart`].
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Sets an environment variable for every service.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.common.push((key.to_owned(), value.to_string()));
        self
    }

    /// Sets an environment variable for one service (wins over [`StackBuilder::env`]).
    pub fn env_for(mut self, service: Service, key: &str, value: impl ToString) -> Self {
        self.per_service
            .push((service, key.to_owned(), value.to_string()));
        self
    }

    /// Puts a [`FaultyProxy`] with `plan` between order-service and inventory.
    pub fn faulty_inventory(mut self, plan: FaultPlan) -> Self {
        self.inventory_link = InventoryLink::Faulty(plan);
        self
    }

    /// Points order-service's `INVENTORY_URL` at a [`HangingUpstream`].
    pub fn hanging_inventory(mut self) -> Self {
        self.inventory_link = InventoryLink::Hanging;
        self
    }

    /// Boots inventory and pricing, then order with their URLs, then the gateway with all three,
    /// and waits until each is ready.
    pub async fn spawn(self) -> TestStack {
        captured_logs();
        let namespace = format!("t-{}", Uuid::new_v4());
        let data_dir = self.durable.then(TestDir::new);
        let amqp_url = std::env::var("AMQP_URL").unwrap_or_else(|_| LOCAL_AMQP_URL.to_owned());
        let broker_addr = broker_address(&amqp_url).await;

        let mut broker_links = Vec::new();
        for svc in Service::WITH_BROKER {
            broker_links.push((svc, TcpProxy::start(broker_addr).await));
        }
        let env_for = |svc: Service, urls: &[(&str, String)]| -> Env {
            let database_url = match &data_dir {
                Some(dir) => format!(
                    "sqlite://{}",
                    dir.path.join(format!("{}.db", svc.name())).display()
                ),
                None => "sqlite::memory:".to_owned(),
            };
            let amqp = broker_links
                .iter()
                .find(|(s, _)| *s == svc)
                .map(|(_, link)| link.amqp_url(&amqp_url))
                .unwrap_or_default();
            let mut pairs: Vec<(String, String)> = vec![
                ("HOST".into(), "127.0.0.1".into()),
                ("PORT".into(), "0".into()),
                ("DATABASE_URL".into(), database_url),
                ("AMQP_URL".into(), amqp),
                ("EVENTS_NAMESPACE".into(), namespace.clone()),
                // A failed handler is retried after 200 ms rather than 2 s, so a test that
                // provokes a retry still finishes quickly.
                ("AMQP_RETRY_DELAY_MS".into(), "200".into()),
                ("ADMIN_API_KEY".into(), ADMIN_API_KEY.into()),
            ];
            pairs.extend(urls.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            pairs.extend(self.common.iter().cloned());
            pairs.extend(
                self.per_service
                    .iter()
                    .filter(|(s, _, _)| *s == svc)
                    .map(|(_, k, v)| (k.clone(), v.clone())),
            );
            // Later pairs win: the map keeps the last value of a key.
            Env::from_pairs(pairs)
        };

        let inventory = ServiceHandle::launch(
            Service::Inventory,
            ServiceSettings::Inventory(
                inventory_service::config::Settings::from_env(&env_for(Service::Inventory, &[]))
                    .expect("inventory test settings are valid"),
            ),
        )
        .await;
        let pricing = ServiceHandle::launch(
            Service::Pricing,
            ServiceSettings::Pricing(
                pricing_service::config::Settings::from_env(&env_for(Service::Pricing, &[]))
                    .expect("pricing test settings are valid"),
            ),
        )
        .await;

        let mut faulty = None;
        let mut hanging = None;
        let order_inventory_url = match self.inventory_link {
            InventoryLink::Direct => inventory.url(),
            InventoryLink::Faulty(plan) => {
                let proxy = FaultyProxy::start(inventory.url(), plan).await;
                let url = proxy.url.clone();
                faulty = Some(proxy);
                url
            }
            InventoryLink::Hanging => {
                let upstream = HangingUpstream::start().await;
                let url = upstream.url.clone();
                hanging = Some(upstream);
                url
            }
        };
        let order = ServiceHandle::launch(
            Service::Order,
            ServiceSettings::Order(
                order_service::config::Settings::from_env(&env_for(
                    Service::Order,
                    &[
                        ("INVENTORY_URL", order_inventory_url),
                        ("PRICING_URL", pricing.url()),
                    ],
                ))
                .expect("order test settings are valid"),
            ),
        )
        .await;
        let gateway = ServiceHandle::launch(
            Service::Gateway,
            ServiceSettings::Gateway(
                gateway::config::Settings::from_env(&env_for(
                    Service::Gateway,
                    &[
                        ("ORDER_URL", order.url()),
                        ("INVENTORY_URL", inventory.url()),
                        ("PRICING_URL", pricing.url()),
                    ],
                ))
                .expect("gateway test settings are valid"),
            ),
        )
        .await;

        let stack = TestStack {
            gateway_url: gateway.url(),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client builds"),
            services: vec![inventory, pricing, order, gateway],
            broker_links,
            faulty,
            _hanging: hanging,
            _data_dir: data_dir,
            torn_down: false,
        };
        for svc in [
            Service::Inventory,
            Service::Pricing,
            Service::Order,
            Service::Gateway,
        ] {
            stack.wait_until_ready(svc).await;
        }
        stack
    }
}

/// All four services, their links, and what a test needs to drive and observe them.
pub struct TestStack {
    /// `http://127.0.0.1:<gateway port>`.
    pub gateway_url: String,
    /// An HTTP client for the test's own requests.
    pub client: reqwest::Client,
    services: Vec<ServiceHandle>,
    broker_links: Vec<(Service, TcpProxy)>,
    faulty: Option<FaultyProxy>,
    _hanging: Option<HangingUpstream>,
    _data_dir: Option<TestDir>,
    torn_down: bool,
}

impl TestStack {
    fn service(&self, svc: Service) -> &ServiceHandle {
        self.services
            .iter()
            .find(|s| s.svc == svc)
            .expect("every service is in the stack")
    }

    fn service_mut(&mut self, svc: Service) -> &mut ServiceHandle {
        self.services
            .iter_mut()
            .find(|s| s.svc == svc)
            .expect("every service is in the stack")
    }

    /// `http://127.0.0.1:<port>` of `svc` (internal services are reachable directly in tests).
    pub fn url_of(&self, svc: Service) -> String {
        self.service(svc).url()
    }

    /// The TCP link between `svc` and the broker, to sever and restore.
    pub fn broker_link(&self, svc: Service) -> &TcpProxy {
        &self
            .broker_links
            .iter()
            .find(|(s, _)| *s == svc)
            .expect("only services with a broker connection have a broker link")
            .1
    }

    /// The fault injector in front of inventory, if the stack has one.
    pub fn faults(&self) -> &FaultyProxy {
        self.faulty
            .as_ref()
            .expect("the stack was built with faulty_inventory")
    }

    /// `POST /api/orders` of `items` (`(sku, qty)`), ready for extra headers.
    pub fn order_request(&self, items: &[(&str, u32)]) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/api/orders", self.gateway_url))
            .json(&order_body(items))
    }

    /// Places an order through the gateway.
    pub async fn place_order(&self, items: &[(&str, u32)]) -> reqwest::Response {
        self.order_request(items)
            .send()
            .await
            .expect("POST /api/orders")
    }

    /// Places an order and returns it, asserting `201`.
    pub async fn placed(&self, items: &[(&str, u32)]) -> Value {
        let response = self.place_order(items).await;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 201, "placing {items:?} answered {body}");
        serde_json::from_str(&body).expect("order JSON")
    }

    /// `GET` of a gateway path.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.gateway_url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET /api/orders/{id}` through the gateway, as JSON (asserting `200`).
    pub async fn order(&self, id: &str) -> Value {
        let response = self.get(&format!("/api/orders/{id}")).await;
        assert_eq!(response.status(), 200, "GET /api/orders/{id}");
        response.json().await.expect("order JSON")
    }

    /// `GET /stock/{sku}` at inventory, as JSON (asserting `200`).
    pub async fn stock(&self, sku: &str) -> Value {
        let response = self
            .client
            .get(format!("{}/stock/{sku}", self.url_of(Service::Inventory)))
            .send()
            .await
            .expect("GET /stock/{sku}");
        assert_eq!(response.status(), 200, "GET /stock/{sku}");
        response.json().await.expect("stock JSON")
    }

    /// `GET /prices/{sku}` at pricing, as JSON (asserting `200`).
    pub async fn price(&self, sku: &str) -> Value {
        let response = self
            .client
            .get(format!("{}/prices/{sku}", self.url_of(Service::Pricing)))
            .send()
            .await
            .expect("GET /prices/{sku}");
        assert_eq!(response.status(), 200, "GET /prices/{sku}");
        response.json().await.expect("price JSON")
    }

    /// `PUT /api/prices/{sku}` through the gateway with the admin key.
    pub fn price_change(&self, sku: &str, price: f64) -> reqwest::RequestBuilder {
        self.client
            .put(format!("{}/api/prices/{sku}", self.gateway_url))
            .header("x-api-key", ADMIN_API_KEY)
            .json(&json!({ "price": price }))
    }

    /// `GET /readyz` of `svc`: the status code and the report.
    pub async fn readiness(&self, svc: Service) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}/readyz", self.url_of(svc)))
            .send()
            .await
            .expect("GET /readyz");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Whether `svc` answers `/readyz` with `200`.
    pub async fn is_ready(&self, svc: Service) -> bool {
        let request = self
            .client
            .get(format!("{}/readyz", self.url_of(svc)))
            .send();
        request.await.is_ok_and(|r| r.status() == 200)
    }

    /// `GET /metrics` of `svc`, as text.
    pub async fn metrics(&self, svc: Service) -> String {
        self.client
            .get(format!("{}/metrics", self.url_of(svc)))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until `svc` is ready: its database answers and (for the three with one) its broker
    /// topology is declared, so an event published from then on reaches its queue.
    pub async fn wait_until_ready(&self, svc: Service) {
        assert_eventually!(self.is_ready(svc).await, "{} is ready", svc.name());
    }

    /// Stops `svc` (as on SIGTERM: draining requests, closing its broker connection).
    pub async fn stop(&mut self, svc: Service) {
        self.service_mut(svc).stop().await;
    }

    /// Starts `svc` again on the same port with the same settings (and, in a durable stack, the
    /// same database file), and waits until it is ready.
    pub async fn restart(&mut self, svc: Service) {
        self.service_mut(svc).restart().await;
        self.wait_until_ready(svc).await;
    }

    /// Stops every service, the gateway first and inventory last (the reverse of start-up).
    pub async fn stop_all(&mut self) {
        for svc in [
            Service::Gateway,
            Service::Order,
            Service::Pricing,
            Service::Inventory,
        ] {
            self.stop(svc).await;
        }
    }

    /// Restarts every service in start-up order.
    pub async fn restart_all(&mut self) {
        for svc in [
            Service::Inventory,
            Service::Pricing,
            Service::Order,
            Service::Gateway,
        ] {
            self.restart(svc).await;
        }
    }

    /// Stops everything and deletes every exchange and queue the stack declared.
    pub async fn teardown(mut self) {
        for (_, link) in &self.broker_links {
            link.restore().await;
        }
        self.stop_all().await;
        for service in &self.services {
            if let Some(broker) = &service.broker {
                broker
                    .delete_topology()
                    .await
                    .unwrap_or_else(|e| panic!("deleting {}'s topology: {e}", service.svc.name()));
            }
        }
        self.torn_down = true;
    }
}

/// How long a failed test may spend deleting its broker topology: a local broker deletes a
/// handful of queues in milliseconds; the bound only keeps a wedged broker from hanging the run.
const CLEANUP_BUDGET: Duration = Duration::from_secs(10);

impl Drop for TestStack {
    /// A test that panicked never reached [`TestStack::teardown`]: delete its queues anyway, so
    /// failed runs do not leave durable queues behind in the development broker.
    ///
    /// The test's runtime cannot be used from `drop`, so this runs on a runtime of its own in a
    /// separate thread, while the test runtime's workers (the tests use the multi-thread flavour)
    /// still let the services' broker supervisors stop.
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let brokers: Vec<Broker> = self
            .services
            .iter()
            .filter_map(|s| s.broker.clone())
            .collect();
        let links = std::mem::take(&mut self.broker_links);
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(CLEANUP_BUDGET, async {
                    for (_, link) in &links {
                        link.sever().await;
                        link.restore().await;
                    }
                    for broker in brokers {
                        let _ = broker.delete_topology().await;
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// The JSON body of an order for `items`.
pub fn order_body(items: &[(&str, u32)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, qty)| json!({ "sku": sku, "qty": qty }))
        .collect();
    json!({ "items": items })
}

/// The settings of one service, kept to start it again.
enum ServiceSettings {
    Gateway(gateway::config::Settings),
    Order(order_service::config::Settings),
    Inventory(inventory_service::config::Settings),
    Pricing(pricing_service::config::Settings),
}

/// A service started in this process.
struct Running {
    port: u16,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    broker: Option<Broker>,
}

impl ServiceSettings {
    fn set_port(&mut self, port: u16) {
        match self {
            Self::Gateway(s) => s.port = port,
            Self::Order(s) => s.port = port,
            Self::Inventory(s) => s.port = port,
            Self::Pricing(s) => s.port = port,
        }
    }

    async fn start(&self) -> anyhow::Result<Running> {
        let shutdown = CancellationToken::new();
        let (port, server, broker) = match self {
            Self::Gateway(settings) => {
                let app = gateway::startup::Application::build(settings.clone()).await?;
                let port = app.port();
                (port, tokio::spawn(app.run_until(shutdown.clone())), None)
            }
            Self::Order(settings) => {
                let app = order_service::startup::Application::build(settings.clone()).await?;
                let (port, broker) = (app.port(), app.broker().clone());
                (
                    port,
                    tokio::spawn(app.run_until(shutdown.clone())),
                    Some(broker),
                )
            }
            Self::Inventory(settings) => {
                let app = inventory_service::startup::Application::build(settings.clone()).await?;
                let (port, broker) = (app.port(), app.broker().clone());
                (
                    port,
                    tokio::spawn(app.run_until(shutdown.clone())),
                    Some(broker),
                )
            }
            Self::Pricing(settings) => {
                let app = pricing_service::startup::Application::build(settings.clone()).await?;
                let (port, broker) = (app.port(), app.broker().clone());
                (
                    port,
                    tokio::spawn(app.run_until(shutdown.clone())),
                    Some(broker),
                )
            }
        };
        Ok(Running {
            port,
            shutdown,
            server,
            broker,
        })
    }
}

/// One service of a stack: its settings, its port (kept across restarts) and, while it runs,
/// its task.
struct ServiceHandle {
    svc: Service,
    settings: ServiceSettings,
    port: u16,
    running: Option<Running>,
    /// The broker of the latest run, kept after a stop to delete the topology at teardown.
    broker: Option<Broker>,
}

impl ServiceHandle {
    async fn launch(svc: Service, mut settings: ServiceSettings) -> Self {
        let running = settings
            .start()
            .await
            .unwrap_or_else(|e| panic!("{} starts: {e:#}", svc.name()));
        settings.set_port(running.port);
        Self {
            svc,
            settings,
            port: running.port,
            broker: running.broker.clone(),
            running: Some(running),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.shutdown.cancel();
        running
            .server
            .await
            .expect("the service task ends")
            .unwrap_or_else(|e| panic!("{} stops cleanly: {e:#}", self.svc.name()));
        if let Some(broker) = &running.broker {
            broker.stopped().await;
        }
    }

    async fn restart(&mut self) {
        assert!(
            self.running.is_none(),
            "{} is still running",
            self.svc.name()
        );
        // The port was free a moment ago; binding it again only fails if another test's
        // listener took it in between, which a second try does not fix, so fail loudly.
        let running = self.settings.start().await.unwrap_or_else(|e| {
            panic!("{} restarts on port {}: {e:#}", self.svc.name(), self.port)
        });
        assert_eq!(running.port, self.port, "restarted on the same port");
        self.broker = running.broker.clone();
        self.running = Some(running);
    }
}

/// Where the broker listens, from an `amqp://` URL.
async fn broker_address(amqp_url: &str) -> SocketAddr {
    let url = url::Url::parse(amqp_url).expect("AMQP_URL is a URL");
    let host = url.host_str().expect("AMQP_URL names a host");
    let port = url.port().unwrap_or(5672);
    tokio::net::lookup_host((host, port))
        .await
        .expect("the broker's host resolves")
        .next()
        .expect("the broker's host has an address")
}

// ---------------------------------------------------------------------------------------------
// A temporary directory
// ---------------------------------------------------------------------------------------------

/// A directory under the system's temp dir, removed (with its database files) when dropped.
struct TestDir {
    path: PathBuf,
}

impl TestDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("e2e-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("the temp dir is writable");
        Self { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// A cuttable TCP link
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of `target` that a test can cut: [`TcpProxy::sever`] drops every live
/// connection and closes the port (new connections are refused), [`TcpProxy::restore`] listens on
/// the same port again.
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    accepting: Mutex<Option<Accepting>>,
}

struct Accepting {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port is available");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        Self {
            addr,
            target,
            accepting: Mutex::new(Some(accept(listener, target))),
        }
    }

    /// `amqp_url` with its host and port replaced by this proxy's.
    pub fn amqp_url(&self, amqp_url: &str) -> String {
        let mut url = url::Url::parse(amqp_url).expect("AMQP_URL is a URL");
        url.set_host(Some("127.0.0.1"))
            .expect("an AMQP URL has a host");
        url.set_port(Some(self.addr.port()))
            .expect("an AMQP URL has a port");
        url.to_string()
    }

    /// Drops every live connection and stops listening; returns once both are done.
    pub async fn sever(&self) {
        if let Some(accepting) = self.accepting.lock().await.take() {
            accepting.stop.cancel();
            let _ = accepting.task.await;
        }
    }

    /// Listens on the same port again (a no-op if not severed).
    pub async fn restore(&self) {
        let mut accepting = self.accepting.lock().await;
        if accepting.is_none() {
            // Tokio sets SO_REUSEADDR, so the port can be bound again at once even though the
            // severed connections linger in TIME_WAIT.
            let listener = TcpListener::bind(self.addr)
                .await
                .expect("the proxy's port can be bound again");
            *accepting = Some(accept(listener, self.target));
        }
    }
}

fn accept(listener: TcpListener, target: SocketAddr) -> Accepting {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = stopped.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let Ok((mut inbound, _)) = accepted else { continue };
                    connections.spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        }
        // Aborting the copy tasks drops both ends of every connection; the listener goes with
        // this task.
        connections.shutdown().await;
    });
    Accepting { stop, task }
}

// ---------------------------------------------------------------------------------------------
// An upstream that never answers
// ---------------------------------------------------------------------------------------------

/// A TCP listener that accepts connections and never reads from or writes to them: the worst
/// kind of upstream, one that neither refuses nor fails.
pub struct HangingUpstream {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    task: JoinHandle<()>,
}

impl HangingUpstream {
    /// Starts listening on a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port is available");
        let port = listener.local_addr().expect("bound").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            task,
        }
    }
}

impl Drop for HangingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// An HTTP proxy that injects 503s
// ---------------------------------------------------------------------------------------------

/// Which requests a [`FaultyProxy`] fails: `failures` of every `per`, spread evenly and
/// deterministically (request `n` fails when `⌊(n+1)·f/p⌋ > ⌊n·f/p⌋`, so 3 in 10 fails requests
/// 3, 6 and 9 of each ten, never two in a row).
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    /// Failed requests per `per`.
    pub failures: u64,
    /// The period.
    pub per: u64,
}

impl FaultPlan {
    /// `failures` of every `per` requests fail.
    pub fn fail(failures: u64, per: u64) -> Self {
        assert!(failures <= per && per > 0, "a fraction between 0 and 1");
        Self { failures, per }
    }

    fn fails(self, n: u64) -> bool {
        (n + 1) * self.failures / self.per > n * self.failures / self.per
    }
}

/// An HTTP proxy that answers `503` to a [`FaultPlan`]'s share of requests and forwards the rest.
///
/// Injected faults alternate between the two kinds a client cannot tell apart: every other one is
/// answered without forwarding (nothing happened upstream), the others are forwarded and their
/// answer replaced by the `503` (the upstream did the work, the client never learns of it) — the
/// case that double-reserves unless retries are idempotent.
pub struct FaultyProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    counters: Arc<FaultCounters>,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct FaultCounters {
    seen: AtomicU64,
    injected: AtomicU64,
}

#[derive(Clone)]
struct FaultyProxyState {
    upstream: String,
    plan: FaultPlan,
    http: reqwest::Client,
    counters: Arc<FaultCounters>,
}

impl FaultyProxy {
    /// Starts the proxy in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: String, plan: FaultPlan) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port is available");
        let port = listener.local_addr().expect("bound").port();
        let counters = Arc::new(FaultCounters::default());
        let state = FaultyProxyState {
            upstream,
            plan,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client builds"),
            counters: counters.clone(),
        };
        let router = Router::new().fallback(forward).with_state(state);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            counters,
            shutdown,
        }
    }

    /// Requests received so far.
    pub fn seen(&self) -> u64 {
        self.counters.seen.load(Ordering::SeqCst)
    }

    /// `503`s injected so far.
    pub fn injected(&self) -> u64 {
        self.counters.injected.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn forward(State(state): State<FaultyProxyState>, request: Request) -> Response {
    let n = state.counters.seen.fetch_add(1, Ordering::SeqCst);
    let fault = state.plan.fails(n);
    // Faults before this one; even-numbered faults are answered without forwarding.
    let fault_index = n * state.plan.failures / state.plan.per;
    if fault && fault_index % 2 == 0 {
        return injected_fault(&state);
    }

    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers;
    headers.remove(header::HOST);
    let upstream = state
        .http
        .request(parts.method, format!("{}{path}", state.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
    };
    let status = upstream.status();
    let headers = upstream.headers().clone();
    let body = upstream.bytes().await.unwrap_or_else(|_| Bytes::new());
    if fault {
        return injected_fault(&state);
    }
    let mut response = (status, body).into_response();
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::LOCATION] {
        if let Some(value) = headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

fn injected_fault(state: &FaultyProxyState) -> Response {
    state.counters.injected.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json!({ "type": "about:blank", "title": "Injected fault", "status": 503 }).to_string(),
    )
        .into_response()
}
