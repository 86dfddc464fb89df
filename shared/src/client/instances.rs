//! The instances of one dependency: where they are (discovery), which one takes an attempt
//! (balancing) and which ones sit out for a while (ejection).
//!
//! - **Discovery.** A base URL whose host is a name (`http://inventory:4002`) stands for every
//!   address the name resolves to; one whose host is an IP address is one instance. Names are
//!   resolved on first use and again once the last resolution is older than
//!   [`BalanceConfig::resolve_every`]: the call that finds it stale starts the new resolution in
//!   the background and goes on with the instances it has. An address that appears becomes an
//!   instance (with a fresh load estimate); one that vanishes leaves the set, and the attempts
//!   already on it finish (they hold it), so it drains. A failed resolution keeps the last set.
//! - **Balancing.** Power of two choices: two instances picked at random, the one with the lower
//!   load takes the attempt. The load is tower's Peak-EWMA (`tower::load::PeakEwma`, from
//!   Finagle, as Linkerd's balancer uses it): the peak-sensitive moving average of response
//!   times, times the requests in flight. A retry or hedge avoids the instances its call already
//!   tried whenever another is eligible.
//! - **Ejection.** An instance that fails [`BalanceConfig::eject_after`] attempts in a row is left
//!   out for [`BalanceConfig::ejection_time`] times the number of times in a row it was ejected;
//!   when that passes it is eligible again and its next attempt is the probe: one more failure
//!   ejects it again, for longer, a success clears its record. At most
//!   [`BalanceConfig::max_ejected_percent`] of the instances are out at once (Envoy's cap), so a
//!   dependency that fails everywhere is left to the breaker instead of being ejected away.
//! - **Concurrency.** At most [`BalanceConfig::max_in_flight_per_instance`] attempts run on one
//!   instance at a time (so at most as many connections, HTTP/1.1 carrying one request per
//!   connection); the next one waits for a slot, within the call's deadline.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use http::HeaderValue;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tower::Service;
use tower::load::{CompleteOnResponse, Load, PeakEwma};
use url::{Host, Url};

use super::ClientError;

pub use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How instances are found, chosen and set aside; see [`BalanceConfig::default`] for the reasons.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// How often a name is resolved again.
    pub resolve_every: Duration,
    /// Attempts allowed in flight on one instance; more wait for a slot.
    pub max_in_flight_per_instance: usize,
    /// Consecutive failed attempts that eject an instance.
    pub eject_after: u32,
    /// How long a first ejection lasts; the n-th in a row lasts n times as long.
    pub ejection_time: Duration,
    /// The share of instances (percent, rounded down) that may be ejected at once.
    pub max_ejected_percent: u32,
}

impl Default for BalanceConfig {
    /// Resolve every 5 s, 64 attempts in flight per instance, eject after 5 failures for 10 s
    /// (×n, at most 10×), at most half of the instances out.
    ///
    /// - **5 s**: the TTL Kubernetes' CoreDNS gives service records, and the time a compose
    ///   replica takes to start; a new instance gets traffic within seconds for one lookup per
    ///   dependency every 5 s.
    /// - **64 in flight**: the idle connections the pool keeps per instance, so a busy instance
    ///   never churns connections; a caller's burst beyond it queues here instead of opening
    ///   hundreds of connections at once (whose connect timeouts would look like an outage).
    /// - **5 failures, 10 s**: Envoy's `consecutive_5xx` default, so one unlucky attempt never
    ///   ejects, and long enough that a dead instance costs a handful of failed attempts every
    ///   10 s (the probes) instead of a share of all traffic.
    /// - **half**: with three instances one may be out; with one, none, so a single instance is
    ///   never ejected and the breaker alone judges it.
    fn default() -> Self {
        Self {
            resolve_every: Duration::from_secs(5),
            max_in_flight_per_instance: 64,
            eject_after: 5,
            ejection_time: Duration::from_secs(10),
            max_ejected_percent: 50,
        }
    }
}

/// Ejections in a row beyond this do not make the next one longer: a dead instance is probed
/// every `10 × ejection_time` (100 s by default) at least, so one that comes back is used again
/// within two minutes.
const MAX_EJECTION_FACTOR: u32 = 10;

/// The first latency estimate of a new instance: next to nothing, so an instance that appears is
/// chosen as soon as the balancer samples it. The estimate is peak-sensitive, so the instance's
/// first answer replaces it with its real latency, and a new instance is favoured for one round
/// trip at most. (A conservative default, say 30 ms, would leave a new instance idle while an
/// older one answers faster than that: with two instances, power of two choices compares both
/// every time.)
const DEFAULT_RTT: Duration = Duration::from_micros(1);

