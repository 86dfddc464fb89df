//! Circuit breaker: stop calling a dependency that keeps failing, probe it again after a while.
//!
//! `Closed` → (`failure_threshold` consecutive failed calls) → `Open` → (`open_for` elapsed) →
//! `HalfOpen`, where at most `half_open_probes` calls go through at once: the first probe to
//! succeed closes the breaker, the first to fail opens it again.
//!
//! It counts *calls*, not attempts: a call fails when every attempt it made (retries and hedges
//! included) failed, and succeeds when any attempt proved the dependency alive. Counting attempts
//! opened it on a mostly healthy dependency: with 30 % of attempts failing, five failed attempts
//! in a row are likely somewhere among a few hundred, and the breaker then turned a partial
//! failure into a full outage for `open_for`. A call fails only when its retries failed too
//! (0.3³ ≈ 2.7 % of calls), and five of those in a row over 1,000 calls has a chance of about
//! 1.4 × 10⁻⁵ (docs/decisions/0101). Ejection (`instances.rs`) takes a single failing instance
//! out; the breaker is for the dependency as a whole.
//!
//! It counts *consecutive* failures rather than a failure rate over a sliding window. A rate needs
//! a minimum request volume per window to mean anything (Hystrix, resilience4j: 20 calls), which a
//! demo clicking through a few requests never reaches, so a rate-based breaker would never trip
//! where people watch it. Consecutive failed calls trip after a handful of calls at any traffic
//! level, and any success in between resets them, so a dependency that fails only sometimes is
//! left alone.
//!
//! The state is a few words behind a `std::sync::Mutex` that is held for a comparison and an
//! assignment, never across an `.await`. Time is `tokio::time::Instant`, so tests drive `open_for`
//! with the paused clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast.
    Open,
    /// A limited number of probes are let through.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of the `http_client_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Breaker thresholds.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Consecutive failed calls that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before half-opening.
    pub open_for: Duration,
    /// Probes allowed at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// 5 consecutive failed calls, open for 5 s, 1 probe.
    ///
    /// - **5 calls**: a demo that stops a container sees the breaker trip on its fifth request
    ///   (each call's attempts fail within milliseconds on a refused connect), while a dependency
    ///   failing 30 % of attempts opens it over 1,000 calls with a chance of about 1.4 × 10⁻⁵.
    /// - **5 s open**: long enough to shed load from a dependency that is restarting (a container
    ///   restart takes seconds), short enough that recovery shows up quickly in a demo and that a
    ///   briefly sick dependency is not shunned for long.
    /// - **1 probe**: one request is enough to learn whether the dependency is back; letting more
    ///   through would send a burst to a service that may still be down.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// How long a caller is told to wait when the breaker is half-open and its probe slots are taken:
/// the probes are in flight and will settle the state within about one attempt timeout, so "come
/// back in a second" (the smallest `Retry-After` HTTP can express) is the honest answer.
const PROBES_BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A circuit breaker for one dependency.
#[derive(Debug)]
pub struct CircuitBreaker {
    dependency: &'static str,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every transition, so the outcome of a call admitted under an earlier state
    /// (a slow call that was let through before the breaker opened) cannot flip the current one.
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

/// Permission to make one call; report how it went with [`Permit::record`].
///
/// Dropping a permit without recording (the caller's future was cancelled) releases its probe slot
/// and counts as neither success nor failure.
#[derive(Debug)]
#[must_use = "record the attempt's outcome, or the breaker learns nothing"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    /// Reports the call: `failure` is true when its attempts failed (connect errors, timeouts,
    /// 5xx); an answer that proves the dependency alive (a success, a 4xx or 429) is `false`.
    pub fn record(mut self, failure: bool) {
        self.settled = true;
        self.breaker
            .settle(self.generation, self.probe, Some(failure));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.generation, self.probe, None);
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker for `dependency`.
    pub fn new(dependency: &'static str, config: BreakerConfig) -> Self {
        Self {
            dependency,
            config,
            inner: Mutex::new(Inner {
                phase: Phase::Closed {
                    consecutive_failures: 0,
                },
                generation: 0,
            }),
        }
    }

