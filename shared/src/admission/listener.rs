//! Serving HTTP/1.1 with bounds on what one client can hold: a header read timeout, a keep-alive
//! idle timeout and a maximum number of open connections.
//!
//! ```text
//!   accept ◄─ a permit of MAX connections (the rest wait in the kernel's backlog)
//!     └─ connection ── idle ──(first byte)──► head ──(head parsed)──► busy ──(answered)──► idle
//!                      ≤ idle timeout         ≤ header read timeout
//! ```
//!
//! `axum::serve` has none of these bounds: a client that sends half a request head holds its
//! connection (a task and a socket) forever, and enough of them exhaust the file descriptors. hyper
//! has a header timer, but starts it when it *begins waiting* for a head, so on a kept-alive
//! connection it is the idle timeout too; the head's own, shorter bound is [`HeadTimeout`], which
//! starts at the first byte of a request.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::config::{ConfigError, Env};

/// How a listener bounds its clients. [`Default`] gives the production defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSettings {
    /// From a request's first byte to the end of its head (`HTTP_HEADER_READ_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request (`HTTP_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
    /// Connections served at once (`HTTP_MAX_CONNECTIONS`); more wait in the accept backlog.
    pub max_connections: usize,
}

/// 10 s for a request head: a head is at most a few kilobytes, which any real client sends in one
/// packet, and 10 s covers a phone on a bad link; a deliberately slow client is cut off after it.
/// (nginx and Node.js allow 60 s, Go has no bound by default.)
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// 75 s between requests on a kept-alive connection: longer than the idle timeout of our own
/// client's pool (30 s) and of common load balancers (60 s), so the *caller* always closes an idle
/// connection first and never sends a request on one this side is closing at that very moment.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// At most this many connections when the file-descriptor limit allows more: enough for 10,000
/// slow clients and the normal traffic beside them, and about 100 MiB of connection buffers at
/// worst (hyper's 8 KiB read buffer each).
pub const MAX_CONNECTIONS_CEILING: usize = 16_384;

/// File descriptors kept back from the connection limit for everything else a service opens:
/// its database, broker connection, upstream pools and logs.
const RESERVED_DESCRIPTORS: usize = 1024;

impl Default for ListenerSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: default_max_connections(open_files_limit()),
        }
    }
}

impl ListenerSettings {
    /// Reads `HTTP_HEADER_READ_TIMEOUT_MS`, `HTTP_IDLE_TIMEOUT_MS` and `HTTP_MAX_CONNECTIONS`.
    ///
    /// # Errors
    /// Returns [`ConfigError`] for a value that is not a number, or zero.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let settings = Self {
            header_read_timeout: env
                .millis_or("HTTP_HEADER_READ_TIMEOUT_MS", defaults.header_read_timeout)?,
            idle_timeout: env.millis_or("HTTP_IDLE_TIMEOUT_MS", defaults.idle_timeout)?,
            max_connections: env.parse_or("HTTP_MAX_CONNECTIONS", defaults.max_connections)?,
        };
        for (key, zero) in [
            (
                "HTTP_HEADER_READ_TIMEOUT_MS",
                settings.header_read_timeout.is_zero(),
            ),
            ("HTTP_IDLE_TIMEOUT_MS", settings.idle_timeout.is_zero()),
            ("HTTP_MAX_CONNECTIONS", settings.max_connections == 0),
        ] {
            if zero {
                return Err(ConfigError {
                    key: key.to_owned(),
                    value: "0".to_owned(),
                    reason: "zero would refuse every connection or request".to_owned(),
                });
            }
        }
        Ok(settings)
    }
}

/// The connection limit for a process allowed `open_files` descriptors: what remains after
/// [`RESERVED_DESCRIPTORS`] (a quarter of the limit when it is small), at most
/// [`MAX_CONNECTIONS_CEILING`]. A listener then waits at its limit instead of failing `accept`
/// with "too many open files".
pub fn default_max_connections(open_files: Option<usize>) -> usize {
    let Some(open_files) = open_files else {
        return MAX_CONNECTIONS_CEILING;
    };
    let reserved = RESERVED_DESCRIPTORS.min(open_files / 4);
    (open_files - reserved).clamp(1, MAX_CONNECTIONS_CEILING)
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None` elsewhere.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight requests finish
/// for at most `drain`. Each request carries [`ConnectInfo<SocketAddr>`] with its peer address.
///
/// # Errors
/// Never fails today (accept errors are logged and retried); the signature leaves room for that.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // hyper's head timer runs from the moment it waits for a request: the idle bound.
        .header_read_timeout(settings.idle_timeout)
        .keep_alive(true);
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        // Answers are small and latency-bound: do not let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let phase = Arc::new(AtomicU8::new(IDLE));
        let io = TokioIo::new(HeadTimeout::new(
            stream,
            Arc::clone(&phase),
            settings.header_read_timeout,
        ));
        let service = ConnectionService {
            router: router.clone(),
            peer,
            phase,
        };
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Timeouts and clients hanging up end connections all the time; not a warning.
                tracing::debug!(%error, %peer, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
            "drain period over; abandoning open connections"
        );
    }
    Ok(())
}

/// An `accept` error. Errors of the one connection (it was reset before we took it) need nothing;
/// running out of descriptors or memory does, so wait a moment instead of spinning on it.
async fn accept_failed(error: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(%error, "accepting a connection failed; retrying in 100 ms");
    // 100 ms: long enough for other connections to finish and free descriptors, short enough
    // that a listener recovers as soon as they have.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Where a connection is between requests, shared by its I/O and its service.
const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// The router, for one connection: adds the peer address and marks the request's phases.
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    phase: Arc<AtomicU8>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        // The head is complete: the header timer no longer applies.
        self.phase.store(BUSY, Ordering::Release);
        let mut request: Request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let mut router = self.router.clone();
        let phase = Arc::clone(&self.phase);
        Box::pin(async move {
            let response = router.call(request).await;
            phase.store(IDLE, Ordering::Release);
            response
        })
    }
}

/// A connection's reads, failing with [`io::ErrorKind::TimedOut`] when a request head takes
/// longer than its timeout from its first byte.
struct HeadTimeout {
    stream: TcpStream,
    phase: Arc<AtomicU8>,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl HeadTimeout {
    fn new(stream: TcpStream, phase: Arc<AtomicU8>, timeout: Duration) -> Self {
        Self {
            stream,
            phase,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl AsyncRead for HeadTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let started = buf.filled().len() > before
                    && this
                        .phase
                        .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                if started {
                    let deadline = Instant::now() + this.timeout;
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase.load(Ordering::Acquire) == HEAD
                    && this.timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within the header read timeout",
                    )));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for HeadTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_descriptors_for_everything_else() {
        assert_eq!(default_max_connections(Some(20_000)), 16_384);
        assert_eq!(default_max_connections(Some(4096)), 3072);
        assert_eq!(default_max_connections(Some(1024)), 768);
        assert_eq!(default_max_connections(None), 16_384);
    }

    #[test]
    fn zero_limits_are_rejected() {
        let env = Env::from_pairs([("HTTP_MAX_CONNECTIONS", "0")]);
        let error = ListenerSettings::from_env(&env).expect_err("must fail");
        assert_eq!(error.key, "HTTP_MAX_CONNECTIONS");
    }
}
