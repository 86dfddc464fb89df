//! Wiring: database (SQLite or PostgreSQL), broker, outbox relay and routes, and their orderly shutdown.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use shared::admission::{Admission, ListenerSettings, Refusal};
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
use crate::config::Settings;
use crate::messaging::OrderEventsHandler;
use crate::routes;
use crate::state::AppState;
use crate::store::{MIGRATIONS, PG_MIGRATIONS, PgPriceStore, PriceStore, SqlitePriceStore};

/// The built service, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    listener: TcpListener,
    listener_settings: ListenerSettings,
    router: Router,
    relay: OutboxRelay,
    broker: Broker,
    background: CancellationToken,
    // Stops the broker and the PostgreSQL migrator (started in `build`) if the application is
    // dropped without running.
    _stop_background: DropGuard,
}

impl Application {
    /// Opens the database (SQLite: opened and migrated here; PostgreSQL: connected and migrated
    /// in the background, so the service starts while the server is away and `/readyz` says
    /// why), binds the port and connects to the broker.
    ///
    /// # Errors
    /// The SQLite database cannot be opened or migrated, the PostgreSQL URL is invalid, or the
    /// port cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let background = CancellationToken::new();
        // Stops the PostgreSQL migrator (started below) also when a later step fails.
        let stop_background = background.clone().drop_guard();
        let metrics = Metrics::new(SERVICE);
        let (store, outbox) = open_store(&settings, &metrics, &background).await?;
        let listener = shared::server::bind(&settings.host, settings.port)
            .await
            .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
        let port = listener.local_addr()?.port();

        let broker = Broker::start(
            SERVICE,
            settings.messaging.clone(),
            vec![OrderEventsHandler::consumer(store.clone())],
            background.clone(),
        );
        let relay = OutboxRelay::with_storage(outbox, broker.publisher());

        broker.register_metrics(&metrics);
        relay.register_metrics(&metrics);
        let health = readiness_checks(store.clone(), broker.clone());
        let state = AppState {
            store,
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
            relay,
            broker,
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

    /// Serves until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// Serving failed.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shared::shutdown::on_signal()).await
    }

    /// Serves until `shutdown` is cancelled, drains in-flight requests, then stops the outbox
    /// relay and the broker connection (after the requests that might still enqueue events).
    ///
    /// # Errors
    /// Serving failed.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "pricing-service listening");
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

/// The store and the outbox the relay reads, on the backend `DATABASE_URL` names.
async fn open_store(
    settings: &Settings,
    metrics: &Metrics,
    background: &CancellationToken,
) -> anyhow::Result<(Arc<dyn PriceStore>, Arc<dyn OutboxStorage>)> {
    Ok(match settings.database.backend()? {
        Backend::Sqlite => {
            let database = shared::db::connect_with(&settings.database, MIGRATIONS)
                .await
                .with_context(|| format!("opening the database {}", settings.database.url))?;
            database.register_metrics(metrics);
            (
                Arc::new(SqlitePriceStore::new(database.clone())),
                Arc::new(SqliteOutbox::new(database)),
            )
        }
        Backend::Postgres => {
            // Not the URL in the message: it may hold a password.
            let database =
                PgDatabase::start(&settings.database.url, PG_MIGRATIONS, background.clone())
                    .context("opening the PostgreSQL database named by DATABASE_URL")?;
            (
                Arc::new(PgPriceStore::new(database.clone())),
                // Of several replicas, the one holding the relay's advisory lock publishes.
                Arc::new(PgOutbox::new(database)),
            )
        }
    })
}

/// Ready when the database answers and the broker is connected with its topology declared.
fn readiness_checks(store: Arc<dyn PriceStore>, broker: Broker) -> Health {
    Health::new(SERVICE)
        .critical("database", move || {
            let store = store.clone();
            async move { shared::health::timed_probe(store.ping()).await }
        })
        .critical("broker", move || {
            let broker = broker.clone();
            async move { broker.health_check() }
        })
}
