//! Retry policy: which requests may be retried, how long to wait, and the budget that caps retries.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, header};
use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

/// How long one deposit into the retry budget counts. Ten seconds is Finagle's choice (tower's
/// `TpsBudget` comes from it): long enough to smooth the bursts of a lightly loaded service, short
/// enough that a past surge of traffic does not fund a retry storm minutes later.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retry policy: attempts, backoff and budget.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Total attempts including the first.
    pub max_attempts: u32,
    /// Base of the exponential backoff.
    pub base_delay: Duration,
    /// Cap of one backoff sleep.
    pub max_delay: Duration,
    /// Retries allowed as a fraction of recent requests.
    pub budget_ratio: f32,
    /// Retries always allowed per second regardless of traffic.
    pub budget_min_per_sec: u32,
    /// Hedges allowed as a fraction of recent requests, from a budget of their own (with the
    /// same floor per second), so hedges never spend the tokens retries need.
    pub hedge_budget_ratio: f32,
}

impl Default for RetryConfig {
    /// 3 attempts, backoff 50 ms doubling up to 1 s with full jitter, budget 50 % + 5/s.
    ///
    /// - **3 attempts**: the first retry rides out a blip (a restarting instance, a reset pooled
    ///   connection), the second goes to yet another instance when there are several; beyond that
    ///   the dependency is down and more attempts only add latency and load.
    /// - **50 ms base**: about ten in-cluster round trips, enough for a connection refused by an
    ///   instance that is restarting to be retried elsewhere without the caller noticing.
    /// - **1 s cap**: keeps any single sleep well inside a 5 s edge budget.
    /// - **50 % budget**: at most one retry (or hedge) per two requests in the last 10 s, so a
    ///   failing dependency sees at most 1.5× its normal load from us instead of `max_attempts`×
    ///   (the classic retry storm). Finagle and tower use 20 %, which caps the load at 1.2× but
    ///   cannot mask a dependency failing 30 % of attempts: every call through then needs
    ///   0.3 + 0.09 = 0.39 retries, so a fifth of them fail for want of a token, and a
    ///   partial failure shows through to users (docs/decisions/0101).
    /// - **5 retries/s floor**: a lightly used client (the demo) has too few requests to earn
    ///   retries from the ratio alone; 5/s keeps retrying useful there and is harmless at scale.
    /// - **hedges: 20 % of calls, a budget of their own**: twice the slow share the fault
    ///   scenario injects (10 % of answers held), so it is masked; and separate, because hedges
    ///   drawing on the retry budget spent it under load (calls slower than the hedge delay all
    ///   hedge) and left nothing for the retries that matter: in the replica test the in-flight
    ///   calls to a killed replica then failed without a retry, five failed calls opened the
    ///   breaker, and the healthy replica was refused for 5 s. A failing dependency now sees at
    ///   most 1 + 0.5 + 0.2 = 1.7× its load from us.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            budget_ratio: 0.5,
            budget_min_per_sec: 5,
            hedge_budget_ratio: 0.2,
        }
    }
}

impl RetryConfig {
    /// The sleep before retry number `retry` (0 for the first retry): uniform in
    /// `[0, min(max_delay, base_delay · 2^retry)]` ("full jitter").
    ///
    /// Full jitter spreads the retries of many callers that failed at the same moment over the
    /// whole interval, instead of sending them back in synchronised waves (AWS Architecture Blog,
    /// "Exponential Backoff And Jitter").
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let factor = 1_u32.checked_shl(retry).unwrap_or(u32::MAX);
        let ceiling = self.base_delay.saturating_mul(factor).min(self.max_delay);
        let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling_ns))
    }
}

