//! Request deadlines: set once at the edge, forwarded as a remaining budget, enforced at every hop.
//!
//! The gateway gives each request a budget. Every outbound call carries what is left of it in the
//! [`HEADER`] (milliseconds, relative, so hosts need no synchronised clocks) minus a safety
//! [`margin`](DeadlineLayer::margin). The callee's [`DeadlineLayer`] turns the header back into a
//! [`Deadline`] in a task-local, answers `504` at once if nothing is left, and stops its own work
//! when the deadline passes. Because each hop subtracts the margin, a callee always gives up (and
//! answers) slightly before its caller stops listening: no hop outlives its caller.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Request, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::problem::Problem;

/// The header that carries the remaining budget, in whole milliseconds.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-timeout-ms");

tokio::task_local! {
    static CURRENT: Deadline;
}

/// The instant by which the current request must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self(Instant::now() + budget)
    }

    /// The deadline as an instant on tokio's clock (so paused-clock tests can move it).
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(self) -> bool {
        self.remaining().is_zero()
    }

    /// The budget to forward to a callee: what remains minus `margin`, or `None` if nothing does.
    pub fn forwardable(self, margin: Duration) -> Option<Duration> {
        self.remaining()
            .checked_sub(margin)
            .filter(|left| *left >= Duration::from_millis(1))
    }

    /// Parses the remaining budget a caller sent in [`HEADER`].
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        let millis: u64 = value.to_str().ok()?.trim().parse().ok()?;
        Some(Self::after(Duration::from_millis(millis)))
    }

    /// The header value that forwards `budget`.
    pub fn header_value(budget: Duration) -> HeaderValue {
        HeaderValue::from(u64::try_from(budget.as_millis()).unwrap_or(u64::MAX))
    }

    /// The earlier of this deadline and `now + timeout`.
    pub fn min_with(self, timeout: Duration) -> Self {
        self.min(Self::after(timeout))
    }
}

/// The deadline of the request being handled, if any.
pub fn current() -> Option<Deadline> {
    CURRENT.try_with(|d| *d).ok()
}

/// Runs `future` with `deadline` as the current deadline.
pub async fn scope<F: Future>(deadline: Deadline, future: F) -> F::Output {
    CURRENT.scope(deadline, future).await
}

/// Runs `future` with at most `budget` from now: the current deadline, tightened. For a part of a
/// request that has a fallback (a cached price, a partial answer) and so must not spend the
/// whole request's budget.
pub async fn within<F: Future>(budget: Duration, future: F) -> F::Output {
    let tightened = current().map_or_else(|| Deadline::after(budget), |d| d.min_with(budget));
    scope(tightened, future).await
}

/// Sets, adopts and enforces request deadlines; see [`Deadline`].
///
/// Every service uses the same rule: adopt the caller's remaining budget from [`HEADER`], capped at
/// this layer's own budget. At the gateway that means a client may shorten its budget but never
/// lengthen it; inside the system it means a direct call (a health probe, a benchmark) without the
/// header still gets a bounded budget.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    budget: Duration,
}

impl DeadlineLayer {
    /// A layer whose requests get at most `budget`.
    pub fn new(budget: Duration) -> Self {
        Self { budget }
    }

    /// The budget used when no caller sent one.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            layer: *self,
        }
    }
}

/// The service produced by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, ReqBody> Service<Request<ReqBody>> for DeadlineService<S>
where
    S: Service<Request<ReqBody>, Response = Response>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let own = Deadline::after(self.layer.budget);
        // A malformed header is treated like a missing one rather than rejected: the budget is
        // plumbing between services, not part of the API contract.
        let deadline = match request
            .headers()
            .get(&HEADER)
            .and_then(Deadline::from_header)
        {
            Some(theirs) => theirs.min(own),
            None => own,
        };
        if deadline.is_expired() {
            // Nothing left: the caller has already given up, so do no work at all.
            return Box::pin(async { Ok(deadline_exceeded()) });
        }
        let future = self.inner.call(request);
        Box::pin(scope(deadline, async move {
            match tokio::time::timeout_at(deadline.instant(), future).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("request deadline exceeded; abandoning the work in progress");
                    Ok(deadline_exceeded())
                }
            }
        }))
    }
}

fn deadline_exceeded() -> Response {
    Problem::new(StatusCode::GATEWAY_TIMEOUT, "Deadline exceeded")
        .detail("the request's time budget ran out before it could be answered")
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn within_tightens_the_current_deadline_but_never_extends_it() {
        let left = || current().map(Deadline::remaining);
        assert_eq!(
            within(Duration::from_secs(1), async { left() }).await,
            Some(Duration::from_secs(1))
        );
        let request = Deadline::after(Duration::from_secs(5));
        let tightened = scope(request, within(Duration::from_secs(1), async { left() })).await;
        assert_eq!(tightened, Some(Duration::from_secs(1)));
        let short = Deadline::after(Duration::from_millis(300));
        let kept = scope(short, within(Duration::from_secs(1), async { left() })).await;
        assert_eq!(kept, Some(Duration::from_millis(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_forwarded_budget_keeps_a_margin_for_the_way_back() {
        let deadline = Deadline::after(Duration::from_millis(100));
        assert_eq!(
            deadline.forwardable(Duration::from_millis(20)),
            Some(Duration::from_millis(80))
        );
        tokio::time::advance(Duration::from_millis(90)).await;
        assert_eq!(deadline.forwardable(Duration::from_millis(20)), None);
        assert!(!deadline.is_expired());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(deadline.is_expired());
    }

    #[test]
    fn a_budget_header_round_trips() {
        let value = Deadline::header_value(Duration::from_millis(1500));
        assert_eq!(value, "1500");
        assert!(Deadline::from_header(&HeaderValue::from_static("soon")).is_none());
    }
}
