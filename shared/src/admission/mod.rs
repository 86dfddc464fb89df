//! Admission control: what a service lets in when more arrives than it can serve quickly.
//!
//! ```text
//!   TCP ──► listener (listener.rs): ≤ max connections, header read and idle timeouts
//!   request ──► /healthz, /readyz, /metrics ────────────────────────────► always served
//!           └─► in flight < limit? ── yes ─► served; its latency feeds the limit (gradient.rs)
//!                                    └ no ──► 503 problem + Retry-After, at once
//! ```
//!
//! Without a limit an overloaded service queues: every request waits behind all the others,
//! latency grows until callers time out, and their timeouts count against the service in their
//! breakers. With one it serves what it can at its usual latency and refuses the rest in
//! microseconds, which tells the caller to come back later while it still has time to do so. The
//! limit is not a number tuned to today's hardware: it follows the latency the service measures
//! (see [`gradient`]), like Envoy's adaptive concurrency filter and Netflix's concurrency-limits.
//!
//! No maintained Rust crate implements these algorithms as a tower layer (the one published port
//! of Netflix's library has a single 0.1 release), so the algorithm is ours, in one small
//! file with its tests.

pub mod gradient;
pub mod listener;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use crate::config::{ConfigError, Env};
use crate::metrics::Metrics;
use crate::problem::Problem;

pub use gradient::{GradientLimit, LimitSettings};
pub use listener::ListenerSettings;

/// Paths that are answered whatever the load: an orchestrator that cannot probe a busy service
/// restarts it (losing the work in flight), and metrics matter most while overloaded.
pub const NEVER_SHED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// A refused request is told to come back after this long: 1 s, the smallest `Retry-After`, since
/// a limit that follows latency frees slots within a few hundred milliseconds.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How a request over the limit is refused. Both answers carry `Retry-After` and a problem
/// document; they differ in what the caller's resilient client makes of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `503 Service Unavailable`: at the edge, where the caller is a person or a program outside
    /// the system, and "the service is busy, come back later" is the standard answer.
    Unavailable,
    /// `429 Too Many Requests`: inside the system, where the caller is one of our services. Its
    /// resilient client treats a `429` as a live dependency pushing back (retried within budget,
    /// never counted against the breaker), whereas a `503` counts as a failure: a burst shed by
    /// order-service must not open the gateway's breaker for a healthy order-service. (Netflix's
    /// concurrency-limits filter refuses with 429 by default for the same reason.)
    TooManyRequests,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// A service's admission settings: its listener's bounds and its concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmissionSettings {
    /// Timeouts and the connection limit of the listener.
    pub listener: ListenerSettings,
    /// The adaptive concurrency limit's bounds.
    pub limit: LimitSettings,
}

