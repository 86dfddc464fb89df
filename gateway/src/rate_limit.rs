//! Per-client rate limits: a token bucket per client, `429` + `Retry-After` when it is empty, and
//! the IETF `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers) on
//! every answer so a client can pace itself before it is refused.
//!
//! ```text
//!   client key = the admin key's holder   when x-api-key is the valid key
//!              | the trusted header's IP  when RATE_LIMIT_CLIENT_HEADER is set (behind a proxy)
//!              | the peer's IP            otherwise
//!   bucket(key): BURST tokens, refilled at PER_SECOND; one token per request
//! ```
//!
//! The bucket is governor's GCRA, which is a token bucket kept as one timestamp per client. Only a
//! *valid* API key names a client: keying by whatever `x-api-key` a request carries would give an
//! attacker a fresh bucket per made-up key.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use shared::config::{ConfigError, Env};
use shared::problem::Problem;

use crate::auth::API_KEY;
use crate::config::AdminApiKey;

/// `RateLimit-Policy`: the quota, as the draft defines it.
pub static RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of the quota.
pub static RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The policy's name in the headers.
const POLICY: &str = "client";

/// Forgotten buckets are dropped after this many requests: a bucket that has refilled is the same
/// as no bucket, so this bounds memory by the clients of the last few minutes at most, for the
/// price of a scan of the map every so often.
const PRUNE_EVERY: u64 = 65_536;

/// How the gateway limits each client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Sustained requests per second per client (`RATE_LIMIT_PER_SECOND`; 0 turns limits off).
    pub per_second: u32,
    /// Requests a client may send at once after being quiet (`RATE_LIMIT_BURST`).
    pub burst: u32,
    /// A header set by a trusted proxy in front of the gateway that names the client's address
    /// (`RATE_LIMIT_CLIENT_HEADER`, e.g. `x-forwarded-for`; unset: the peer address is used).
    pub client_header: Option<HeaderName>,
}

impl RateLimitSettings {
    /// Reads `RATE_LIMIT_PER_SECOND`, `RATE_LIMIT_BURST` and `RATE_LIMIT_CLIENT_HEADER`.
    ///
    /// # Errors
    /// Returns [`ConfigError`] for a value that is not a number or not a header name.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        // 100 requests per second and a burst of 200 per client: far above what a person or a
        // shop front does (a page is a handful of calls), so the demo and the tests never meet
        // it, while one client looping as fast as it can is held to a small share of the
        // gateway's capacity (thousands per second).
        let per_second = env.parse_or("RATE_LIMIT_PER_SECOND", 100)?;
        let burst = env.parse_or("RATE_LIMIT_BURST", 200)?;
        let client_header = match env.get("RATE_LIMIT_CLIENT_HEADER") {
            None => None,
            Some(raw) => Some(HeaderName::try_from(raw.trim()).map_err(|e| ConfigError {
                key: "RATE_LIMIT_CLIENT_HEADER".to_owned(),
                value: raw.to_owned(),
                reason: e.to_string(),
            })?),
        };
        Ok(Self {
            per_second,
            burst,
            client_header,
        })
    }
}

/// Who a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The holder of the admin key.
    Admin,
    /// A client known by its address.
    Address(IpAddr),
    /// No address known (a request not served by a TCP listener, as in some tests).
    Unknown,
}

type Limiter = RateLimiter<
    ClientKey,
    DefaultKeyedStateStore<ClientKey>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// The gateway's per-client limits. Cloning shares the buckets.
#[derive(Debug, Clone)]
pub struct ClientRateLimit {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    limiter: Limiter,
    clock: DefaultClock,
    per_second: NonZeroU32,
    burst: NonZeroU32,
    policy: HeaderValue,
    client_header: Option<HeaderName>,
    admin_api_key: AdminApiKey,
    checks: AtomicU64,
}

impl ClientRateLimit {
    /// Limits from `settings`; off when `per_second` is 0.
    pub fn new(settings: &RateLimitSettings, admin_api_key: AdminApiKey) -> Self {
        let Some(per_second) = NonZeroU32::new(settings.per_second) else {
            return Self { inner: None };
        };
        let burst = NonZeroU32::new(settings.burst).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        // The window in which the whole quota (the burst) is refilled, in whole seconds.
        let window = burst.get().div_ceil(per_second.get());
        let policy = format!("\"{POLICY}\";q={};w={window}", burst.get());
        Self {
            inner: Some(Arc::new(Inner {
                limiter: RateLimiter::dashmap(quota)
                    .with_middleware::<StateInformationMiddleware>(),
                clock: DefaultClock::default(),
                per_second,
                burst,
                policy: HeaderValue::try_from(policy).unwrap_or(HeaderValue::from_static("")),
                client_header: settings.client_header.clone(),
                admin_api_key,
                checks: AtomicU64::new(0),
            })),
        }
    }

