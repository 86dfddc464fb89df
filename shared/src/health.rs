//! Liveness, readiness and metrics routes, the same on every service.
//!
//! `/healthz` answers as long as the process can serve HTTP. `/readyz` runs the registered checks:
//! a *critical* check (the database, the broker connection) makes the service not ready (`503`);
//! an informational one (a dependency's circuit breaker) is reported but does not. Failing
//! readiness because a downstream service is unhealthy would take this service out of rotation
//! too and turn one outage into a cascade, so breaker state is shown, not enforced.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::{BoxFuture, join_all};
use serde_json::{Map, Value, json};

use crate::metrics::Metrics;

/// The outcome of one readiness check.
#[derive(Debug, Clone)]
pub struct CheckStatus {
    /// Whether this part is working.
    pub ok: bool,
    /// What to show about it (state, error, counters).
    pub detail: Value,
}

impl CheckStatus {
    /// A passing check with `detail`.
    pub fn ok(detail: Value) -> Self {
        Self { ok: true, detail }
    }

    /// A failing check with `detail`.
    pub fn failing(detail: Value) -> Self {
        Self { ok: false, detail }
    }
}

/// A probe that takes longer than this counts as failing: a healthy local dependency (SQLite's
/// `SELECT 1`) answers in microseconds, and `/readyz` must answer well within an orchestrator's
/// usual 1 s probe timeout.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs `probe` under [`PROBE_TIMEOUT`]: `Ok` → ok (`"reachable"`), an error or a timeout → failing
/// with the reason. For dependencies a service cannot work without, such as its database.
pub async fn timed_probe<E: std::fmt::Display>(
    probe: impl Future<Output = Result<(), E>>,
) -> CheckStatus {
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => CheckStatus::ok(json!("reachable")),
        Ok(Err(error)) => CheckStatus::failing(json!(error.to_string())),
        Err(_) => CheckStatus::failing(json!("timed out")),
    }
}

type Probe = Arc<dyn Fn() -> BoxFuture<'static, CheckStatus> + Send + Sync>;

#[derive(Clone)]
struct Check {
    name: String,
    critical: bool,
    probe: Probe,
}

/// The service's readiness checks.
#[derive(Clone)]
pub struct Health {
    service: &'static str,
    checks: Vec<Check>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.checks.iter().map(|c| c.name.as_str()).collect();
        f.debug_struct("Health")
            .field("service", &self.service)
            .field("checks", &names)
            .finish()
    }
}

impl Health {
    /// No checks yet.
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            checks: Vec::new(),
        }
    }

    /// Adds a check that makes the service not ready when it fails.
    #[must_use]
    pub fn critical<F, Fut>(self, name: &str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckStatus> + Send + 'static,
    {
        self.add(name, true, probe)
    }

    /// Adds a check that is reported but never makes the service not ready.
    #[must_use]
    pub fn informational<F, Fut>(self, name: &str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckStatus> + Send + 'static,
    {
        self.add(name, false, probe)
    }

    fn add<F, Fut>(mut self, name: &str, critical: bool, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckStatus> + Send + 'static,
    {
        self.checks.push(Check {
            name: name.to_owned(),
            critical,
            probe: Arc::new(move || Box::pin(probe())),
        });
        self
    }

    /// Runs every check concurrently; returns overall readiness and the report body.
    pub async fn report(&self) -> (bool, Value) {
        let results = join_all(self.checks.iter().map(|c| (c.probe)())).await;
        let mut ready = true;
        let mut checks = Map::new();
        for (check, status) in self.checks.iter().zip(results) {
            ready &= status.ok || !check.critical;
            checks.insert(
                check.name.clone(),
                json!({ "ok": status.ok, "critical": check.critical, "detail": status.detail }),
            );
        }
        let body = json!({
            "service": self.service,
            "status": if ready { "ready" } else { "not ready" },
            "checks": checks,
        });
        (ready, body)
    }
}

#[derive(Clone)]
struct Probes {
    health: Health,
    metrics: Metrics,
}

/// `/healthz`, `/readyz` and `/metrics`, to merge into a service's router.
pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .route("/metrics", get(render_metrics))
        .with_state(Probes { health, metrics })
}

async fn liveness(State(probes): State<Probes>) -> Response {
    axum::Json(json!({ "status": "ok", "service": probes.health.service })).into_response()
}

async fn readiness(State(probes): State<Probes>) -> Response {
    let (ready, body) = probes.health.report().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn render_metrics(State(probes): State<Probes>) -> Response {
    let mut response = probes.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
