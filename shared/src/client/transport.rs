//! The transport under the resilience layers: one pooled `reqwest::Client` per dependency, the
//! headers of one attempt, and the execution of one attempt.
//!
//! Everything that decides (which instance, whether to retry or hedge, what a failure means) is
//! above, in `mod.rs`; here an attempt is built and sent. Per-attempt concerns that belong on the
//! wire (trace context, say) go into [`attempt_headers`] and [`exchange`], the only places that
//! touch one attempt's headers and its execution.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use url::Url;

use super::ClientError;
use super::retry;
use crate::deadline::{self, Deadline};

/// Idle keep-alive connections kept per upstream instance. Internal hops are many small requests,
/// so reusing connections saves a TCP handshake each; 64 covers the concurrency of a busy demo
/// service while bounding the sockets an idle process holds. It equals the default bound on
/// requests in flight per instance, so every connection a full instance uses can be kept.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// How long an idle pooled connection is kept. Shorter than the idle timeouts of common servers
/// and load balancers (60 s and more), so this side closes first and never sends a request on a
/// connection the server is closing at that moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the dependency's pooled client.
///
/// It follows no redirects (a 3xx is returned as what it is, inside the deadline and breaker
/// accounting), ignores `HTTP_PROXY` (internal traffic goes straight to the service), and leaves
/// timeouts to the caller, who knows each attempt's share of the deadline; only the connect
/// timeout is set here, because reqwest is the one that sees a connect end.
pub(super) fn build(connect_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        // Requests are small and latency-bound: do not let Nagle hold them back.
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .build()
}

/// The URL of one attempt: the instance's base URL (parsed once, when the instance was
/// discovered) with the request's path appended to the base's own path and its query set.
///
/// `Url::set_path` and `set_query` re-encode only what they are given; the host is never parsed
/// again, which is what made reqwest expensive when it was handed a string per request.
pub(super) fn attempt_url(base: &Url, base_path: &str, path_and_query: &str) -> Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = base.clone();
    if base_path.is_empty() {
        url.set_path(path);
    } else {
        url.set_path(&format!("{base_path}{path}"));
    }
    url.set_query(query);
    url
}

/// The headers one attempt carries: the call's own (`headers`, with correlation ID and
/// idempotency key already in them), the callee's share of the deadline, and the `Host` of the
/// dependency's name when the URL holds a discovered address.
pub(super) fn attempt_headers(
    headers: &HeaderMap,
    forwarded: Duration,
    host: Option<&HeaderValue>,
) -> HeaderMap {
    let mut headers = headers.clone();
    headers.insert(deadline::HEADER.clone(), Deadline::header_value(forwarded));
    if let Some(host) = host {
        headers.insert(header::HOST, host.clone());
    }
    headers
}

/// Builds the request of one attempt.
pub(super) fn request(
    method: &Method,
    url: Url,
    headers: HeaderMap,
    body: Option<&Bytes>,
) -> reqwest::Request {
    let mut request = reqwest::Request::new(method.clone(), url);
    *request.headers_mut() = headers;
    if let Some(body) = body {
        *request.body_mut() = Some(reqwest::Body::from(body.clone()));
    }
    request
}

/// What one attempt brought back: a response of any status with its whole body, or why none came.
pub(super) struct Answer {
    /// The status.
    pub status: http::StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Executes one attempt: sends it (`response` is the pending response from the instance's
/// load-tracking service) and reads the whole body. No timeout here: the caller abandons the
/// future when the attempt's time is up.
///
/// # Errors
/// [`ClientError::Connect`] when no connection could be made, [`ClientError::Transport`] when it
/// failed after that.
pub(super) async fn exchange(
    dependency: &'static str,
    response: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
) -> Result<Answer, ClientError> {
    let response = response.await.map_err(|e| transport_error(dependency, e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map_err(|e| transport_error(dependency, e))?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

impl Answer {
    /// A 2xx becomes the response, anything else a [`ClientError::Status`].
    pub(super) fn into_result(
        self,
        dependency: &'static str,
    ) -> Result<super::ClientResponse, ClientError> {
        if self.status.is_success() {
            Ok(super::ClientResponse {
                status: self.status,
                headers: self.headers,
                body: self.body,
                dependency,
            })
        } else {
            Err(ClientError::Status {
                dependency,
                status: self.status,
                retry_after: retry::retry_after(&self.headers),
                downstream: self
                    .headers
                    .get(&crate::problem::FAILED_DEPENDENCY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: self.body,
            })
        }
    }
}

/// A refused, unreachable or timed-out connect is a [`ClientError::Connect`]; anything after the
/// connection stood is a [`ClientError::Transport`].
fn transport_error(dependency: &'static str, source: reqwest::Error) -> ClientError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_url_keeps_the_base_path_and_sets_the_query() {
        let base = Url::parse("http://10.0.0.7:4002/").expect("url");
        assert_eq!(
            attempt_url(&base, "", "/stock/BK-12").as_str(),
            "http://10.0.0.7:4002/stock/BK-12"
        );
        assert_eq!(
            attempt_url(&base, "/inventory", "/stock?sku=BK-12").as_str(),
            "http://10.0.0.7:4002/inventory/stock?sku=BK-12"
        );
    }
}
