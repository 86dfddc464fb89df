//! The chassis's listener and admission control over real sockets: slow and idle clients are cut
//! off, the connection limit holds, and requests over the concurrency limit are refused at once
//! while health and metrics are always answered. Timeouts run on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use shared::admission::{Admission, LimitSettings, ListenerSettings, Refusal};
use shared::metrics::Metrics;
use shared::server::Chassis;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SETTINGS: ListenerSettings = ListenerSettings {
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(75),
    max_connections: 4,
};

/// Serves `router` with `settings` on a free port; returns the port and the stop token.
async fn serve(router: Router, settings: ListenerSettings) -> (u16, CancellationToken) {
    let listener = shared::server::bind("127.0.0.1", 0).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    tokio::spawn(shared::server::serve_with(
        listener,
        router,
        settings,
        stop.clone(),
        Duration::from_secs(1),
    ));
    (port, stop)
}

fn hello() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    // A reset (rather than a clean close) also ends the connection; what was read so far counts.
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response head and its short body (the test routes answer a few bytes).
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_half_a_request_head_is_cut_off_at_the_header_timeout() {
    let (port, _stop) = serve(hello(), SETTINGS).await;
    let mut slow = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    read_to_close(&mut slow).await;
    let waited = started.elapsed();
    assert!(
        waited >= SETTINGS.header_read_timeout && waited < SETTINGS.header_read_timeout * 2,
        "closed after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_timeout_not_the_header_timeout() {
    let (port, _stop) = serve(hello(), SETTINGS).await;
    let mut client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut client).await.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    read_to_close(&mut client).await;
    let waited = started.elapsed();
    assert!(
        waited >= SETTINGS.idle_timeout && waited < SETTINGS.idle_timeout + Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_normal_request_is_answered_while_slow_clients_hold_connections() {
    let (port, _stop) = serve(hello(), SETTINGS).await;
    let mut slow = Vec::new();
    for _ in 0..SETTINGS.max_connections - 1 {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(b"GET / HT").await.expect("write");
        slow.push(stream);
    }
    let mut normal = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    normal
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = tokio::time::timeout(Duration::from_secs(1), read_response(&mut normal))
        .await
        .expect("answered at once");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn connections_over_the_limit_wait_until_one_closes() {
    let settings = ListenerSettings {
        max_connections: 1,
        ..SETTINGS
    };
    let (port, _stop) = serve(hello(), settings).await;
    let mut holder = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    holder
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut holder).await.starts_with("HTTP/1.1 200"));
    // The kernel completes the handshake, but the listener does not take the connection.
    let mut waiting = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let early = tokio::time::timeout(Duration::from_secs(5), read_response(&mut waiting)).await;
    assert!(early.is_err(), "answered beyond the connection limit");
    drop(holder);
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut waiting))
        .await
        .expect("answered once a connection closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A chassis whose only route blocks until `release` is notified, with a fixed limit of 1.
fn blocking_service(release: Arc<Notify>) -> (Router, Metrics) {
    let metrics = Metrics::new("test");
    let chassis = Chassis {
        service: "test",
        request_budget: Duration::from_secs(60),
        body_limit: 1024,
        metrics: metrics.clone(),
        admission: Admission::new(
            LimitSettings {
                initial: 1,
                min: 1,
                max: 1,
            },
            Refusal::Unavailable,
            &metrics,
        ),
    };
    let routes = Router::new()
        .route(
            "/slow",
            get(move || {
                let release = Arc::clone(&release);
                async move {
                    release.notified().await;
                    "done"
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(|| async { "metrics" }));
    (chassis.wrap(routes), metrics)
}

async fn get_path(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_to_close(&mut stream).await
}

#[tokio::test]
async fn a_request_over_the_limit_is_refused_at_once_but_health_and_metrics_are_served() {
    let release = Arc::new(Notify::new());
    let (router, metrics) = blocking_service(Arc::clone(&release));
    let (port, _stop) = serve(router, SETTINGS).await;
    let first = tokio::spawn(async move { get_path(port, "/slow").await });
    // Wait (polling, bounded) until the first request holds the only slot.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics
        .render()
        .contains("admission_in_flight{service=\"test\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request was never admitted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let started = std::time::Instant::now();
    let refused = get_path(port, "/slow").await;
    let took = started.elapsed();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("application/problem+json"), "{refused}");
    assert!(took < Duration::from_millis(100), "refusing took {took:?}");
    assert!(get_path(port, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get_path(port, "/metrics").await.starts_with("HTTP/1.1 200"));

    release.notify_one();
    let answered = first.await.expect("first request");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    let rendered = metrics.render();
    assert!(
        rendered.contains("admission_requests_total{service=\"test\",outcome=\"rejected\"} 1"),
        "{rendered}"
    );
}
