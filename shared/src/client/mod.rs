//! The resilient HTTP client: one per dependency, built once from [`ClientConfig`].
//!
//! A call goes through these steps (breaker, retry policy, errors and metrics each have a file):
//!
//! 1. The effective deadline is the request's deadline in scope ([`crate::deadline::current`]),
//!    capped at `now + call_timeout`; nothing is sent once less than `deadline_margin` is left.
//! 2. The circuit breaker (`breaker.rs`) admits the attempt or fails fast with
//!    [`ClientError::CircuitOpen`].
//! 3. The attempt goes to the next base URL (round-robin, so a retry lands on another instance)
//!    with `x-correlation-id`, `x-request-timeout-ms`, `traceparent` (each attempt its own CLIENT
//!    span, [`crate::trace_context`]) and `Idempotency-Key` when the request has one. The attempt is abandoned after `min(attempt_timeout, time left)`; the callee is told
//!    that minus `deadline_margin`, so its own deadline passes first and its answer (even a `504`
//!    problem) arrives while this caller still listens: no hop outlives its caller.
//! 4. A transient failure (connect error, timeout, `429`, `5xx` but `501`) of a request that may be
//!    sent twice (safe or idempotent method, or an idempotency key) is retried (`retry.rs`) after a
//!    backoff with full jitter, stretched to honour `Retry-After`, if the retry budget
//!    has a token and the sleep ends before the deadline; otherwise the error is returned at once.
//! 5. Non-2xx answers become [`ClientError::Status`]; [`ClientError::to_problem`] turns any error
//!    into the `502`/`503`/`504` problem our own caller gets.
//!
//! ```no_run
//! # async fn demo(env: &shared::config::Env) -> anyhow::Result<()> {
//! use shared::client::{ClientConfig, ClientRequest, ResilientClient};
//!
//! let config = ClientConfig::from_env("inventory", env, "INVENTORY_URL", "http://inventory:4002")?;
//! let inventory = ResilientClient::new(config)?;
//! let stock: serde_json::Value = inventory.send(ClientRequest::get("/stock/BK-12")).await?.json()?;
//! # Ok(()) }
//! ```

mod breaker;
mod error;
mod metrics;
mod retry;

pub use breaker::{BreakerConfig, BreakerState};
pub use error::ClientError;
pub use retry::RetryConfig;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;
use url::Url;

use self::breaker::{CircuitBreaker, duration_ms};
use self::metrics::{ClientStats, Observed, Outcome};
use self::retry::RetryBudget;
use crate::config::{ConfigError, Env};
use crate::correlation;
use crate::deadline::{self, Deadline};
use crate::trace_context;

/// The header that marks a request as safe to repeat (and that the callee deduplicates by).
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Idle keep-alive connections kept per upstream host. Internal hops are many small requests, so
/// reusing connections saves a TCP handshake each; 64 covers the concurrency of a busy demo
/// service while bounding the sockets an idle process holds.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// The pooled HTTP/1.1 client every attempt goes through.
type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// How long an idle pooled connection is kept. Shorter than the idle timeouts of common servers
/// and load balancers (60 s and more), so this side closes first and never sends a request on a
/// connection the server is closing at that moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything needed to build a [`ResilientClient`]; see each field's default for its reason.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The dependency's name, in logs, metrics and `/readyz` (`"inventory"`).
    pub name: &'static str,
    /// One or more base URLs; several instances are load-balanced round-robin per attempt.
    pub base_urls: Vec<Url>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Overall budget of one call, retries included, when no request deadline is in scope.
    pub call_timeout: Duration,
    /// Subtracted from the remaining deadline before forwarding it.
    pub deadline_margin: Duration,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Circuit breaker policy.
    pub breaker: BreakerConfig,
}

