//! The HTTP chassis every service shares: the middleware stack and serving with a bounded drain.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::admission::{self, Admission, ListenerSettings};
use crate::correlation::CorrelationLayer;
use crate::deadline::DeadlineLayer;
use crate::metrics::{self, Metrics};
use crate::problem::{self, Problem};

/// Request bodies larger than this are rejected with `413` before they are read: an order of a
/// few hundred lines is a few kilobytes, so 64 KiB is generous and still bounds memory per request.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// What the shared middleware stack needs to know about a service.
#[derive(Debug, Clone)]
pub struct Chassis {
    /// The service name in logs and metrics.
    pub service: &'static str,
    /// The budget a request gets when its caller sent none (see [`crate::deadline`]).
    pub request_budget: Duration,
    /// The largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Where request metrics are recorded.
    pub metrics: Metrics,
    /// The concurrency limit requests pass before anything else is spent on them.
    pub admission: Admission,
}

impl Chassis {
    /// Wraps `router` in the middleware every service runs, outermost first:
    /// panic → `500` problem; correlation ID; admission (over the limit → `503` or `429` problem);
    /// request span, access log and metrics; deadline; body limit. Unknown paths answer a `404`
    /// problem.
    ///
    /// Admission sits outside the access log and request metrics on purpose: a refusal must cost
    /// as little as possible, and under overload there are many of them (they are counted in
    /// `admission_requests_total`).
    pub fn wrap(&self, router: Router) -> Router {
        let service = self.service;
        router
            .fallback(problem::not_found)
            .layer(DefaultBodyLimit::max(self.body_limit))
            .layer(DeadlineLayer::new(self.request_budget))
            .layer(middleware::from_fn_with_state(
                self.metrics.clone(),
                metrics::track,
            ))
            .layer(middleware::from_fn(move |request: Request, next: Next| {
                observe(service, request, next)
            }))
            .layer(middleware::from_fn_with_state(
                self.admission.clone(),
                admission::admit,
            ))
            .layer(CorrelationLayer)
            .layer(CatchPanicLayer::custom(|_| {
                // The panic message may hold internals; it is logged by the panic hook, not sent.
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error").into_response()
            }))
    }
}

/// Opens the request span (which names the service, so several services in one test process
/// stay apart in the logs) and writes one access-log line per request.
async fn observe(service: &'static str, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let uri = request.uri().path().to_owned();
    let span = tracing::info_span!(
        "http",
        service,
        method = %method,
        route = %path,
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %path,
        http.response.status_code = tracing::field::Empty,
    );
    crate::trace_context::server_span(&span, &method, &path, request.headers());
    async move {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        crate::trace_context::record_response(status);
        let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if response.status().is_server_error() {
            tracing::warn!(status, elapsed_us, "{method} {uri}");
        } else {
            tracing::info!(status, elapsed_us, "{method} {uri}");
        }
        response
    }
    .instrument(span)
    .await
}

/// Serves `router` on `listener` with the default [`ListenerSettings`] until `shutdown` is
/// cancelled, then drains in-flight requests for at most `drain`.
///
/// # Errors
/// Returns the listener's I/O error if serving fails.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    serve_with(
        listener,
        router,
        ListenerSettings::default(),
        shutdown,
        drain,
    )
    .await
}

/// [`serve`] with explicit bounds on clients: header read and idle timeouts and the connection
/// limit (see [`crate::admission::listener`]).
///
/// # Errors
/// Returns the listener's I/O error if serving fails.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    admission::listener::serve(listener, router, settings, shutdown, drain).await
}

/// Binds `host:port` (port 0 picks a free port, which tests use).
///
/// # Errors
/// Returns the I/O error if the address cannot be bound.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((host, port)).await
}

/// Spawns `future` so that it ends when `shutdown` is cancelled (background workers: relays,
/// consumers, sweepers).
pub fn spawn_until<F>(shutdown: CancellationToken, future: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = future => {}
        }
    })
}
