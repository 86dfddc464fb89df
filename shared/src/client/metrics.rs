//! Client metrics: per-client atomic counters, exposed by one collector per registry at scrape time.
//!
//! Counting is a relaxed atomic increment on the hot path. The `http_client_*` families are
//! written by a single collector shared by every client registered in a [`Metrics`] registry,
//! because OpenMetrics allows each family name once per exposition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::breaker::CircuitBreaker;
use super::instances::Instances;
use crate::metrics::Metrics;

/// How a call ended, the `outcome` label of `http_client_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Success,
    /// A 4xx after retries.
    ClientError,
    /// A 5xx after retries.
    ServerError,
    /// The last attempt timed out.
    Timeout,
    /// No time was left to (re)try.
    DeadlineExceeded,
    /// The last attempt could not connect.
    ConnectError,
    /// The connection failed mid-request.
    TransportError,
    /// The breaker was open; nothing was sent.
    CircuitOpen,
}

impl Outcome {
    const ALL: [Self; 8] = [
        Self::Success,
        Self::ClientError,
        Self::ServerError,
        Self::Timeout,
        Self::DeadlineExceeded,
        Self::ConnectError,
        Self::TransportError,
        Self::CircuitOpen,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::ConnectError => "connect_error",
            Self::TransportError => "transport_error",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

/// One client's counters.
#[derive(Debug, Default)]
pub struct ClientStats {
    requests: [AtomicU64; Outcome::ALL.len()],
    retries: AtomicU64,
    hedges: AtomicU64,
    budget_exhausted: AtomicU64,
}

impl ClientStats {
    /// Counts a finished call.
    pub fn call(&self, outcome: Outcome) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a retry about to be sent.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a hedge about to be sent.
    pub fn hedge(&self) {
        self.hedges.fetch_add(1, Ordering::Relaxed);
    }

    /// Hedges sent so far.
    pub fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Relaxed)
    }

    /// Counts a retry or hedge refused by the budget.
    pub fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls that ended with `outcome` so far.
    pub fn calls(&self, outcome: Outcome) -> u64 {
        self.requests[outcome as usize].load(Ordering::Relaxed)
    }

    /// Retries sent so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Retries refused by the budget so far.
    pub fn budget_exhaustions(&self) -> u64 {
        self.budget_exhausted.load(Ordering::Relaxed)
    }
}

/// What the collector reads from one client.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The dependency's name (the `dependency` label).
    pub dependency: &'static str,
    /// Its counters.
    pub stats: Arc<ClientStats>,
    /// Its breaker.
    pub breaker: Arc<CircuitBreaker>,
    /// Its instances.
    pub instances: Arc<Instances>,
}

/// The clients registered in one [`Metrics`] registry (see [`Metrics::shared`]).
#[derive(Debug, Default)]
struct Registered {
    clients: Mutex<Vec<Observed>>,
}

/// Adds `client` to the collector of `metrics`, creating and registering it on first use.
///
/// A second client with the same dependency name replaces the first, so the exposition never holds
/// two series with the same labels.
pub fn register(metrics: &Metrics, client: Observed) {
    let registered = metrics.shared(|metrics| {
        let registered = Arc::new(Registered::default());
        metrics.register_collector(Box::new(ClientCollector(Arc::clone(&registered))));
        registered
    });
    let mut clients = registered.clients.lock().unwrap_or_else(|e| e.into_inner());
    clients.retain(|c| c.dependency != client.dependency);
    clients.push(client);
}

#[derive(Debug)]
struct ClientCollector(Arc<Registered>);

impl Collector for ClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let clients = self.0.clients.lock().unwrap_or_else(|e| e.into_inner());

        let mut family = encoder.encode_descriptor(
            "http_client_breaker_state",
            "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open",
            None,
            MetricType::Gauge,
        )?;
        for c in clients.iter() {
            let gauge = ConstGauge::new(c.breaker.state().as_gauge());
            gauge.encode(family.encode_family(&[("dependency", c.dependency)])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "http_client_requests",
            "Calls to a dependency (retries included in one call), by outcome",
            None,
            MetricType::Counter,
        )?;
        for c in clients.iter() {
            for outcome in Outcome::ALL {
                let labels = [("dependency", c.dependency), ("outcome", outcome.as_str())];
                ConstCounter::new(c.stats.calls(outcome)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "http_client_retries",
            "Retries sent to a dependency",
            None,
            MetricType::Counter,
        )?;
        for c in clients.iter() {
            ConstCounter::new(c.stats.retries())
                .encode(family.encode_family(&[("dependency", c.dependency)])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "http_client_hedges",
            "Hedged attempts sent to a dependency (an attempt was slow, another joined it)",
            None,
            MetricType::Counter,
        )?;
        for c in clients.iter() {
            ConstCounter::new(c.stats.hedges())
                .encode(family.encode_family(&[("dependency", c.dependency)])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "http_client_budget_exhausted",
            "Retries and hedges not sent because the retry budget was spent",
            None,
            MetricType::Counter,
        )?;
        for c in clients.iter() {
            ConstCounter::new(c.stats.budget_exhaustions())
                .encode(family.encode_family(&[("dependency", c.dependency)])?)?;
        }

        let views: Vec<_> = clients
            .iter()
            .map(|c| (c.dependency, c.instances.views()))
            .collect();
        let mut family = encoder.encode_descriptor(
            "http_client_instance_ejected",
            "1 while an instance of a dependency is ejected for failing, else 0",
            None,
            MetricType::Gauge,
        )?;
        for (dependency, instances) in &views {
            for i in instances {
                let labels = [
                    ("dependency", *dependency),
                    ("instance", i.address.as_str()),
                ];
                ConstGauge::new(i64::from(i.ejected)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "http_client_instance_in_flight",
            "Attempts in flight on an instance of a dependency",
            None,
            MetricType::Gauge,
        )?;
        for (dependency, instances) in &views {
            for i in instances {
                let labels = [
                    ("dependency", *dependency),
                    ("instance", i.address.as_str()),
                ];
                ConstGauge::new(i64::try_from(i.in_flight).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "http_client_instance_attempts",
            "Attempts on an instance of a dependency, by result (failure: counted against it)",
            None,
            MetricType::Counter,
        )?;
        for (dependency, instances) in &views {
            for i in instances {
                for (result, count) in [
                    ("failure", i.failures),
                    ("other", i.attempts.saturating_sub(i.failures)),
                ] {
                    let labels = [
                        ("dependency", *dependency),
                        ("instance", i.address.as_str()),
                        ("result", result),
                    ];
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