impl ClientConfig {
    /// A config with the documented defaults:
    ///
    /// - **connect 250 ms**: a TCP handshake inside a cluster or compose network takes well under
    ///   a millisecond; a connect that has not finished in 250 ms is to a host that is gone
    ///   (packets dropped, not refused), and failing it fast leaves time to retry elsewhere.
    /// - **attempt 2 s**: internal endpoints answer in milliseconds, so 2 s only cuts off a hung
    ///   instance, while leaving room for two retries inside the gateway's 5 s edge budget.
    /// - **call 5 s**: when no request deadline is in scope (a background job), a call with its
    ///   retries still ends; 5 s matches the edge budget so both paths behave alike.
    /// - **margin 25 ms**: what each hop keeps for itself to turn the callee's answer (or its
    ///   absence) into a response before its own caller gives up; a few in-cluster round trips.
    /// - retries and breaker: see [`RetryConfig::default`] and [`BreakerConfig::default`].
    pub fn new(name: &'static str, base_urls: Vec<Url>) -> Self {
        Self {
            name,
            base_urls,
            connect_timeout: Duration::from_millis(250),
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            deadline_margin: Duration::from_millis(25),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }

    /// Reads the dependency's URL list from `url_var` (default `default_url`; comma-separated
    /// for several instances) and the tunables shared by every client of the process:
    /// `HTTP_CONNECT_TIMEOUT_MS`, `HTTP_ATTEMPT_TIMEOUT_MS`, `HTTP_MAX_ATTEMPTS`,
    /// `BREAKER_FAILURES`, `BREAKER_OPEN_MS` and `DEADLINE_MARGIN_MS`, each defaulting to
    /// [`ClientConfig::new`]'s value.
    ///
    /// # Errors
    /// [`ConfigError`] when a variable does not parse, a URL is not `http(s)`, or a count that
    /// must be positive (`HTTP_MAX_ATTEMPTS`, `BREAKER_FAILURES`) is zero.
    pub fn from_env(
        name: &'static str,
        env: &Env,
        url_var: &str,
        default_url: &str,
    ) -> Result<Self, ConfigError> {
        let defaults = Self::new(name, Vec::new());
        let positive = |key: &str, default: u32| -> Result<u32, ConfigError> {
            let value = env.parse_or(key, default)?;
            if value == 0 {
                return Err(ConfigError {
                    key: key.to_owned(),
                    value: "0".to_owned(),
                    reason: "must be at least 1".to_owned(),
                });
            }
            Ok(value)
        };
        Ok(Self {
            base_urls: env.urls_or(url_var, default_url)?,
            connect_timeout: env.millis_or("HTTP_CONNECT_TIMEOUT_MS", defaults.connect_timeout)?,
            attempt_timeout: env.millis_or("HTTP_ATTEMPT_TIMEOUT_MS", defaults.attempt_timeout)?,
            deadline_margin: env.millis_or("DEADLINE_MARGIN_MS", defaults.deadline_margin)?,
            retry: RetryConfig {
                max_attempts: positive("HTTP_MAX_ATTEMPTS", defaults.retry.max_attempts)?,
                ..defaults.retry
            },
            breaker: BreakerConfig {
                failure_threshold: positive(
                    "BREAKER_FAILURES",
                    defaults.breaker.failure_threshold,
                )?,
                open_for: env.millis_or("BREAKER_OPEN_MS", defaults.breaker.open_for)?,
                ..defaults.breaker
            },
            ..defaults
        })
    }
}

/// A response with a 2xx status.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The dependency that answered (named in decode errors).
    pub dependency: &'static str,
}

impl ClientResponse {
    /// Decodes the body as JSON.
    ///
    /// # Errors
    /// [`ClientError::Decode`] if the body is not the expected JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::Decode {
            dependency: self.dependency,
            source,
        })
    }
}

/// A request to send through a [`ResilientClient`].
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// Method.
    pub method: Method,
    /// Path and query, relative to the base URL (`/stock/BK-12`).
    pub path: String,
    /// Extra headers (the client adds correlation ID, deadline and idempotency key itself).
    pub headers: HeaderMap,
    /// Body, if any.
    pub body: Option<Bytes>,
    /// Marks a non-idempotent request as safe to retry; sent as `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// A shorter per-attempt timeout than the client's, for a call that has a fallback and would
    /// rather fail over soon (never longer than [`ClientConfig::attempt_timeout`]).
    pub attempt_timeout: Option<Duration>,
}