    /// Whether limits are enforced.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }
}

impl Inner {
    fn key(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> ClientKey {
        if headers
            .get(&API_KEY)
            .is_some_and(|key| self.admin_api_key.matches(key.as_bytes()))
        {
            return ClientKey::Admin;
        }
        let forwarded = self.client_header.as_ref().and_then(|name| {
            // A proxy appends the address it saw: the last entry is the one it vouches for.
            let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
            value.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
        });
        match forwarded.or(peer.map(|p| p.ip())) {
            Some(ip) => ClientKey::Address(ip),
            None => ClientKey::Unknown,
        }
    }

    fn prune_now_and_then(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.limiter.retain_recent();
        }
    }

    /// `RateLimit: "client";r=<remaining>;t=<seconds until the bucket is full again>`.
    fn state(&self, remaining: u32) -> HeaderValue {
        let missing = self.burst.get().saturating_sub(remaining);
        let full_in = missing.div_ceil(self.per_second.get());
        HeaderValue::try_from(format!("\"{POLICY}\";r={remaining};t={full_in}"))
            .unwrap_or(HeaderValue::from_static(""))
    }
}

/// Axum middleware: counts the request against its client's bucket, answers `429` when the
/// bucket is empty, and adds the `RateLimit` headers either way.
pub async fn enforce(
    State(limits): State<ClientRateLimit>,
    request: Request,
    next: Next,
) -> Response {
    let Some(inner) = limits.inner.as_deref() else {
        return next.run(request).await;
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let key = inner.key(request.headers(), peer);
    inner.prune_now_and_then();
    let (mut response, state) = match inner.limiter.check_key(&key) {
        Ok(snapshot) => {
            let state = inner.state(snapshot.remaining_burst_capacity());
            (next.run(request).await, state)
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(inner.clock.now());
            (too_many_requests(wait).into_response(), inner.state(0))
        }
    };
    let headers = response.headers_mut();
    headers.insert(RATE_LIMIT_POLICY.clone(), inner.policy.clone());
    headers.insert(RATE_LIMIT.clone(), state);
    response
}

/// The answer to a client over its limit.
fn too_many_requests(wait: Duration) -> Problem {
    Problem::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests")
        .detail("this client has used its request quota; retry after the Retry-After delay")
        .retry_after(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(client_header: Option<&'static str>) -> Arc<Inner> {
        let settings = RateLimitSettings {
            per_second: 1,
            burst: 2,
            client_header: client_header.map(HeaderName::from_static),
        };
        ClientRateLimit::new(&settings, AdminApiKey::new("s3cret"))
            .inner
            .expect("enabled")
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().expect("ip"), 40_000))
    }

    #[test]
    fn only_the_valid_api_key_names_a_client() {
        let limits = limits(None);
        let mut headers = HeaderMap::new();
        headers.insert(&API_KEY, HeaderValue::from_static("s3cret"));
        assert_eq!(limits.key(&headers, peer("10.0.0.1")), ClientKey::Admin);
        headers.insert(&API_KEY, HeaderValue::from_static("made-up"));
        assert_eq!(
            limits.key(&headers, peer("10.0.0.1")),
            ClientKey::Address("10.0.0.1".parse().expect("ip"))
        );
    }

    #[test]
    fn behind_a_proxy_the_last_forwarded_address_names_the_client() {
        let limits = limits(Some("x-forwarded-for"));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 192.0.2.7"),
        );
        assert_eq!(
            limits.key(&headers, peer("10.0.0.1")),
            ClientKey::Address("192.0.2.7".parse().expect("ip"))
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(
            limits.key(&headers, peer("10.0.0.1")),
            ClientKey::Address("10.0.0.1".parse().expect("ip"))
        );
    }

    #[test]
    fn a_client_gets_its_burst_and_then_is_told_when_to_come_back() {
        let limits = limits(None);
        let key = ClientKey::Address("10.0.0.1".parse().expect("ip"));
        let first = limits.limiter.check_key(&key).expect("within the burst");
        assert_eq!(first.remaining_burst_capacity(), 1);
        limits.limiter.check_key(&key).expect("within the burst");
        let refused = limits.limiter.check_key(&key).expect_err("over the burst");
        let wait = refused.wait_time_from(limits.clock.now());
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let other = ClientKey::Address("10.0.0.2".parse().expect("ip"));
        assert!(
            limits.limiter.check_key(&other).is_ok(),
            "buckets are per client"
        );
        assert_eq!(limits.policy, "\"client\";q=2;w=2");
        assert_eq!(limits.state(0), "\"client\";r=0;t=2");
    }
}