/// Whether `method` may be sent twice with the same effect (RFC 9110 §9.2.2), so a request whose
/// outcome is unknown (a timeout) can be retried without doing the work twice.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The delay a server asked for in `Retry-After`: whole seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    // A date in the past means "now".
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Caps retries as a share of requests, so retries cannot multiply the load on a sick dependency.
///
/// A thin wrapper over tower's `TpsBudget` (a token bucket over a sliding 10 s window, from
/// Finagle): every call deposits one token, every retry withdraws `1 / ratio` of them, and a
/// reserve of `min_per_sec` retries per second is always available.
#[derive(Debug)]
pub struct RetryBudget {
    inner: TpsBudget,
}

impl RetryBudget {
    /// The retry budget for `config`; the ratio must be within `0..=1000` (checked by the client
    /// builder).
    pub fn new(config: &RetryConfig) -> Self {
        Self::with_ratio(config, config.budget_ratio)
    }

    /// The hedges' budget for `config`: [`RetryConfig::hedge_budget_ratio`] of calls, with the
    /// same floor.
    pub fn for_hedges(config: &RetryConfig) -> Self {
        Self::with_ratio(config, config.hedge_budget_ratio)
    }

    fn with_ratio(config: &RetryConfig, ratio: f32) -> Self {
        Self {
            inner: TpsBudget::new(BUDGET_WINDOW, config.budget_min_per_sec, ratio),
        }
    }

    /// Records a call (its first attempt).
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes a retry token; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn config() -> RetryConfig {
        RetryConfig {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..RetryConfig::default()
        }
    }

    #[test]
    fn backoff_stays_within_the_doubling_ceiling_and_uses_all_of_it() {
        let policy = config();
        let mut rng = StdRng::seed_from_u64(7);
        for (retry, ceiling_ms) in [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1000), (9, 1000)] {
            let ceiling = Duration::from_millis(ceiling_ms);
            let samples: Vec<_> = (0..2000).map(|_| policy.backoff(retry, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter covers the whole interval: some sleeps are near zero, some near the cap.
            assert!(samples.iter().any(|d| *d < ceiling / 10), "retry {retry}");
            assert!(
                samples.iter().any(|d| *d > ceiling * 9 / 10),
                "retry {retry}"
            );
        }
    }

    #[test]
    fn backoff_does_not_overflow_for_huge_retry_numbers() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(config().backoff(u32::MAX, &mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn only_safe_and_idempotent_methods_are_idempotent() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(header::RETRY_AFTER, "3".parse().expect("value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));

        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(61));
        headers.insert(header::RETRY_AFTER, in_a_minute.parse().expect("value"));
        let wait = retry_after(&headers).expect("a date");
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(61),
            "{wait:?}"
        );

        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("value"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));

        headers.insert(header::RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&headers), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_fifth_of_calls_to_retry_under_sustained_failure() {
        let budget = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_sec: 0,
            ..RetryConfig::default()
        });
        let mut retried = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.withdraw() {
                retried += 1;
            }
        }
        assert_eq!(retried, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_spending_their_budget_leave_the_retry_budget_whole() {
        let config = RetryConfig {
            budget_ratio: 0.5,
            hedge_budget_ratio: 0.2,
            budget_min_per_sec: 0,
            ..RetryConfig::default()
        };
        let (retries, hedges) = (RetryBudget::new(&config), RetryBudget::for_hedges(&config));
        for _ in 0..100 {
            retries.deposit();
            hedges.deposit();
        }
        // Every call slower than the hedge delay asks for a hedge: 20 are granted.
        assert_eq!((0..100).filter(|_| hedges.withdraw()).count(), 20);
        // The retries still have their 50.
        assert_eq!((0..100).filter(|_| retries.withdraw()).count(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_floor_allows_retries_without_traffic_and_refills_over_time() {
        let budget = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_sec: 1,
            ..RetryConfig::default()
        });
        // 1 retry/s over the 10 s window: a reserve of 10.
        let granted = (0..20).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 10);
        tokio::time::advance(BUDGET_WINDOW + Duration::from_secs(1)).await;
        assert!(budget.withdraw(), "withdrawals age out of the window");
    }
}
