//! Correlation IDs: adopted or minted at the edge, scoped in a task-local, echoed on responses.
//!
//! The ID lives in a tokio task-local for the duration of a request (or of a consumed message), so
//! logging and outbound calls read it with [`current`] and no function signature has to carry it.
//! A task-local does not follow `tokio::spawn`; code that spawns work on behalf of a request wraps
//! the spawned future in [`scope`] explicitly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

/// The header that carries the correlation ID, on HTTP requests, responses and AMQP messages.
pub static HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

/// Longest accepted incoming ID; longer values are replaced, so a client cannot bloat every log line.
pub const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: CorrelationId;
}

/// A validated correlation ID: 1–128 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// Mints a fresh ID (a random UUID).
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().to_string().into())
    }

    /// Accepts `raw` if it is a valid ID, so untrusted input can be adopted safely.
    pub fn parse(raw: &str) -> Option<Self> {
        let valid = !raw.is_empty()
            && raw.len() <= MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        valid.then(|| Self(raw.into()))
    }

    /// Adopts the ID in `headers` if it is valid, otherwise mints a new one.
    pub fn from_headers_or_new(headers: &http::HeaderMap) -> Self {
        headers
            .get(&HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_default()
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID as a header value (always valid, since the characters are checked).
    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The correlation ID of the request or message being handled, if any.
pub fn current() -> Option<CorrelationId> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `future` with `id` as the current correlation ID.
pub async fn scope<F: Future>(id: CorrelationId, future: F) -> F::Output {
    CURRENT.scope(id, future).await
}

/// Runs `f` with `id` as the current correlation ID (for synchronous code).
pub fn sync_scope<R>(id: CorrelationId, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(id, f)
}

/// Layer that gives every request a correlation ID; see [`Correlation`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationLayer;

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlation { inner }
    }
}

/// Adopts a valid incoming `x-correlation-id` or mints one, stores it in the request extensions,
/// runs the inner service inside the task-local scope, and echoes the ID on the response.
#[derive(Debug, Clone)]
pub struct Correlation<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Correlation<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let id = CorrelationId::from_headers_or_new(request.headers());
        let header = id.to_header_value();
        // Downstream code (handlers, outbound clients) sees the validated value, never the raw one.
        request.headers_mut().insert(HEADER.clone(), header.clone());
        request.extensions_mut().insert(id.clone());
        // Some services do work in `call` itself, so it runs inside the scope as well.
        let future = sync_scope(id.clone(), || self.inner.call(request));
        Box::pin(scope(id, async move {
            let mut response = future.await?;
            response.headers_mut().insert(HEADER.clone(), header);
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_adopted_and_invalid_ones_rejected() {
        assert!(CorrelationId::parse("a1f3-9c:req_7.x").is_some());
        assert!(CorrelationId::parse(&"a".repeat(128)).is_some());
        assert!(CorrelationId::parse(&"a".repeat(129)).is_none());
        assert!(CorrelationId::parse("").is_none());
        assert!(CorrelationId::parse("has space").is_none());
        assert!(CorrelationId::parse("new\nline").is_none());
        assert!(CorrelationId::parse("ünïcode").is_none());
    }

    #[tokio::test]
    async fn the_current_id_is_visible_inside_its_scope_only() {
        assert!(current().is_none());
        let id = CorrelationId::new();
        let seen = scope(id.clone(), async { current() }).await;
        assert_eq!(seen, Some(id));
        assert!(current().is_none());
    }
}