/// How fast an estimate forgets: an instance that was slow 10 s ago has mostly earned its share
/// back, as in Linkerd's balancer.
const RTT_DECAY: Duration = Duration::from_secs(10);

/// A resolution that takes longer than this fails (and the last set stays): a healthy resolver
/// answers in milliseconds.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The resolver of dependency names, [`SystemResolver`] unless a test brings its own.
///
/// It is reqwest's resolver trait, so a resolver written for reqwest works here too.
#[derive(Clone)]
pub struct Resolver(pub Arc<dyn Resolve>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self(Arc::new(SystemResolver))
    }
}

/// Resolves names with the system's resolver (`getaddrinfo`, on tokio's blocking pool), as the
/// rest of the process does: `/etc/hosts`, compose's embedded DNS, a cluster's DNS.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// One instance of the dependency.
#[derive(Debug)]
pub(super) struct Instance {
    /// `ip:port`, or `host:port` of a URL whose host is not resolved here.
    address: String,
    /// The base URL with the instance's address as host.
    base: Url,
    /// The base URL's path without its trailing slash, prefixed to every request's path.
    base_path: String,
    /// The dependency's name as `Host`, when the URL holds a discovered address.
    host: Option<HeaderValue>,
    load: Mutex<PeakEwma<reqwest::Client>>,
    slots: Semaphore,
    health: Mutex<InstanceHealth>,
    attempts: AtomicU64,
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct InstanceHealth {
    consecutive_failures: u32,
    /// Ejections in a row (reset by a success).
    ejections: u32,
    ejected_until: Option<Instant>,
    last_answer: Option<Instant>,
}

impl Instance {
    fn new(
        target: &Target,
        address: Option<SocketAddr>,
        http: &reqwest::Client,
        max: usize,
    ) -> Self {
        let mut base = target.url.clone();
        let (address, host) = match address {
            Some(addr) => {
                // Setting an IP host on an http URL cannot fail.
                let _ = base.set_ip_host(addr.ip());
                let _ = base.set_port(Some(addr.port()));
                (addr.to_string(), Some(target.host_header.clone()))
            }
            None => (target.authority.clone(), None),
        };
        Self {
            address,
            base,
            base_path: target.base_path.clone(),
            host,
            load: Mutex::new(PeakEwma::new(
                http.clone(),
                DEFAULT_RTT,
                nanos(RTT_DECAY),
                CompleteOnResponse::default(),
            )),
            slots: Semaphore::new(max),
            health: Mutex::new(InstanceHealth::default()),
            attempts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// The URL of `path_and_query` on this instance.
    pub(super) fn url(&self, path_and_query: &str) -> Url {
        super::transport::attempt_url(&self.base, &self.base_path, path_and_query)
    }

    /// The `Host` header to send, when the URL does not carry the dependency's name.
    pub(super) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// A slot for one attempt; waits while the instance has its maximum in flight.
    pub(super) async fn slot(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquiring only ever waits.
        self.slots
            .acquire()
            .await
            .unwrap_or_else(|_| unreachable!("the slot semaphore is never closed"))
    }

    /// Sends `request` through the instance's load tracker: the response time (until the head
    /// arrives) feeds its latency estimate, and it counts as pending meanwhile.
    pub(super) fn send(
        &self,
        request: reqwest::Request,
    ) -> impl Future<Output = Result<reqwest::Response, reqwest::Error>> + use<> {
        // reqwest's client is always ready (`poll_ready` returns `Ready` at once), so calling
        // without polling readiness first keeps tower's contract.
        lock(&self.load).call(request)
    }

    /// Whether the instance answered anything (any status) after `since`.
    pub(super) fn answered_since(&self, since: Instant) -> bool {
        lock(&self.health).last_answer.is_some_and(|at| at >= since)
    }

    fn load(&self) -> tower::load::peak_ewma::Cost {
        lock(&self.load).load()
    }

    fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.health)
            .ejected_until
            .is_some_and(|until| now < until)
    }
}

/// A configured base URL.
#[derive(Debug)]
struct Target {
    url: Url,
    /// The name to resolve, when the host is not an IP address.
    name: Option<String>,
    port: u16,
    authority: String,
    base_path: String,
    host_header: HeaderValue,
}

/// Every instance of one dependency, and the state that chooses among them.
#[derive(Debug)]
pub(super) struct Instances {
    dependency: &'static str,
    http: reqwest::Client,
    config: BalanceConfig,
    resolver: Resolver,
    targets: Vec<Target>,
    /// Whether some target is a name (otherwise the set never changes).
    has_names: bool,
    current: RwLock<Arc<[Arc<Instance>]>>,
    /// When the names were last resolved (`None`: never, or there are no names).
    resolved_at: Mutex<Option<Instant>>,
    /// Held while resolving, so resolutions never overlap: calls that find the names due at the
    /// same moment (a cold burst) share one lookup and one set of instances, each instance with
    /// its one bound on attempts in flight.
    resolving: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    /// Held while an ejection is decided, so instances that fail at the same moment on several
    /// threads cannot each see room under the cap and all go out.
    ejecting: Mutex<()>,
}

impl Instances {
    /// The instances behind `urls` (validated by the client builder: `http`, with a host).
    pub(super) fn new(
        dependency: &'static str,
        urls: &[Url],
        http: reqwest::Client,
        config: BalanceConfig,
        resolver: Resolver,
    ) -> Result<Self, ClientError> {
        let targets = urls
            .iter()
            .map(|url| target(dependency, url))
            .collect::<Result<Vec<_>, _>>()?;
        let initial: Vec<_> = targets
            .iter()
            .filter(|t| t.name.is_none())
            .map(|t| {
                Arc::new(Instance::new(
                    t,
                    None,
                    &http,
                    config.max_in_flight_per_instance,
                ))
            })
            .collect();
        Ok(Self {
            dependency,
            http,
            config,
            resolver,
            has_names: targets.iter().any(|t| t.name.is_some()),
            targets,
            current: RwLock::new(initial.into()),
            resolved_at: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            ejecting: Mutex::new(()),
        })
    }

