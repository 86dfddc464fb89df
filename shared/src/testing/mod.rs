//! Test support shared by every crate's test harness (compiled with the `testing` feature only).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

use crate::telemetry::{
    CapturedLogs, LogFormat, TelemetrySettings, get_subscriber, get_tracing_subscriber,
    init_subscriber,
};

/// The development broker; `AMQP_URL` overrides it (see [`amqp_url`]).
pub const LOCAL_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long an asynchronous effect may take before a test fails: a message's round trip through
/// a local broker takes milliseconds, so ten seconds only ever expires on a real failure.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// How often a condition is polled while waiting for it: often enough to add no noticeable
/// latency, rarely enough to cost nothing.
pub const POLL: Duration = Duration::from_millis(25);

/// The broker tests talk to: `AMQP_URL` if set (CI, a remote broker), else [`LOCAL_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| LOCAL_AMQP_URL.to_owned())
}

/// Sends JSON log lines to stdout when `TEST_LOG` is set and nowhere otherwise; call it from every
/// harness's `spawn_app` (only the first call does anything).
pub fn init_test_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let settings = TelemetrySettings {
                format: LogFormat::Json,
                filter: "info".to_owned(),
                otlp_endpoint: None,
            };
            let _ = init_subscriber(get_subscriber("test", &settings, std::io::stdout));
        }
    });
}

/// Polls `condition` every [`POLL`] until it holds, failing the test after [`EVENTUALLY`] with
/// `what` in the message. The way to wait for an asynchronous effect: never a fixed sleep.
///
/// # Panics
/// When `condition` still does not hold after [`EVENTUALLY`].
pub async fn assert_eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Spans recorded in memory, for tests of what a trace looks like: install
/// [`subscriber`](Self::subscriber) with `tracing::subscriber::set_default` on a current-thread
/// runtime, run the code, then read [`spans`](Self::spans).
#[derive(Debug, Clone)]
pub struct CapturedSpans {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    logs: CapturedLogs,
}

impl Default for CapturedSpans {
    fn default() -> Self {
        let exporter = InMemorySpanExporter::default();
        // The simple processor exports each span as it ends, so a test reads it at once.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        Self {
            exporter,
            provider,
            logs: CapturedLogs::default(),
        }
    }
}

impl CapturedSpans {
    /// A subscriber for `service` that exports spans here and writes JSON lines to
    /// [`logs`](Self::logs).
    pub fn subscriber(&self, service: &'static str) -> Box<dyn tracing::Subscriber + Send + Sync> {
        let settings = TelemetrySettings {
            format: LogFormat::Json,
            filter: "info".to_owned(),
            otlp_endpoint: None,
        };
        get_tracing_subscriber(
            service,
            &settings,
            self.logs.clone(),
            Some(self.provider.tracer(service)),
        )
    }

    /// Every span finished so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap_or_default()
    }

    /// The log lines written through [`subscriber`](Self::subscriber).
    pub fn logs(&self) -> &CapturedLogs {
        &self.logs
    }
}

/// A JSON-lines subscriber at `info` that exports no traces, writing to `logs`.
pub fn untraced_subscriber(logs: CapturedLogs) -> Box<dyn tracing::Subscriber + Send + Sync> {
    let settings = TelemetrySettings {
        format: LogFormat::Json,
        filter: "info".to_owned(),
        otlp_endpoint: None,
    };
    get_subscriber("test", &settings, logs)
}

pub mod postgres;
