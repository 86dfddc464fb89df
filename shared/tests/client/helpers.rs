//! Upstreams and client configurations shared by the client tests.

use std::time::Duration;

use shared::client::{ClientConfig, ResilientClient};
use url::Url;
use wiremock::MockServer;

/// A config for `upstreams` whose timings keep tests fast: backoff of a few milliseconds, a
/// retry budget large enough never to interfere (tests of the budget set their own), a breaker
/// that only trips where a test wants it to, and no hedging (the tests of retries and deadlines
/// count attempts; the hedging tests turn it on).
pub fn config(upstreams: &[&MockServer]) -> ClientConfig {
    let mut config = ClientConfig::new("inventory", upstreams.iter().map(|s| url(s)).collect());
    config.retry.base_delay = Duration::from_millis(1);
    config.retry.max_delay = Duration::from_millis(5);
    config.retry.budget_min_per_sec = 1000;
    config.breaker.failure_threshold = 1000;
    config.hedge_delay = None;
    config
}

pub fn client(config: ClientConfig) -> ResilientClient {
    ResilientClient::new(config).expect("valid client config")
}

pub fn url(server: &MockServer) -> Url {
    Url::parse(&server.uri()).expect("wiremock uri")
}

/// A URL nothing listens on: the port was just free, so connecting is refused.
pub fn refused_url() -> Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    Url::parse(&format!("http://127.0.0.1:{port}")).expect("url")
}

pub async fn received(server: &MockServer) -> Vec<wiremock::Request> {
    server.received_requests().await.expect("recording is on")
}

/// Moves tokio's clock forward by `by` without waiting, then lets it run again in real time.
/// Only valid on the current-thread runtime of `#[tokio::test]`.
pub async fn jump_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// How a [`TestInstance`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `200` at once.
    Healthy,
    /// `200` after this long.
    Slow(Duration),
    /// Reads the request and never answers.
    Hanging,
}

/// One instance of a dependency on an address of its own (`127.0.0.x`, the same port for every
/// instance, as the addresses behind one DNS name would be). It speaks just enough HTTP/1.1 for
/// the client (keep-alive, `content-length` bodies), counts the requests it read and the most it
/// had in flight at once, and can be killed: its listener and every connection close.
pub struct TestInstance {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<InstanceState>,
    stop: tokio_util::sync::CancellationToken,
}

struct InstanceState {
    behaviour: std::sync::Mutex<Behaviour>,
    requests: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
}

impl TestInstance {
    /// Starts an instance listening on `addr`.
    pub async fn start(addr: std::net::SocketAddr, behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let state = std::sync::Arc::new(InstanceState {
            behaviour: std::sync::Mutex::new(behaviour),
            requests: Default::default(),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let (task_state, task_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = task_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (state, stop) = (task_state.clone(), task_stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = serve(stream, &state) => {}
                    }
                });
            }
        });
        Self { addr, state, stop }
    }

    /// Changes how it answers from the next request on.
    pub fn behave(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().expect("lock") = behaviour;
    }

    /// Requests read so far.
    pub fn requests(&self) -> usize {
        self.state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests it had in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the listener and every connection: from now on, connecting is refused.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(stream: tokio::net::TcpStream, state: &InstanceState) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut content_length = 0_usize;
        let mut line = String::new();
        // The request line, then headers up to the empty line.
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        state.requests.fetch_add(1, SeqCst);
        let now = state.in_flight.fetch_add(1, SeqCst) + 1;
        state.max_in_flight.fetch_max(now, SeqCst);
        let behaviour = *state.behaviour.lock().expect("lock");
        let status = match behaviour {
            Behaviour::Healthy => "200 OK",
            Behaviour::Slow(delay) => {
                tokio::time::sleep(delay).await;
                "200 OK"
            }
            Behaviour::Hanging => std::future::pending().await,
        };
        state.in_flight.fetch_sub(1, SeqCst);
        let response = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\n{{}}");
        if writer.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// `count` free addresses `127.0.0.2`, `127.0.0.3`, … sharing one port.
pub fn instance_addresses(count: u8) -> Vec<std::net::SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    (0..count)
        .map(|i| std::net::SocketAddr::from(([127, 0, 0, 2 + i], port)))
        .collect()
}

/// A resolver the test controls: the name resolves to whatever addresses were set last. Like a
/// real resolver it answers asynchronously (after yielding once), so calls that resolve at the
/// same time overlap; it counts the lookups it was asked for.
#[derive(Debug, Clone, Default)]
pub struct TestResolver {
    addrs: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    lookups: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestResolver {
    /// From now on the name resolves to `addrs`.
    pub fn set(&self, addrs: &[std::net::SocketAddr]) {
        *self.addrs.lock().expect("lock") = addrs.to_vec();
    }

    /// Lookups asked for so far.
    pub fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl shared::client::Resolve for TestResolver {
    fn resolve(&self, _name: shared::client::Name) -> shared::client::Resolving {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let addrs = self.addrs.lock().expect("lock").clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(Box::new(addrs.into_iter()) as shared::client::Addrs)
        })
    }
}

/// A config for the name `inventory.test` on `port`, resolved by `resolver`.
pub fn named_config(resolver: &TestResolver, port: u16) -> ClientConfig {
    let mut config = config(&[]);
    config.base_urls = vec![Url::parse(&format!("http://inventory.test:{port}")).expect("url")];
    config.resolver = shared::client::Resolver(std::sync::Arc::new(resolver.clone()));
    config
}