    /// The instance for the next attempt: power of two choices among the eligible instances that
    /// the call has not `tried`. A retry falls back to the tried ones when no other is eligible; a
    /// hedge (`hedge`) only to one with a free slot, so that it never queues behind the attempt it
    /// is meant to overtake (`Ok(None)`: no hedge).
    ///
    /// # Errors
    /// [`ClientError::Connect`] when no name resolved to any address yet.
    pub(super) async fn pick(
        self: &Arc<Self>,
        tried: impl Fn(&Instance) -> bool,
        hedge: bool,
    ) -> Result<Option<Arc<Instance>>, ClientError> {
        self.resolve_if_due().await;
        let set = self.snapshot();
        let has_room = |i: &Instance| !hedge || !tried(i) || i.slots.available_permits() > 0;
        if let [only] = &set[..] {
            // One instance (the common case): nothing to choose.
            return Ok(has_room(only).then(|| Arc::clone(only)));
        }
        let now = Instant::now();
        let eligible = |i: &&Arc<Instance>| !i.is_ejected(now);
        let mut candidates: Vec<&Arc<Instance>> =
            set.iter().filter(eligible).filter(|i| !tried(i)).collect();
        if candidates.is_empty() {
            candidates = set
                .iter()
                .filter(eligible)
                .filter(|i| has_room(i))
                .collect();
            if hedge && candidates.is_empty() {
                return Ok(None);
            }
        }
        if candidates.is_empty() {
            // The ejection cap keeps some instance eligible; should all be out anyway (the set
            // shrank under them), any is better than none.
            candidates = set.iter().collect();
        }
        let chosen = match candidates[..] {
            [] => {
                return Err(ClientError::Connect {
                    dependency: self.dependency,
                    source: "no instance: the dependency's name resolved to no address".into(),
                });
            }
            [one] => one,
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let b = (a + rng.random_range(1..candidates.len())) % candidates.len();
                let (a, b) = (candidates[a], candidates[b]);
                if b.load() < a.load() { b } else { a }
            }
        };
        Ok(Some(Arc::clone(chosen)))
    }

    /// Records what an attempt on `instance` said about it: `Some(true)` a failure, `Some(false)`
    /// a success, `None` nothing. `answered` is true when it sent any answer at all.
    pub(super) fn record(&self, instance: &Instance, verdict: Option<bool>, answered: bool) {
        let now = Instant::now();
        instance.attempts.fetch_add(1, Ordering::Relaxed);
        let mut health = lock(&instance.health);
        if answered {
            health.last_answer = Some(now);
        }
        match verdict {
            None => {}
            Some(false) => {
                health.consecutive_failures = 0;
                health.ejections = 0;
            }
            Some(true) => {
                instance.failures.fetch_add(1, Ordering::Relaxed);
                health.consecutive_failures += 1;
                let already_out = health.ejected_until.is_some_and(|until| now < until);
                if health.consecutive_failures >= self.config.eject_after && !already_out {
                    drop(health);
                    self.eject(instance, now);
                }
            }
        }
    }