impl ClientRequest {
    /// A request without body or extra headers.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: HeaderMap::new(),
            body: None,
            idempotency_key: None,
            attempt_timeout: None,
        }
    }

    /// A GET of `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    /// A POST of `body` as JSON to `path`.
    ///
    /// # Panics
    /// If `body` cannot be represented as JSON, which for `#[derive(Serialize)]` types only happens
    /// with maps whose keys are not strings: a programming error that the first test catches.
    pub fn post_json(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::new(Method::POST, path).json(body)
    }

    /// A PUT of `body` as JSON to `path`.
    ///
    /// # Panics
    /// As [`ClientRequest::post_json`].
    pub fn put_json(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::new(Method::PUT, path).json(body)
    }

    /// Adds an idempotency key, which also makes the request retryable.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Caps each attempt of this request at `timeout` (the client's own timeout still applies
    /// when it is shorter). An attempt that runs its full, capped time counts against the breaker
    /// like any full attempt.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Whether sending this request twice is harmless, so a failed attempt may be retried.
    pub fn is_retryable(&self) -> bool {
        retry::is_idempotent(&self.method) || self.idempotency_key.is_some()
    }

    fn json(mut self, body: &impl Serialize) -> Self {
        // Documented under `# Panics` of the public constructors.
        let bytes = serde_json::to_vec(body).expect("request body serialises to JSON");
        self.body = Some(Bytes::from(bytes));
        self.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self
    }
}

/// A client for one dependency. Cheap to clone; clones share pool, breaker and budget.
#[derive(Debug, Clone)]
pub struct ResilientClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    config: ClientConfig,
    /// Base URLs without their trailing slash, so `base + path` is the attempt's URL.
    bases: Vec<String>,
    next_base: AtomicUsize,
    breaker: Arc<CircuitBreaker>,
    budget: RetryBudget,
    stats: Arc<ClientStats>,
}