    /// The current state (an open breaker whose `open_for` has passed reports half-open).
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner, Instant::now());
        match inner.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long the breaker stays open, when it is open (not when half-open).
    pub fn open_remaining(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner, now);
        match inner.phase {
            Phase::Open { until } => Some(until.saturating_duration_since(now)),
            Phase::Closed { .. } | Phase::HalfOpen { .. } => None,
        }
    }

    /// Consecutive failures counted while closed (0 in the other states).
    pub fn consecutive_failures(&self) -> u32 {
        match self.lock().phase {
            Phase::Closed {
                consecutive_failures,
            } => consecutive_failures,
            Phase::Open { .. } | Phase::HalfOpen { .. } => 0,
        }
    }

    /// Asks to make one call.
    ///
    /// # Errors
    /// When the breaker is open, or half-open with every probe slot taken, returns how long until
    /// it is worth asking again.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.half_open_if_due(&mut inner, now);
        let probe = match &mut inner.phase {
            Phase::Closed { .. } => false,
            Phase::Open { until } => return Err(until.saturating_duration_since(now)),
            Phase::HalfOpen { probes_in_flight } => {
                if *probes_in_flight >= self.config.half_open_probes {
                    return Err(PROBES_BUSY_RETRY_AFTER);
                }
                *probes_in_flight += 1;
                true
            }
        };
        Ok(Permit {
            breaker: self,
            generation: inner.generation,
            probe,
            settled: false,
        })
    }

    fn settle(&self, generation: u64, probe: bool, failure: Option<bool>) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        match (&mut inner.phase, failure) {
            (Phase::Closed { .. }, None) => {}
            (Phase::Closed { .. }, Some(false)) => {
                inner.phase = Phase::Closed {
                    consecutive_failures: 0,
                };
            }
            (
                Phase::Closed {
                    consecutive_failures,
                },
                Some(true),
            ) => {
                *consecutive_failures += 1;
                let failures = *consecutive_failures;
                if failures >= self.config.failure_threshold {
                    tracing::warn!(
                        dependency = self.dependency,
                        failures,
                        open_for_ms = duration_ms(self.config.open_for),
                        "circuit breaker opened: failing fast"
                    );
                    self.open(&mut inner);
                }
            }
            (Phase::HalfOpen { probes_in_flight }, outcome) if probe => match outcome {
                None => *probes_in_flight = probes_in_flight.saturating_sub(1),
                Some(false) => {
                    tracing::info!(
                        dependency = self.dependency,
                        "circuit breaker closed: probe succeeded"
                    );
                    inner.phase = Phase::Closed {
                        consecutive_failures: 0,
                    };
                    inner.generation += 1;
                }
                Some(true) => {
                    tracing::warn!(
                        dependency = self.dependency,
                        open_for_ms = duration_ms(self.config.open_for),
                        "circuit breaker re-opened: probe failed"
                    );
                    self.open(&mut inner);
                }
            },
            // Only probes are admitted while half-open, and nothing while open; a permit of the
            // same generation in those states is therefore a probe handled above.
            (Phase::HalfOpen { .. } | Phase::Open { .. }, _) => {}
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.phase = Phase::Open {
            until: Instant::now() + self.config.open_for,
        };
        inner.generation += 1;
    }

    fn half_open_if_due(&self, inner: &mut Inner, now: Instant) {
        if let Phase::Open { until } = inner.phase
            && now >= until
        {
            tracing::info!(
                dependency = self.dependency,
                probes = self.config.half_open_probes,
                "circuit breaker half-open: letting a probe through"
            );
            inner.phase = Phase::HalfOpen {
                probes_in_flight: 0,
            };
            inner.generation += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way, so a poisoned lock still holds valid state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failure_threshold: u32, half_open_probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "pricing",
            BreakerConfig {
                failure_threshold,
                open_for: Duration::from_secs(5),
                half_open_probes,
            },
        )
    }

    fn fail(b: &CircuitBreaker) {
        b.try_acquire().expect("admitted").record(true);
    }

    fn succeed(b: &CircuitBreaker) {
        b.try_acquire().expect("admitted").record(false);
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_the_threshold_of_consecutive_failures() {
        let b = breaker(3, 1);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 2);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        let retry_after = b.try_acquire().expect_err("open breaker fails fast");
        assert_eq!(retry_after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let b = breaker(3, 1);
        fail(&b);
        fail(&b);
        succeed(&b);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn it_half_opens_once_open_for_has_elapsed_and_reports_the_wait_meanwhile() {
        let b = breaker(1, 1);
        fail(&b);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            b.try_acquire().expect_err("still open"),
            Duration::from_secs(3)
        );
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_closes_the_breaker() {
        let b = breaker(1, 1);
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_the_breaker_for_another_period() {
        let b = breaker(1, 1);
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire().expect_err("open"), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_only_the_configured_number_of_concurrent_probes() {
        let b = breaker(1, 2);
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        let first = b.try_acquire().expect("first probe");
        let second = b.try_acquire().expect("second probe");
        assert_eq!(
            b.try_acquire().expect_err("probe slots are full"),
            PROBES_BUSY_RETRY_AFTER
        );
        // A cancelled probe gives its slot back without deciding anything.
        drop(first);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let third = b.try_acquire().expect("slot was released");
        second.record(false);
        assert_eq!(b.state(), BreakerState::Closed);
        // The remaining probe belongs to the half-open period that just ended: it cannot reopen.
        third.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_admitted_before_the_breaker_opened_does_not_close_it() {
        let b = breaker(2, 1);
        let slow = b.try_acquire().expect("closed");
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        slow.record(false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn the_gauge_orders_states_by_severity() {
        assert_eq!(BreakerState::Closed.as_gauge(), 0);
        assert_eq!(BreakerState::HalfOpen.as_gauge(), 1);
        assert_eq!(BreakerState::Open.as_gauge(), 2);
    }
}