    fn eject(&self, instance: &Instance, now: Instant) {
        let _deciding = lock(&self.ejecting);
        if instance.is_ejected(now) {
            // Another failure of the same instance ejected it meanwhile.
            return;
        }
        let set = self.snapshot();
        let cap = set.len() * self.config.max_ejected_percent as usize / 100;
        let out = set
            .iter()
            .filter(|i| !std::ptr::eq(&***i, instance) && i.is_ejected(now))
            .count();
        if out >= cap {
            return;
        }
        let mut health = lock(&instance.health);
        health.ejections = (health.ejections + 1).min(MAX_EJECTION_FACTOR);
        let ejected_for = self.config.ejection_time * health.ejections;
        health.ejected_until = Some(now + ejected_for);
        // Back in, its first failure ejects it again: the attempt after the ejection is a probe.
        health.consecutive_failures = self.config.eject_after.saturating_sub(1);
        tracing::warn!(
            dependency = self.dependency,
            instance = %instance.address,
            failures = self.config.eject_after,
            ejected_for_ms = super::breaker::duration_ms(ejected_for),
            "instance ejected: it keeps failing"
        );
    }

    fn snapshot(&self) -> Arc<[Arc<Instance>]> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves the names when they never were or gave no address (waiting for it), or when the
    /// last resolution is older than `resolve_every` (in the background, keeping the current set
    /// meanwhile).
    async fn resolve_if_due(self: &Arc<Self>) {
        if !self.has_names {
            return;
        }
        let resolved_at = *lock(&self.resolved_at);
        match resolved_at {
            // Never resolved, or nothing found yet (a dependency that is still starting): ask now
            // rather than failing every call until the next interval.
            None => self.resolve_in_task(resolved_at).await,
            Some(_) if self.snapshot().is_empty() => self.resolve_in_task(resolved_at).await,
            Some(at) if at.elapsed() >= self.config.resolve_every => {
                if !self.refreshing.swap(true, Ordering::AcqRel) {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        me.resolve(resolved_at).await;
                        me.refreshing.store(false, Ordering::Release);
                    });
                }
            }
            Some(_) => {}
        }
    }

    /// Resolves the names in a task of its own and waits for it: a call whose deadline ends first
    /// abandons the wait, not the lookup, so calls with short deadlines still get the names
    /// resolved for the calls after them.
    async fn resolve_in_task(self: &Arc<Self>, seen: Option<Instant>) {
        let me = Arc::clone(self);
        // A task that failed (it panicked, or the runtime is shutting down) resolved nothing: the
        // call then finds no instance, and the next call asks again.
        let _ = tokio::spawn(async move { me.resolve(seen).await }).await;
    }

    /// Resolves the names, unless another resolution finished while this one waited for its turn
    /// (`seen` is the resolution the caller found due): its result is as fresh as this one's.
    async fn resolve(&self, seen: Option<Instant>) {
        let _turn = self.resolving.lock().await;
        if *lock(&self.resolved_at) != seen {
            return;
        }
        let old = self.snapshot();
        let mut next: Vec<Arc<Instance>> = Vec::with_capacity(old.len());
        for target in &self.targets {
            let Some(name) = &target.name else {
                next.extend(
                    old.iter()
                        .filter(|i| i.host.is_none() && i.base == target.url)
                        .cloned(),
                );
                continue;
            };
            match self.lookup(name, target.port).await {
                Ok(addrs) => {
                    for addr in addrs {
                        let address = addr.to_string();
                        let existing = old
                            .iter()
                            .find(|i| i.address == address && i.host.is_some());
                        next.push(match existing {
                            Some(instance) => Arc::clone(instance),
                            None => Arc::new(Instance::new(
                                target,
                                Some(addr),
                                &self.http,
                                self.config.max_in_flight_per_instance,
                            )),
                        });
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        dependency = self.dependency,
                        name = %name,
                        error = %error,
                        "cannot resolve the dependency's name; keeping its known instances"
                    );
                    let kept = old
                        .iter()
                        .filter(|i| i.host.as_ref() == Some(&target.host_header));
                    next.extend(kept.cloned());
                }
            }
        }
        next.dedup_by(|a, b| a.address == b.address);
        let added: Vec<&str> = next
            .iter()
            .filter(|i| !old.iter().any(|o| Arc::ptr_eq(o, i)))
            .map(|i| i.address.as_str())
            .collect();
        let removed: Vec<&str> = old
            .iter()
            .filter(|o| !next.iter().any(|i| Arc::ptr_eq(o, i)))
            .map(|i| i.address.as_str())
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                dependency = self.dependency,
                added = ?added,
                removed = ?removed,
                instances = next.len(),
                "instances changed"
            );
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next.into();
        // A failed lookup is retried at the next interval, like a successful one: a resolver
        // that is down is not asked on every call.
        *lock(&self.resolved_at) = Some(Instant::now());
    }

    async fn lookup(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let parsed = Name::from_str(name).map_err(|_| format!("{name} is not a host name"))?;
        let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, self.resolver.0.resolve(parsed))
            .await
            .map_err(|_| format!("no answer within {} ms", RESOLVE_TIMEOUT.as_millis()))?
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<SocketAddr> = addrs.map(|a| SocketAddr::new(a.ip(), port)).collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no address".to_owned());
        }
        Ok(addrs)
    }

    /// Each instance's state, for `/readyz`.
    pub(super) fn report(&self) -> Vec<Value> {
        let now = Instant::now();
        self.snapshot()
            .iter()
            .map(|i| {
                let view = i.view(now, self.config.max_in_flight_per_instance);
                json!({
                    "address": i.address,
                    "state": if view.ejected { "ejected" } else { "eligible" },
                    "inFlight": view.in_flight,
                    "consecutiveFailures": view.consecutive_failures,
                    "attempts": view.attempts,
                    "failures": view.failures,
                })
            })
            .collect()
    }

    /// Each instance's counters, for `/metrics`.
    pub(super) fn views(&self) -> Vec<InstanceView> {
        let now = Instant::now();
        self.snapshot()
            .iter()
            .map(|i| i.view(now, self.config.max_in_flight_per_instance))
            .collect()
    }
}

