//! Building the gateway (clients, router, listener) and serving it until shutdown.

use anyhow::Context as _;
use axum::Router;
use axum::middleware;
use shared::admission::{Admission, ListenerSettings, Refusal};
use shared::client::ResilientClient;
use shared::health::{self, CheckStatus, Health};
use shared::metrics::Metrics;
use shared::server::{self, Chassis, DEFAULT_BODY_LIMIT};
use shared::shutdown::DEFAULT_DRAIN;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::SERVICE;
use crate::config::Settings;
use crate::rate_limit::{self, ClientRateLimit};
use crate::routes;
use crate::state::AppState;

/// A built gateway, bound to its port and ready to serve.
#[derive(Debug)]
pub struct Application {
    port: u16,
    listener: TcpListener,
    listener_settings: ListenerSettings,
    router: Router,
}

impl Application {
    /// Builds one client per dependency, the router and the listener.
    ///
    /// # Errors
    /// Fails if a client cannot be built or the address cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        if settings.admin_api_key.is_default() {
            tracing::warn!(
                "ADMIN_API_KEY is not set: price changes accept the well-known development key; set ADMIN_API_KEY outside development"
            );
        }
        let metrics = Metrics::new(SERVICE);
        let rate_limit = ClientRateLimit::new(&settings.rate_limit, settings.admin_api_key.clone());
        if !rate_limit.is_enabled() {
            tracing::warn!("RATE_LIMIT_PER_SECOND=0: per-client rate limits are off");
        }
        let state = AppState {
            order: client(settings.order, &metrics)?,
            inventory: client(settings.inventory, &metrics)?,
            pricing: client(settings.pricing, &metrics)?,
            admin_api_key: settings.admin_api_key,
        };
        // The breakers are informational: a gateway that reported "not ready" whenever one
        // service is down would be taken out of rotation and turn a partial outage into a total one.
        let health = Health::new(SERVICE)
            .informational("order", breaker_check(state.order.clone()))
            .informational("inventory", breaker_check(state.inventory.clone()))
            .informational("pricing", breaker_check(state.pricing.clone()));
        let chassis = Chassis {
            service: SERVICE,
            request_budget: settings.request_budget,
            body_limit: DEFAULT_BODY_LIMIT,
            metrics: metrics.clone(),
            // The edge: a refused client outside the system is told the service is busy.
            admission: Admission::new(settings.admission.limit, Refusal::Unavailable, &metrics),
        };
        // Rate limits cover the public API only: probes and scrapes are never limited.
        let api = routes::router(state).layer(middleware::from_fn_with_state(
            rate_limit,
            rate_limit::enforce,
        ));
        let router = chassis.wrap(api.merge(health::router(health, metrics)));
        let listener = server::bind(&settings.host, settings.port)
            .await
            .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        Ok(Self {
            port,
            listener,
            listener_settings: settings.admission.listener,
            router,
        })
    }

    /// The port actually bound (useful when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT or SIGTERM, then drains in-flight requests.
    ///
    /// # Errors
    /// Fails if serving fails.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shared::shutdown::on_signal()).await
    }

    /// Serves until `shutdown` is cancelled (tests own the token).
    ///
    /// # Errors
    /// Fails if serving fails.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "gateway listening");
        server::serve_with(
            self.listener,
            self.router,
            self.listener_settings,
            shutdown,
            DEFAULT_DRAIN,
        )
        .await
        .context("serving HTTP")
    }
}

fn client(
    config: shared::client::ClientConfig,
    metrics: &Metrics,
) -> anyhow::Result<ResilientClient> {
    let name = config.name;
    let client =
        ResilientClient::new(config).with_context(|| format!("building the {name} client"))?;
    client.register_metrics(metrics);
    Ok(client)
}

fn breaker_check(
    client: ResilientClient,
) -> impl Fn() -> std::future::Ready<CheckStatus> + Send + Sync + 'static {
    move || std::future::ready(client.health_check())
}
