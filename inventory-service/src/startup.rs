//! Wiring: database, broker, routes and background workers, and their orderly shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use shared::admission::{Admission, ListenerSettings, Refusal};
use shared::health::Health;
use shared::messaging::Broker;
use shared::metrics::Metrics;
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
use crate::store::{
    InventoryStore, MIGRATIONS, PG_MIGRATIONS, PgInventoryStore, SqliteInventoryStore,
};
use crate::sweeper;

/// The built service, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    listener: TcpListener,
    listener_settings: ListenerSettings,
    router: Router,
    store: Arc<dyn InventoryStore>,
    broker: Broker,
    sweep_interval: Duration,
    background: CancellationToken,
    // Stops the broker (started in `build`) if the application is dropped without running.
    _stop_background: DropGuard,
}

impl Application {
    /// Opens the database (SQLite: opened and migrated now; PostgreSQL: connected and migrated
    /// in the background, so the service starts while the server is away and `/readyz` says
    /// why), binds the port and connects to the broker.
    ///
    /// # Errors
    /// The SQLite database cannot be opened or migrated, the PostgreSQL URL is invalid, or the
    /// port cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let background = CancellationToken::new();
        let metrics = Metrics::new(SERVICE);
        let store = open_store(&settings, &metrics, background.clone()).await?;
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

        broker.register_metrics(&metrics);
        let health = readiness_checks(store.clone(), broker.clone());
        let state = AppState {
            store: store.clone(),
            reservation_ttl: settings.reservation_ttl,
            low_stock_threshold: settings.low_stock_threshold,
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
            store,
            broker,
            sweep_interval: settings.sweep_interval,
            _stop_background: background.clone().drop_guard(),
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

    /// Serves until `shutdown` is cancelled, drains in-flight requests, then stops the sweeper and
    /// the broker connection (consumers stop after the requests they might race with).
    ///
    /// # Errors
    /// Serving failed.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "inventory-service listening");
        let sweeper = shared::server::spawn_until(
            self.background.clone(),
            sweeper::run(self.store.clone(), self.sweep_interval),
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
        let _ = sweeper.await;
        served.context("serving HTTP")
    }
}

/// The store `DATABASE_URL` names. PostgreSQL's migrations retry until `background` is cancelled.
async fn open_store(
    settings: &Settings,
    metrics: &Metrics,
    background: CancellationToken,
) -> anyhow::Result<Arc<dyn InventoryStore>> {
    Ok(match settings.database.backend()? {
        Backend::Sqlite => {
            let database = shared::db::connect_with(&settings.database, MIGRATIONS)
                .await
                .with_context(|| format!("opening the database {}", settings.database.url))?;
            database.register_metrics(metrics);
            Arc::new(SqliteInventoryStore::new(database))
        }
        Backend::Postgres => {
            // Not the URL in the message: it may hold a password.
            let database = PgDatabase::start(&settings.database.url, PG_MIGRATIONS, background)
                .context("opening the PostgreSQL database named by DATABASE_URL")?;
            Arc::new(PgInventoryStore::new(database))
        }
    })
}

/// Ready when the database answers and the broker is connected with its topology declared: both
/// are needed to take a reservation and to see it committed.
fn readiness_checks(store: Arc<dyn InventoryStore>, broker: Broker) -> Health {
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
