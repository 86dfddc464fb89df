//! Prometheus metrics: one registry per service instance, rendered at `/metrics`.
//!
//! A registry per [`Metrics`] value (rather than a process-global one) lets the end-to-end tests run
//! all four services in one process without their counters mixing. Components that own live state,
//! like a client's circuit breaker, register a [`Collector`] that reads it at scrape time.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    method: String,
    route: String,
}

/// A service's metrics registry and its HTTP server metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    requests: Family<RouteLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    shared: Arc<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl Metrics {
    /// A registry whose metrics all carry the label `service`.
    pub fn new(service: &'static str) -> Self {
        let mut registry =
            Registry::with_labels(std::iter::once((service_label(), service.into())));
        let requests = Family::<RouteLabels, Counter>::default();
        // Buckets from 0.5 ms to ~8 s: internal hops are sub-millisecond, the edge budget is seconds.
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 15,
            ))
        });
        registry.register(
            "http_requests",
            "HTTP requests served, by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, by route",
            latency.clone(),
        );
        Self {
            registry: Arc::new(RwLock::new(registry)),
            requests,
            latency,
            shared: Arc::default(),
        }
    }

    /// This registry's single `T`, built (and its metrics registered) by `init` on first use.
    ///
    /// For components with several instances per service that report into one metric family, such
    /// as the clients of each dependency: OpenMetrics allows each family name once per exposition,
    /// so the instances share one collector rather than registering one each.
    pub fn shared<T: Any + Send + Sync>(&self, init: impl FnOnce(&Self) -> T) -> Arc<T> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let entry = shared
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(init(self)));
        // The map is keyed by the value's own type, so the downcast cannot fail.
        Arc::clone(entry)
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("metrics.shared is keyed by TypeId"))
    }

    /// Registers a metric owned by a component.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.write().register(name, help, metric);
    }

    /// Registers a collector that reads live state when scraped.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.write().register_collector(collector);
    }

    /// The OpenMetrics text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one served request; used by [`crate::server`]'s observing middleware.
    pub(crate) fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(seconds);
    }
}

fn service_label() -> std::borrow::Cow<'static, str> {
    "service".into()
}

/// Axum middleware that records request counts and latency per matched route.
pub async fn track(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    // The matched route template (`/orders/{id}`), never the raw path: raw paths would create one
    // time series per order ID.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = next.run(request).await;
    metrics.observe(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
