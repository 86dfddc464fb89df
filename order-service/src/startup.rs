//! Wiring: database, clients, broker, outbox relay and routes, and their orderly shutdown.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use shared::admission::{Admission, ListenerSettings, Refusal};
use shared::client::ResilientClient;
use shared::health::Health;
use shared::messaging::Broker;
use shared::metrics::Metrics;
use shared::outbox::postgres::PgOutbox;
use shared::outbox::{OutboxRelay, OutboxStorage, SqliteOutbox};
use shared::pg::{Backend, PgDatabase};
use shared::server::{Chassis, DEFAULT_BODY_LIMIT};
use shared::shutdown::DEFAULT_DRAIN;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::SERVICE;
use crate::clients::{InventoryClient, PricingClient};
use crate::config::Settings;
use crate::domain::PriceCache;
use crate::messaging;
use crate::placement::OrderPlacement;
use crate::routes;
use crate::state::AppState;
use crate::store::{
    MIGRATIONS, OrderRepository, PG_MIGRATIONS, PgOrderRepository, SqliteOrderRepository,
};

/// The built service, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    listener: TcpListener,
    listener_settings: ListenerSettings,
    router: Router,
    broker: Broker,
    relay: OutboxRelay,
    prices: PriceCache,
    background: CancellationToken,
    // Stops the broker (started in `build`) if the application is dropped without running.
    _stop_background: DropGuard,
}

impl Application {
    /// Opens and migrates the database (SQLite before returning; PostgreSQL in the background,
    /// so the service starts while the server is away and `/readyz` says why), builds the
    /// clients, binds the port and connects to the broker.
    ///
    /// # Errors
    /// The SQLite database cannot be opened or migrated, the database URL is invalid, a client
    /// cannot be built, or the port cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let background = CancellationToken::new();
        // Armed at once: the PostgreSQL migrator started below stops if building fails later.
        let stop_background = background.clone().drop_guard();
        let metrics = Metrics::new(SERVICE);
        let (orders, outbox) = open_store(&settings, &metrics, &background).await?;
        let pricing = ResilientClient::new(settings.pricing.clone())
            .context("building the pricing client")?;
        let inventory = ResilientClient::new(settings.inventory.clone())
            .context("building the inventory client")?;
        pricing.register_metrics(&metrics);
        inventory.register_metrics(&metrics);

        let listener = shared::server::bind(&settings.host, settings.port)
            .await
            .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
        let port = listener.local_addr()?.port();

        let prices = PriceCache::default();
        let broker = Broker::start(
            SERVICE,
            settings.messaging.clone(),
            messaging::consumers(orders.clone(), prices.clone()),
            background.clone(),
        );
        let relay = OutboxRelay::with_storage(outbox, broker.publisher());
        broker.register_metrics(&metrics);
        relay.register_metrics(&metrics);

        let health = readiness_checks(orders.clone(), broker.clone(), &pricing, &inventory);
        let state = AppState {
            orders: orders.clone(),
            placement: OrderPlacement::new(
                orders,
                PricingClient::new(pricing),
                InventoryClient::new(inventory),
                prices.clone(),
                relay.clone(),
                settings.request_budget,
            ),
            relay: relay.clone(),
        };
        let chassis = Chassis {
            service: SERVICE,
            request_budget: settings.request_budget,
            body_limit: DEFAULT_BODY_LIMIT,
            metrics: metrics.clone(),
            // Behind the gateway: a refusal is a 429, which callers' breakers do not count.
            admission: Admission::new(settings.admission.limit, Refusal::TooManyRequests, &metrics),
        };
        let router =
            chassis.wrap(routes::router(state).merge(shared::health::router(health, metrics)));
        Ok(Self {
            port,
            listener,
            listener_settings: settings.admission.listener,
            router,
            broker,
            relay,
            prices,
            _stop_background: stop_background,
            background,
        })
    }

    /// The bound port (useful when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker connection (tests use it to wait for the topology and to delete it).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The price cache (tests use it to see what `price.changed` events delivered).
    pub fn price_cache(&self) -> &PriceCache {
        &self.prices
    }

    /// Serves until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// Serving failed.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shared::shutdown::on_signal()).await
    }

    /// Serves until `shutdown` is cancelled, drains in-flight requests, then stops the outbox
    /// relay and the broker connection (after the requests whose events they carry).
    ///
    /// # Errors
    /// Serving failed.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "order-service listening");
        let relay = shared::server::spawn_until(
            self.background.clone(),
            self.relay.clone().run(self.background.clone()),
        );
        let served = shared::server::serve_with(
            self.listener,
            self.router,
            self.listener_settings,
            shutdown,
            DEFAULT_DRAIN,
        )
        .await;
        self.background.cancel();
        let _ = relay.await;
        served.context("serving HTTP")
    }
}

/// The store and the outbox the relay publishes, on the backend `DATABASE_URL` names. A
/// PostgreSQL database is migrated in the background until `background` is cancelled.
async fn open_store(
    settings: &Settings,
    metrics: &Metrics,
    background: &CancellationToken,
) -> anyhow::Result<(Arc<dyn OrderRepository>, Arc<dyn OutboxStorage>)> {
    let url = &settings.database.url;
    Ok(match settings.database.backend()? {
        Backend::Sqlite => {
            let database = shared::db::connect_with(&settings.database, MIGRATIONS)
                .await
                .with_context(|| format!("opening the database {url}"))?;
            database.register_metrics(metrics);
            (
                Arc::new(SqliteOrderRepository::new(database.clone())),
                Arc::new(SqliteOutbox::new(database)),
            )
        }
        Backend::Postgres => {
            // Not the URL in the message: it may hold a password.
            let database = PgDatabase::start(url, PG_MIGRATIONS, background.clone())
                .context("opening the PostgreSQL database (DATABASE_URL)")?;
            (
                Arc::new(PgOrderRepository::new(database.clone())),
                Arc::new(PgOutbox::new(database)),
            )
        }
    })
}

/// Ready when the database answers and the broker is connected (both are needed to accept an
/// order and publish it). The two dependencies' breakers are shown but never make this service
/// unready: an outage downstream must not take order-service out of rotation too.
fn readiness_checks(
    orders: Arc<dyn OrderRepository>,
    broker: Broker,
    pricing: &ResilientClient,
    inventory: &ResilientClient,
) -> Health {
    let pricing = pricing.clone();
    let inventory = inventory.clone();
    Health::new(SERVICE)
        .critical("database", move || {
            let orders = orders.clone();
            async move { shared::health::timed_probe(orders.ping()).await }
        })
        .critical("broker", move || {
            let broker = broker.clone();
            async move { broker.health_check() }
        })
        .informational("pricing", move || {
            let status = pricing.health_check();
            async move { status }
        })
        .informational("inventory", move || {
            let status = inventory.health_check();
            async move { status }
        })
}