impl ResilientClient {
    /// Builds the client.
    ///
    /// # Errors
    /// [`ClientError::Config`] if the underlying HTTP client cannot be built.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        validate(&config)?;
        // hyper's pooled client rather than reqwest: the benchmark (tests/bench) showed reqwest
        // re-parsing the URL (IDNA host processing included) and running its own layers on every
        // request, about a third of the gateway's CPU per forwarded request. The resilience layers
        // here need nothing more than hyper gives. It follows no redirects (a 3xx is returned as
        // what it is, inside the deadline and breaker accounting) and ignores `HTTP_PROXY`
        // (internal traffic goes straight to the service).
        let mut connector = HttpConnector::new();
        // Requests are small and latency-bound: do not let Nagle hold them back.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let bases = config
            .base_urls
            .iter()
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                bases,
                next_base: AtomicUsize::new(0),
                breaker: Arc::new(CircuitBreaker::new(config.name, config.breaker.clone())),
                budget: RetryBudget::new(&config.retry),
                stats: Arc::default(),
                config,
            }),
        })
    }

    /// Sends `request`; 2xx → `Ok`, anything else → a typed error.
    ///
    /// # Errors
    /// See [`ClientError`]. After retries the last attempt's error is returned, or
    /// [`ClientError::CircuitOpen`] if those failures opened the breaker before the next attempt.
    pub async fn send(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let result = self.execute(&request).await;
        let outcome = outcome_of(&result);
        self.inner.stats.call(outcome);
        // Successes are the hot path and failures are logged where they are decided (retries and
        // give-ups above, the caller's error mapping), so one debug line is enough here.
        tracing::debug!(
            dependency = self.name(),
            method = %request.method,
            path = %request.path,
            outcome = outcome.as_str(),
            "call finished"
        );
        result
    }

    async fn execute(&self, request: &ClientRequest) -> Result<ClientResponse, ClientError> {
        let inner = &*self.inner;
        let config = &inner.config;
        let name = config.name;
        let deadline = match deadline::current() {
            Some(deadline) => deadline.min_with(config.call_timeout),
            None => Deadline::after(config.call_timeout),
        };
        let retryable = request.is_retryable();
        let headers = self.headers_for(request)?;

        let mut attempt = 0_u32;
        loop {
            // Checked before every attempt; a retry only starts if its sleep left time (below).
            if deadline.forwardable(config.deadline_margin).is_none() {
                return Err(ClientError::DeadlineExceeded { dependency: name });
            }
            let permit =
                inner
                    .breaker
                    .try_acquire()
                    .map_err(|retry_after| ClientError::CircuitOpen {
                        dependency: name,
                        retry_after,
                    })?;
            if attempt == 0 {
                inner.budget.deposit();
            }
            // We wait up to `wait`, but tell the callee it has `margin` less: its deadline then
            // passes first, and its answer (even a 504 problem) arrives while we still listen.
            let attempt_timeout = request
                .attempt_timeout
                .map_or(config.attempt_timeout, |t| t.min(config.attempt_timeout));
            let wait = deadline.remaining().min(attempt_timeout);
            let forwarded = wait
                .saturating_sub(config.deadline_margin)
                .max(Duration::from_millis(1));
            let span = trace_context::client_attempt(name, &request.method, &request.path, attempt);
            let result = self
                .attempt(request, headers.clone(), wait, forwarded)
                .instrument(span.clone())
                .await;
            trace_context::record_attempt(&span, &result);
            let error = match result {
                Ok(response) => {
                    permit.record(false);
                    return Ok(response);
                }
                Err(error) => error,
            };
            match breaker_verdict(&error, wait >= attempt_timeout) {
                Some(failed) => permit.record(failed),
                // Dropping the permit releases a half-open probe slot and counts nothing.
                None => drop(permit),
            }

            attempt += 1;
            let delay = match self.retry_delay(retryable, attempt, &error, deadline) {
                Ok(delay) => delay,
                Err(why) => {
                    if let Some(why) = why {
                        tracing::warn!(dependency = name, attempt, reason = %error, why, "giving up");
                    }
                    return Err(error);
                }
            };
            inner.stats.retry();
            tracing::warn!(
                dependency = name,
                attempt,
                reason = %error,
                delay_ms = duration_ms(delay),
                "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// The sleep before the next attempt, or why there is none (`None`: the error is not one that
    /// retrying could fix, nothing worth a log line).
    fn retry_delay(
        &self,
        retryable: bool,
        attempts_made: u32,
        error: &ClientError,
        deadline: Deadline,
    ) -> Result<Duration, Option<&'static str>> {
        let inner = &*self.inner;
        let config = &inner.config;
        if !error.is_transient() {
            return Err(None);
        }
        if !retryable {
            return Err(Some(
                "the request is not idempotent and has no idempotency key",
            ));
        }
        if attempts_made >= config.retry.max_attempts {
            return Err(Some("attempts exhausted"));
        }
        let backoff = config.retry.backoff(attempts_made - 1, &mut rand::rng());
        let delay = match error {
            ClientError::Status {
                retry_after: Some(asked),
                ..
            } => backoff.max(*asked),
            _ => backoff,
        };
        // Never sleep past the deadline: if no attempt budget would be left after the sleep, the
        // caller is better served by this error now than by the same error later.
        if deadline
            .forwardable(config.deadline_margin)
            .is_none_or(|left| left <= delay)
        {
            return Err(Some("the deadline would pass before the next attempt"));
        }
        // Withdrawn last, so a retry that is not sent for another reason costs no token.
        if !inner.budget.withdraw() {
            inner.stats.budget_exhausted();
            return Err(Some("retry budget exhausted"));
        }
        Ok(delay)
    }

    /// The headers every attempt of `request` carries; the deadline is added per attempt.
    fn headers_for(&self, request: &ClientRequest) -> Result<HeaderMap, ClientError> {
        let mut headers = request.headers.clone();
        if let Some(id) = correlation::current() {
            headers.insert(correlation::HEADER.clone(), id.to_header_value());
        }
        if let Some(key) = &request.idempotency_key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                ClientError::Config(format!(
                    "{}: the idempotency key is not a valid header value",
                    self.name()
                ))
            })?;
            headers.insert(IDEMPOTENCY_KEY.clone(), value);
        }
        Ok(headers)
    }

    /// One attempt against the next instance: abandoned after `wait` (body included), while the
    /// callee is told it has `forwarded`.
    async fn attempt(
        &self,
        request: &ClientRequest,
        mut headers: HeaderMap,
        wait: Duration,
        forwarded: Duration,
    ) -> Result<ClientResponse, ClientError> {
        let inner = &*self.inner;
        let name = inner.config.name;
        let index = inner.next_base.fetch_add(1, Ordering::Relaxed) % inner.bases.len();
        let uri = Uri::try_from(format!("{}{}", inner.bases[index], request.path))
            .map_err(|e| ClientError::Config(format!("{name}: {}: {e}", request.path)))?;
        headers.insert(deadline::HEADER.clone(), Deadline::header_value(forwarded));
        trace_context::inject_attempt(&uri, &mut headers);
        let mut outgoing = http::Request::new(Full::new(request.body.clone().unwrap_or_default()));
        *outgoing.method_mut() = request.method.clone();
        *outgoing.uri_mut() = uri;
        *outgoing.headers_mut() = headers;

        let exchange = async {
            let response = inner
                .http
                .request(outgoing)
                .await
                .map_err(|e| transport_error(name, e))?;
            let (parts, body) = response.into_parts();
            let (status, headers) = (parts.status, parts.headers);
            let body = body
                .collect()
                .await
                .map_err(|e| ClientError::Transport {
                    dependency: name,
                    source: Box::new(e),
                })?
                .to_bytes();
            if status.is_success() {
                Ok(ClientResponse {
                    status,
                    headers,
                    body,
                    dependency: name,
                })
            } else {
                Err(ClientError::Status {
                    dependency: name,
                    status,
                    retry_after: retry::retry_after(&headers),
                    downstream: headers
                        .get(&crate::problem::FAILED_DEPENDENCY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    body,
                })
            }
        };
        tokio::time::timeout_at(Instant::now() + wait, exchange)
            .await
            .unwrap_or(Err(ClientError::Timeout { dependency: name }))
    }

    /// The dependency's name.
    pub fn name(&self) -> &'static str {
        self.inner.config.name
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The breaker's current state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// A readiness check reporting the breaker (informational).
    ///
    /// `ok` is false unless the breaker is closed; register it with
    /// [`crate::health::Health::informational`] so an unhealthy dependency is shown in `/readyz`
    /// without taking this service out of rotation.
    pub fn health_check(&self) -> crate::health::CheckStatus {
        let state = self.breaker_state();
        let detail = json!({
            "dependency": self.name(),
            "breaker": state.as_str(),
            "consecutiveFailures": self.inner.breaker.consecutive_failures(),
            "instances": self.inner.bases.len(),
        });
        if state == BreakerState::Closed {
            crate::health::CheckStatus::ok(detail)
        } else {
            crate::health::CheckStatus::failing(detail)
        }
    }

    /// Registers this client's metrics (breaker state, attempts, retries) in `metrics`:
    /// `http_client_breaker_state{dependency}` (0 closed, 1 half-open, 2 open),
    /// `http_client_requests_total{dependency,outcome}`, `http_client_retries_total{dependency}`
    /// and `http_client_budget_exhausted_total{dependency}`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        metrics::register(
            metrics,
            Observed {
                dependency: self.name(),
                stats: Arc::clone(&self.inner.stats),
                breaker: Arc::clone(&self.inner.breaker),
            },
        );
    }
}