impl AdmissionSettings {
    /// Reads the listener's variables (see [`ListenerSettings::from_env`]) and
    /// `ADMISSION_INITIAL_LIMIT`, `ADMISSION_MIN_LIMIT`, `ADMISSION_MAX_LIMIT`.
    ///
    /// # Errors
    /// Returns [`ConfigError`] for a value that is not a number, zero, or a minimum above the
    /// maximum.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = LimitSettings::default();
        let limit = LimitSettings {
            initial: env.parse_or("ADMISSION_INITIAL_LIMIT", defaults.initial)?,
            min: env.parse_or("ADMISSION_MIN_LIMIT", defaults.min)?,
            max: env.parse_or("ADMISSION_MAX_LIMIT", defaults.max)?,
        };
        if limit.min == 0 || limit.min > limit.max {
            return Err(ConfigError {
                key: "ADMISSION_MIN_LIMIT".to_owned(),
                value: limit.min.to_string(),
                reason: format!("must be between 1 and ADMISSION_MAX_LIMIT ({})", limit.max),
            });
        }
        Ok(Self {
            listener: ListenerSettings::from_env(env)?,
            limit,
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// A service's concurrency limit and its counters. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: Mutex<GradientLimit>,
    /// The limit as last computed, read without the lock on every request.
    current: AtomicUsize,
    in_flight: AtomicUsize,
    limit_gauge: Gauge,
    in_flight_gauge: Gauge,
    admitted: Counter,
    rejected: Counter,
    refusal: Refusal,
}

impl Admission {
    /// A limit with `settings` that refuses with `refusal`, reporting `admission_limit`,
    /// `admission_in_flight` and `admission_requests_total{outcome="admitted"|"rejected"}` into
    /// `metrics`.
    pub fn new(settings: LimitSettings, refusal: Refusal, metrics: &Metrics) -> Self {
        let limit = GradientLimit::new(settings);
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        // One statement each: the family's guard must be released before the next lookup, which
        // takes its write lock to create the second series.
        let admitted = outcomes
            .get_or_create(&OutcomeLabels {
                outcome: "admitted",
            })
            .clone();
        let rejected = outcomes
            .get_or_create(&OutcomeLabels {
                outcome: "rejected",
            })
            .clone();
        let inner = Inner {
            current: AtomicUsize::new(limit.limit()),
            limit: Mutex::new(limit),
            in_flight: AtomicUsize::new(0),
            limit_gauge: Gauge::default(),
            in_flight_gauge: Gauge::default(),
            admitted,
            rejected,
            refusal,
        };
        inner
            .limit_gauge
            .set(gauge_value(inner.current.load(Ordering::Relaxed)));
        metrics.register(
            "admission_limit",
            "Requests this service admits at once (adaptive)",
            inner.limit_gauge.clone(),
        );
        metrics.register(
            "admission_in_flight",
            "Admitted requests being served",
            inner.in_flight_gauge.clone(),
        );
        metrics.register(
            "admission_requests",
            "Requests admitted or rejected by the concurrency limit",
            outcomes,
        );
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed)
    }

    /// Takes a slot if one is free. The slot is given back, and the request's latency recorded,
    /// when the returned [`Permit`] is dropped.
    pub fn try_admit(&self) -> Option<Permit> {
        let inner = &self.inner;
        let in_flight = inner.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        if in_flight > inner.current.load(Ordering::Relaxed) {
            inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            inner.rejected.inc();
            return None;
        }
        inner.admitted.inc();
        inner.in_flight_gauge.set(gauge_value(in_flight));
        Some(Permit {
            admission: self.clone(),
            started: Instant::now(),
            in_flight,
            completed: false,
        })
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// An admitted request's slot.
#[derive(Debug)]
pub struct Permit {
    admission: Admission,
    started: Instant,
    in_flight: usize,
    completed: bool,
}

impl Permit {
    /// Marks the request as answered, so its latency is a sample of the service's. A request
    /// dropped before that (its client hung up) gives its slot back without a sample.
    pub fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let inner = &self.admission.inner;
        let in_flight = inner.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        inner.in_flight_gauge.set(gauge_value(in_flight));
        if self.completed {
            let now = Instant::now();
            let rtt = now.duration_since(self.started);
            let mut limit = inner.limit.lock().unwrap_or_else(|e| e.into_inner());
            let updated = limit.sample(now.into_std(), rtt, self.in_flight);
            drop(limit);
            if inner.current.swap(updated, Ordering::Relaxed) != updated {
                inner.limit_gauge.set(gauge_value(updated));
            }
        }
    }
}

/// Axum middleware that admits a request within the limit or refuses it at once (see
/// [`Refusal`]) with a problem and `Retry-After`; [`NEVER_SHED`] paths pass without counting.
pub async fn admit(State(admission): State<Admission>, request: Request, next: Next) -> Response {
    if NEVER_SHED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Some(permit) = admission.try_admit() else {
        return overloaded(admission.inner.refusal).into_response();
    };
    let response = next.run(request).await;
    permit.complete();
    response
}

/// The answer to a request over the limit.
pub fn overloaded(refusal: Refusal) -> Problem {
    Problem::new(refusal.status(), "Overloaded")
        .detail("the service is at its concurrency limit; retry after the Retry-After delay")
        .retry_after(RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_over_the_limit_are_refused_and_counted() {
        let metrics = Metrics::new("test");
        let admission = Admission::new(
            LimitSettings {
                initial: 2,
                min: 1,
                max: 10,
            },
            Refusal::Unavailable,
            &metrics,
        );
        let first = admission.try_admit().expect("a free slot");
        let _second = admission.try_admit().expect("a free slot");
        assert!(
            admission.try_admit().is_none(),
            "the third is over the limit"
        );
        first.complete();
        assert!(
            admission.try_admit().is_some(),
            "a finished request frees its slot"
        );
        let rendered = metrics.render();
        assert!(
            rendered.contains("admission_requests_total{service=\"test\",outcome=\"admitted\"} 3"),
            "{rendered}"
        );
        assert!(
            rendered.contains("admission_requests_total{service=\"test\",outcome=\"rejected\"} 1"),
            "{rendered}"
        );
        assert!(
            rendered.contains("admission_limit{service=\"test\"} 2"),
            "{rendered}"
        );
    }

    #[test]
    fn the_minimum_may_not_exceed_the_maximum() {
        let env = Env::from_pairs([("ADMISSION_MIN_LIMIT", "50"), ("ADMISSION_MAX_LIMIT", "10")]);
        let error = AdmissionSettings::from_env(&env).expect_err("must fail");
        assert_eq!(error.key, "ADMISSION_MIN_LIMIT");
    }
}
