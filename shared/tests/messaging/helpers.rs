//! Test support: isolated brokers per test, a recording handler, a TCP proxy that can cut the
//! connection, and `assert_eventually!` for bounded polling.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use shared::config::Env;
use shared::correlation;
use shared::events::PriceChanged;
use shared::messaging::topology::{EVENTS_EXCHANGE, namespaced};
use shared::messaging::{
    Broker, ConsumerSpec, Handler, HandlerError, IncomingMessage, MessagingSettings, QueueType,
};
use shared::money::Money;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Polls `$cond` every 20 ms until it holds, failing the test after `$timeout` (default 15 s:
/// generous for a loaded 2-core CI machine, while a real hang still fails).
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(@ std::time::Duration::from_secs(15), $cond, $($msg)+)
    };
    (@ $timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + $timeout;
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("condition not met within {:?}: {}", $timeout, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// The broker the tests run against (`AMQP_URL`, else the local development broker).
pub fn amqp_url() -> String {
    Env::from_process().string_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// Defines the async test function `$name(queue_type: QueueType)` as two tests,
/// `$name::on_classic_queues` and `$name::on_quorum_queues`, so every messaging test runs against
/// both kinds of queue without being written twice (each run has its own namespace, so the two
/// run in parallel).
#[macro_export]
macro_rules! on_both_queue_types {
    ($name:ident) => {
        mod $name {
            use shared::messaging::QueueType;

            #[tokio::test]
            async fn on_classic_queues() {
                super::$name(QueueType::Classic).await;
            }

            #[tokio::test]
            async fn on_quorum_queues() {
                super::$name(QueueType::Quorum).await;
            }
        }
    };
}

/// Settings for a fresh namespace with queues of `queue_type`, with short delays so retries and
/// timeouts stay quick.
pub fn settings(queue_type: QueueType) -> MessagingSettings {
    let mut settings = MessagingSettings::new(amqp_url(), format!("t-{}", uuid::Uuid::new_v4()));
    settings.retry_delay = Duration::from_millis(50);
    settings.operation_timeout = Duration::from_secs(2);
    settings.queue_type = queue_type;
    settings
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=shared=debug`).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A running broker client with its own shutdown.
pub struct TestBroker {
    pub broker: Broker,
    pub settings: MessagingSettings,
    pub shutdown: CancellationToken,
}

impl TestBroker {
    /// Starts a broker for `consumers` and waits until it is connected.
    pub async fn connected(settings: MessagingSettings, consumers: Vec<ConsumerSpec>) -> Self {
        let broker = Self::start(settings, consumers);
        assert_eventually!(broker.broker.is_connected(), "the broker never connected");
        broker
    }

    /// Starts a broker for `consumers` without waiting.
    pub fn start(settings: MessagingSettings, consumers: Vec<ConsumerSpec>) -> Self {
        init_logs();
        let shutdown = CancellationToken::new();
        let broker = Broker::start("test", settings.clone(), consumers, shutdown.clone());
        Self {
            broker,
            settings,
            shutdown,
        }
    }

    /// Deletes the namespace's exchanges and queues (and stops the broker).
    pub async fn cleanup(self) {
        self.broker
            .delete_topology()
            .await
            .expect("the test topology is deleted");
        self.shutdown.cancel();
    }
}

/// The `messaging_deliveries_total` count with `outcome` in `metrics` (summed over queues).
pub fn deliveries(metrics: &shared::metrics::Metrics, outcome: &str) -> u64 {
    let label = format!("outcome=\"{outcome}\"");
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("messaging_deliveries_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// An in-memory database with the outbox table (and its trace context columns).
pub async fn outbox_database() -> shared::db::Database {
    shared::db::connect(
        "sqlite::memory:",
        &[
            (1, "outbox", shared::outbox::MIGRATION),
            (
                2,
                "outbox trace context",
                shared::outbox::TRACE_CONTEXT_MIGRATION,
            ),
        ],
    )
    .await
    .expect("the database opens")
}

/// The consumer queue name used by the tests (before the namespace).
pub const QUEUE: &str = "test.price-events";

/// A consumer of `price.changed` on [`QUEUE`] handled by `handler`.
pub fn consumer(handler: Arc<dyn Handler>) -> ConsumerSpec {
    ConsumerSpec {
        queue: QUEUE.to_owned(),
        event_types: vec!["price.changed"],
        handler,
    }
}

/// A `price.changed` event for `sku`.
pub fn price_changed(sku: &str) -> PriceChanged {
    PriceChanged {
        sku: sku.to_owned(),
        price: Money(1999),
        currency: "EUR".to_owned(),
        version: 1,
    }
}

/// What a [`Recorder`] saw of one delivery.
#[derive(Debug, Clone)]
pub struct Seen {
    pub message: IncomingMessage,
    pub correlation_id: Option<String>,
}

type Behaviour = dyn Fn(&IncomingMessage) -> Result<(), HandlerError> + Send + Sync;

/// A handler that records every delivery and answers as its behaviour says.
pub struct Recorder {
    seen: Mutex<Vec<Seen>>,
    behaviour: Box<Behaviour>,
}

impl Recorder {
    /// Accepts every message.
    pub fn accepting() -> Arc<Self> {
        Self::with(|_| Ok(()))
    }

    /// Answers with `behaviour`.
    pub fn with(
        behaviour: impl Fn(&IncomingMessage) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
        })
    }

    /// Every delivery so far, in handling order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// How many deliveries were handled.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Handler for Recorder {
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let result = (self.behaviour)(&message);
            self.seen.lock().expect("lock").push(Seen {
                correlation_id: correlation::current().map(|id| id.as_str().to_owned()),
                message,
            });
            result
        })
    }
}

/// Fails the first `n` attempts with a transient error, then accepts.
pub fn failing_first(n: u32) -> impl Fn(&IncomingMessage) -> Result<(), HandlerError> {
    let calls = AtomicU32::new(0);
    move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) < n {
            Err(HandlerError::Transient("not yet".to_owned()))
        } else {
            Ok(())
        }
    }
}

/// Publishes a raw `body` to the namespace's events exchange, bypassing the envelope (to test
/// what consumers do with malformed messages).
pub async fn publish_raw(settings: &MessagingSettings, routing_key: &str, body: &[u8]) {
    let connection = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let exchange = namespaced(&settings.namespace, EVENTS_EXCHANGE);
    let confirmation = channel
        .basic_publish(
            exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default()
                .with_message_id("malformed-1".into())
                .with_correlation_id("corr-malformed".into()),
        )
        .await
        .expect("publishes")
        .await
        .expect("confirmed");
    assert_eq!(
        confirmation.take_message(),
        None,
        "the raw message was routed"
    );
    let _ = connection.close(200, "OK".into()).await;
}

/// A TCP proxy in front of the broker whose connections the test can cut.
pub struct Proxy {
    address: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<CancellationToken>>,
    closed: CancellationToken,
}

impl Proxy {
    /// Starts a proxy on a free local port forwarding to the broker of [`amqp_url`].
    pub async fn start() -> Self {
        let upstream = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        let host = upstream.host_str().expect("a host").to_owned();
        let port = upstream.port().unwrap_or(5672);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let address = listener.local_addr().expect("address");
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let closed = CancellationToken::new();
        let (accept_open, accept_connections, accept_closed) =
            (open.clone(), connections.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = accept_closed.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if !accept_open.load(Ordering::SeqCst) {
                    // Severed: close at once, as a broker that is down would.
                    drop(client);
                    continue;
                }
                let cut = accept_connections.lock().expect("lock").clone();
                let target = (host.clone(), port);
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self {
            address,
            open,
            connections,
            closed,
        }
    }

    /// The AMQP URL that goes through this proxy.
    pub fn amqp_url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.address.port())).expect("port");
        url.to_string()
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn sever(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut connections = self.connections.lock().expect("lock");
        connections.cancel();
        *connections = CancellationToken::new();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.closed.cancel();
        self.connections.lock().expect("lock").cancel();
    }
}