fn validate(config: &ClientConfig) -> Result<(), ClientError> {
    let invalid = |what: &str| Err(ClientError::Config(format!("{}: {what}", config.name)));
    if config.base_urls.is_empty() {
        return invalid("no base URL");
    }
    // The client speaks plain HTTP: internal hops stay inside the private network, no TLS.
    if let Some(url) = config.base_urls.iter().find(|u| u.scheme() != "http") {
        return invalid(&format!("{url}: only http:// base URLs are supported"));
    }
    if config.retry.max_attempts == 0 {
        return invalid("max_attempts must be at least 1");
    }
    if !(0.0..=1000.0).contains(&config.retry.budget_ratio) {
        return invalid("budget_ratio must be within 0..=1000");
    }
    if config.retry.budget_min_per_sec >= i32::MAX as u32 {
        return invalid("budget_min_per_sec is too large");
    }
    if config.breaker.failure_threshold == 0 || config.breaker.half_open_probes == 0 {
        return invalid("breaker thresholds must be at least 1");
    }
    Ok(())
}

/// What an attempt's error says about the dependency's health: `Some(true)` unhealthy (connect
/// and transport errors, `5xx` but `501`, a timeout of an attempt that had its whole
/// `attempt_timeout`), `Some(false)` alive (it answered: `4xx`, `429`, or a `5xx` naming a failure
/// behind it), `None` nothing at all (a timeout cut short by the caller's deadline, a body we could
/// not decode). `None` must not count as a success either: it would reset the consecutive-failure
/// count, and a hanging dependency whose last attempt is always clipped would never trip.
fn breaker_verdict(error: &ClientError, had_full_attempt_timeout: bool) -> Option<bool> {
    match error {
        ClientError::Timeout { .. } => had_full_attempt_timeout.then_some(true),
        ClientError::Connect { .. } | ClientError::Transport { .. } => Some(true),
        ClientError::Status {
            downstream: Some(_),
            ..
        } => Some(false),
        ClientError::Status { status, .. } => {
            Some(status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED)
        }
        ClientError::DeadlineExceeded { .. }
        | ClientError::CircuitOpen { .. }
        | ClientError::Decode { .. }
        | ClientError::Config(_) => None,
    }
}

