//! The resilient HTTP client: one per dependency, built once from [`ClientConfig`].
//!
//! API SKELETON — bodies are being implemented (see the client task). Signatures are the contract.

mod breaker;
mod error;

pub use breaker::{BreakerConfig, BreakerState};
pub use error::ClientError;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

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
}

impl ClientConfig {
    /// A config with the documented defaults.
    pub fn new(name: &'static str, base_urls: Vec<Url>) -> Self {
        let _ = (name, base_urls);
        todo!()
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
}

impl ClientResponse {
    /// Decodes the body as JSON.
    ///
    /// # Errors
    /// [`ClientError::Decode`] if the body is not the expected JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        todo!()
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
}

impl ClientRequest {
    /// A GET of `path`.
    pub fn get(path: impl Into<String>) -> Self {
        todo!()
    }
    /// A POST of `body` as JSON to `path`.
    pub fn post_json(path: impl Into<String>, body: &impl Serialize) -> Self {
        todo!()
    }
    /// A PUT of `body` as JSON to `path`.
    pub fn put_json(path: impl Into<String>, body: &impl Serialize) -> Self {
        todo!()
    }
    /// Adds an idempotency key, which also makes the request retryable.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// A client for one dependency. Cheap to clone; clones share pool, breaker and budget.
#[derive(Debug, Clone)]
pub struct ResilientClient {}

impl ResilientClient {
    /// Builds the client.
    ///
    /// # Errors
    /// [`ClientError::Config`] if the underlying HTTP client cannot be built.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        todo!()
    }
    /// Sends `request`; 2xx → `Ok`, anything else → a typed error.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn send(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        todo!()
    }
    /// The dependency's name.
    pub fn name(&self) -> &'static str {
        todo!()
    }
    /// The breaker's current state.
    pub fn breaker_state(&self) -> BreakerState {
        todo!()
    }
    /// A readiness check reporting the breaker (informational).
    pub fn health_check(&self) -> crate::health::CheckStatus {
        todo!()
    }
    /// Registers this client's metrics (breaker state, attempts, retries) in `metrics`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        todo!()
    }
}