/// What `/metrics` shows of one instance.
#[derive(Debug, Clone)]
pub(super) struct InstanceView {
    /// `ip:port` (or `host:port` of an address that is not resolved here).
    pub address: String,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// Attempts on it right now.
    pub in_flight: u64,
    /// Failed attempts since its last success.
    pub consecutive_failures: u32,
    /// Attempts so far.
    pub attempts: u64,
    /// Attempts that counted against it so far.
    pub failures: u64,
}

impl Instance {
    fn view(&self, now: Instant, max: usize) -> InstanceView {
        let health = lock(&self.health);
        InstanceView {
            address: self.address.clone(),
            ejected: health.ejected_until.is_some_and(|until| now < until),
            in_flight: (max - self.slots.available_permits()) as u64,
            consecutive_failures: health.consecutive_failures,
            attempts: self.attempts.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

fn target(dependency: &'static str, url: &Url) -> Result<Target, ClientError> {
    let invalid = |what: &str| ClientError::Config(format!("{dependency}: {url}: {what}"));
    let port = url
        .port_or_known_default()
        .ok_or_else(|| invalid("no port"))?;
    let (name, host) = match url.host() {
        Some(Host::Domain(name)) => (Some(name.to_owned()), name.to_owned()),
        Some(Host::Ipv4(ip)) => (None, IpAddr::V4(ip).to_string()),
        Some(Host::Ipv6(ip)) => (None, format!("[{ip}]")),
        None => return Err(invalid("no host")),
    };
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    let host_header =
        HeaderValue::from_str(&authority).map_err(|_| invalid("the host is not a header value"))?;
    Ok(Target {
        url: url.clone(),
        name,
        port,
        authority,
        base_path: url.path().trim_end_matches('/').to_owned(),
        host_header,
    })
}

fn nanos(d: Duration) -> f64 {
    // Nanoseconds as a float: a duration of days still has more precision than needed.
    d.as_secs_f64() * 1e9
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections cannot panic half-way, so a poisoned lock still holds valid state.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_failing_at_the_same_moment_are_never_ejected_past_the_cap() {
        let urls: Vec<Url> = ["http://127.0.0.2:4002", "http://127.0.0.3:4002"]
            .iter()
            .map(|u| Url::parse(u).expect("url"))
            .collect();
        let http = reqwest::Client::new();
        let config = BalanceConfig::default();
        for _ in 0..2000 {
            let instances = Instances::new(
                "inventory",
                &urls,
                http.clone(),
                config.clone(),
                Resolver::default(),
            )
            .expect("instances");
            let set = instances.snapshot();
            for instance in set.iter() {
                for _ in 1..config.eject_after {
                    instances.record(instance, Some(true), false);
                }
            }
            // Both reach their last failure at once, on two threads.
            let barrier = std::sync::Barrier::new(set.len());
            std::thread::scope(|scope| {
                for instance in set.iter() {
                    let (instances, barrier) = (&instances, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        instances.record(instance, Some(true), false);
                    });
                }
            });

            // Half of two is one.
            let now = Instant::now();
            let out = set.iter().filter(|i| i.is_ejected(now)).count();
            assert_eq!(out, 1);
        }
    }
}