/// A refused, unreachable or timed-out connect (the connector's `connect_timeout`) is a
/// [`ClientError::Connect`]; anything after the connection stood is a [`ClientError::Transport`].
fn transport_error(
    dependency: &'static str,
    source: hyper_util::client::legacy::Error,
) -> ClientError {
    if source.is_connect() {
        ClientError::Connect {
            dependency,
            source: Box::new(source),
        }
    } else {
        ClientError::Transport {
            dependency,
            source: Box::new(source),
        }
    }
}

fn outcome_of(result: &Result<ClientResponse, ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(ClientError::Status { status, .. }) if status.is_server_error() => Outcome::ServerError,
        Err(ClientError::Status { .. }) => Outcome::ClientError,
        Err(ClientError::Timeout { .. }) => Outcome::Timeout,
        Err(ClientError::DeadlineExceeded { .. }) => Outcome::DeadlineExceeded,
        Err(ClientError::Connect { .. }) => Outcome::ConnectError,
        Err(ClientError::CircuitOpen { .. }) => Outcome::CircuitOpen,
        Err(ClientError::Transport { .. } | ClientError::Decode { .. }) => Outcome::TransportError,
        // An unusable request (a bad idempotency key) is the caller's mistake, like a 4xx.
        Err(ClientError::Config(_)) => Outcome::ClientError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(raw: &str) -> Vec<Url> {
        vec![Url::parse(raw).expect("url")]
    }

    #[test]
    fn from_env_reads_the_url_list_and_the_shared_tunables() {
        let env = Env::from_pairs([
            ("INVENTORY_URL", "http://a:4002,http://b:4002"),
            ("HTTP_CONNECT_TIMEOUT_MS", "100"),
            ("HTTP_ATTEMPT_TIMEOUT_MS", "900"),
            ("HTTP_MAX_ATTEMPTS", "2"),
            ("BREAKER_FAILURES", "3"),
            ("BREAKER_OPEN_MS", "1500"),
            ("DEADLINE_MARGIN_MS", "10"),
        ]);

        let config = ClientConfig::from_env("inventory", &env, "INVENTORY_URL", "http://x:1")
            .expect("valid");

        assert_eq!(config.base_urls.len(), 2);
        assert_eq!(config.connect_timeout, Duration::from_millis(100));
        assert_eq!(config.attempt_timeout, Duration::from_millis(900));
        assert_eq!(config.retry.max_attempts, 2);
        assert_eq!(config.breaker.failure_threshold, 3);
        assert_eq!(config.breaker.open_for, Duration::from_millis(1500));
        assert_eq!(config.deadline_margin, Duration::from_millis(10));
        assert_eq!(config.call_timeout, Duration::from_secs(5));
    }

    #[test]
    fn from_env_defaults_to_the_documented_values() {
        let config = ClientConfig::from_env(
            "pricing",
            &Env::default(),
            "PRICING_URL",
            "http://pricing:4003",
        )
        .expect("valid");

        assert_eq!(config.base_urls, urls("http://pricing:4003"));
        assert_eq!(config.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.attempt_timeout, Duration::from_secs(2));
        assert_eq!(config.deadline_margin, Duration::from_millis(25));
        assert_eq!(config.retry.max_attempts, 3);
        assert_eq!(config.breaker.failure_threshold, 5);
        assert_eq!(config.breaker.open_for, Duration::from_secs(5));
        assert_eq!(config.breaker.half_open_probes, 1);
    }

    #[test]
    fn from_env_rejects_zero_attempts_and_malformed_numbers() {
        let zero = Env::from_pairs([("HTTP_MAX_ATTEMPTS", "0")]);
        let err = ClientConfig::from_env("pricing", &zero, "PRICING_URL", "http://p:1")
            .expect_err("zero attempts");
        assert_eq!(err.key, "HTTP_MAX_ATTEMPTS");
        let bad = Env::from_pairs([("BREAKER_OPEN_MS", "soon")]);
        assert!(ClientConfig::from_env("pricing", &bad, "PRICING_URL", "http://p:1").is_err());
    }

    #[test]
    fn a_client_needs_a_plain_http_base_url_and_sane_thresholds() {
        let ok = ClientConfig::new("pricing", urls("http://pricing:4003"));
        assert!(ResilientClient::new(ok.clone()).is_ok());
        for broken in [
            ClientConfig {
                base_urls: Vec::new(),
                ..ok.clone()
            },
            ClientConfig {
                base_urls: urls("https://pricing:4003"),
                ..ok.clone()
            },
            ClientConfig {
                retry: RetryConfig {
                    max_attempts: 0,
                    ..RetryConfig::default()
                },
                ..ok.clone()
            },
            ClientConfig {
                breaker: BreakerConfig {
                    half_open_probes: 0,
                    ..BreakerConfig::default()
                },
                ..ok.clone()
            },
        ] {
            let err = ResilientClient::new(broken).expect_err("invalid");
            assert!(matches!(err, ClientError::Config(_)), "{err}");
        }
    }

    #[test]
    fn request_constructors_set_method_body_and_content_type() {
        let post = ClientRequest::post_json("/reserve", &json!({"sku": "BK-12"}));
        assert_eq!(post.method, Method::POST);
        assert_eq!(post.body.as_deref(), Some(&br#"{"sku":"BK-12"}"#[..]));
        assert_eq!(post.headers[header::CONTENT_TYPE], "application/json");
        assert!(!post.is_retryable());
        assert!(post.idempotency_key("k").is_retryable());
        let put = ClientRequest::put_json("/prices/BK-12", &json!({"price": "1.00"}));
        assert_eq!(put.method, Method::PUT);
        assert!(put.is_retryable());
        let get = ClientRequest::get("/stock/BK-12");
        assert!(get.body.is_none() && get.is_retryable());
    }

    #[test]
    fn a_body_that_is_not_the_expected_json_is_a_decode_error() {
        let response = ClientResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"<html>"),
            dependency: "pricing",
        };
        let err = response.json::<serde_json::Value>().expect_err("not json");
        assert!(matches!(
            err,
            ClientError::Decode {
                dependency: "pricing",
                ..
            }
        ));
        assert_eq!(err.to_problem().status, 502);
    }
}
