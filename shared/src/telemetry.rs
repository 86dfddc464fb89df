//! Logs as JSON lines in the shape every service shares, or pretty text for local reading; and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, traces exported over OTLP/HTTP.
//!
//! Each line carries `timestamp`, `level`, `service`, `correlationId` (when there is one),
//! `traceId` and `spanId` (when the line is written inside a trace), `msg`, the event's own fields
//! and the fields of the spans it happened in:
//!
//! ```text
//! {"timestamp":"2026-11-22T10:00:00.123Z","level":"info","service":"order","correlationId":"a1f3","traceId":"4bf9…","spanId":"00f0…","msg":"POST /orders","status":201}
//! ```
//!
//! Span fields with a dot in their name (`otel.kind`, `http.route`, `messaging.message.id`) are
//! OpenTelemetry attributes: they go to the trace, not into log lines, which keep the short names.
//!
//! Traces are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: the OpenTelemetry SDK then
//! reads the standard variables itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and `_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`), spans go through a
//! batch processor on its own thread, and [`TelemetryGuard`] flushes it when dropped at exit. With
//! no endpoint, no OpenTelemetry layer is installed at all (see [`crate::trace_context`] for how
//! incoming context is still forwarded).
//!
//! The correlation ID is read from the task-local set by [`crate::correlation`] at the moment the
//! event is logged, so every line written while handling a request or a message carries it.
//! Each key appears once per line, even when nested spans repeat a field (`service`, `queue`): the
//! event's own field wins, then the innermost span's, since duplicate keys are read differently
//! by different JSON parsers (first wins, last wins, or an error).
//! `tracing-subscriber`'s own JSON format nests span fields and names the message `message`;
//! grepping and shipping logs is simpler with one flat object in the shape above, hence this layer.

pub mod log_writer;

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::{ConfigError, Env};
use crate::correlation;
use crate::trace_context::{self, ExportingMarker};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default: what log shippers and `grep` want).
    Json,
    /// Human-readable multi-field text for a terminal.
    Pretty,
}

/// Logging settings, read from `LOG_FORMAT` (`json` or `pretty`) and `RUST_LOG`.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// Line format.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,order_service=debug`.
    pub filter: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): traces are exported
    /// only when one is set.
    pub otlp_endpoint: Option<String>,
}

impl TelemetrySettings {
    /// Reads `LOG_FORMAT` (default `json`) and `RUST_LOG` (default `info`: one line per request
    /// and per message, which is what the correlation-ID walkthrough needs).
    ///
    /// # Errors
    /// Returns [`ConfigError`] for an unknown `LOG_FORMAT`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let format = match env.string_or("LOG_FORMAT", "json").as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(ConfigError {
                    key: "LOG_FORMAT".to_owned(),
                    value: other.to_owned(),
                    reason: "expected json or pretty".to_owned(),
                });
            }
        };
        let endpoint = |key| {
            env.get(key)
                .filter(|v| !v.trim().is_empty())
                .map(str::to_owned)
        };
        Ok(Self {
            format,
            filter: env.string_or("RUST_LOG", "info"),
            otlp_endpoint: endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| endpoint("OTEL_EXPORTER_OTLP_ENDPOINT")),
        })
    }
}

/// Builds a subscriber for `service` that writes to `writer` (and exports no traces).
pub fn get_subscriber<W>(
    service: &'static str,
    settings: &TelemetrySettings,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    get_tracing_subscriber(service, settings, writer, None)
}

/// Builds a subscriber for `service` that writes to `writer` and, given a `tracer`, records
/// spans as OpenTelemetry spans through it.
pub fn get_tracing_subscriber<W>(
    service: &'static str,
    settings: &TelemetrySettings,
    writer: W,
    tracer: Option<SdkTracer>,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let exporting = tracer.is_some().then_some(ExportingMarker);
    if exporting.is_some() {
        trace_context::exporter_built();
    }
    // Source locations and thread names would double the attributes of every span; the span's
    // name, kind and conventional attributes are what a trace view needs.
    let traces = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
    });
    let base = Registry::default()
        .with(filter)
        .with(traces)
        .with(exporting);
    match settings.format {
        LogFormat::Json => Box::new(base.with(JsonLayer::new(service, writer))),
        LogFormat::Pretty => Box::new(
            base.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    .compact(),
            ),
        ),
    }
}

/// The OTLP/HTTP (protobuf) trace pipeline for `service`, when `settings` name an endpoint.
///
/// # Errors
/// When the exporter cannot be built (an invalid endpoint URL or `OTEL_EXPORTER_OTLP_*` value).
pub fn tracer_provider(
    service: &'static str,
    settings: &TelemetrySettings,
    env: &Env,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    if settings.otlp_endpoint.is_none() {
        return Ok(None);
    }
    // The exporter reads the endpoint (appending `/v1/traces`), headers, timeout and compression
    // from the standard `OTEL_EXPORTER_OTLP_*` variables itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // The resource reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`; the service's own
    // name is the default when neither names it.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env.get("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Installs `subscriber` as the process-wide default.
///
/// # Errors
/// Fails if a global subscriber is already installed.
pub fn init_subscriber(
    subscriber: Box<dyn Subscriber + Send + Sync>,
) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    tracing::subscriber::set_global_default(subscriber)
}

/// Keeps logging and trace export running; dropping it (at the end of `main`, after the graceful
/// shutdown) exports the spans still queued, then flushes the buffered log lines.
#[must_use = "dropping the guard stops trace export and log flushing"]
pub struct TelemetryGuard {
    traces: Option<SdkTracerProvider>,
    _logs: log_writer::LogWriterGuard,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.traces.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take() {
            // Shutdown flushes the batch processor: every span finished before SIGTERM goes out.
            // It is bounded by `OTEL_BSP_EXPORT_TIMEOUT` (30 s by default), so a dead collector
            // delays exit instead of hanging it.
            if let Err(error) = provider.shutdown() {
                tracing::warn!(error = %error, "could not export the last spans");
            }
        }
    }
}

/// Logs to stdout through the [`log_writer`] (lines gather in memory; one thread writes them out
/// every few milliseconds), so a slow terminal or pipe never blocks a request, and exports traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Keep the returned guard
/// alive until exit: dropping it exports queued spans and flushes buffered lines.
///
/// # Errors
/// Fails on an invalid `LOG_FORMAT`, an exporter that cannot be built, or if a global subscriber
/// is already installed.
pub fn init_stdout(service: &'static str, env: &Env) -> Result<TelemetryGuard, TelemetryError> {
    let settings = TelemetrySettings::from_env(env)?;
    let traces = tracer_provider(service, &settings, env)?;
    // Lines gather in memory and one thread writes them out every few milliseconds; under a log
    // flood past the buffer's limit, lines are dropped (and counted) rather than requests stalled.
    let (writer, guard) =
        log_writer::spawn(std::io::stdout()).map_err(TelemetryError::LogWriter)?;
    let tracer = traces.as_ref().map(|provider| provider.tracer(service));
    init_subscriber(get_tracing_subscriber(service, &settings, writer, tracer))?;
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP/HTTP");
    }
    Ok(TelemetryGuard {
        traces,
        _logs: guard,
    })
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `LOG_FORMAT` or `RUST_LOG` is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A global subscriber was already installed.
    #[error(transparent)]
    AlreadyInstalled(#[from] tracing::subscriber::SetGlobalDefaultError),
    /// The log writer's thread could not be started.
    #[error("cannot start the log writer: {0}")]
    LogWriter(std::io::Error),
    /// The OTLP exporter could not be built from the `OTEL_EXPORTER_OTLP_*` settings.
    #[error("cannot export traces: {0}")]
    Exporter(String),
}

/// The flat JSON-lines layer described in the module documentation.
#[derive(Debug)]
pub struct JsonLayer<W> {
    service: &'static str,
    writer: W,
}

impl<W> JsonLayer<W> {
    /// A layer that tags lines without a `service` span field with `service`.
    pub fn new(service: &'static str, writer: W) -> Self {
        Self { service, writer }
    }
}

/// Span fields, pre-rendered as JSON members (`,"key":value`) when the span is created.
struct SpanFields(Members);

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = JsonVisitor::default();
        attrs.record(&mut visitor);
        span.extensions_mut().insert(SpanFields(visitor.members));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(members)) = extensions.get_mut::<SpanFields>() {
            let mut visitor = JsonVisitor::default();
            values.record(&mut visitor);
            // A field recorded again replaces its earlier value.
            for (key, _) in &visitor.members.keys {
                members.remove(key);
            }
            members.append(&visitor.members);
        }
    }

    // One line per request at `info` is the hot path of every service, so the line is written
    // straight into one buffer: no intermediate `serde_json::Value`s or strings per field.
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor::default();
        event.record(&mut visitor);

        let mut line = Vec::with_capacity(256);
        line.extend_from_slice(b"{\"timestamp\":\"");
        if OffsetDateTime::now_utc()
            .format_into(&mut line, &Rfc3339)
            .is_err()
        {
            line.push(b'?');
        }
        line.extend_from_slice(b"\",\"level\":\"");
        line.extend_from_slice(level_name(event.metadata().level()).as_bytes());
        line.push(b'"');

        // Span fields, innermost span first. The service name may come from the event or a
        // span (several services in one test process) and falls back to this process's own.
        let spans: Vec<_> = ctx.event_scope(event).into_iter().flatten().collect();
        let extensions: Vec<_> = spans.iter().map(|span| span.extensions()).collect();
        let span_members = extensions
            .iter()
            .filter_map(|extensions| extensions.get::<SpanFields>())
            .map(|SpanFields(members)| members);
        let sources: Vec<&Members> = std::iter::once(&visitor.members)
            .chain(span_members)
            .collect();
        // Keys this layer writes itself are reserved: a field of the same name is left out.
        let mut written: Vec<&str> = vec![
            "timestamp",
            "level",
            "correlationId",
            "traceId",
            "spanId",
            "msg",
            "target",
        ];
        match sources.iter().find_map(|members| members.get("service")) {
            Some(member) => line.extend_from_slice(member),
            None => {
                push_key(&mut line, "service");
                push_str(&mut line, self.service);
            }
        }
        written.push("service");
        if let Some(id) = correlation::current() {
            push_key(&mut line, "correlationId");
            push_str(&mut line, id.as_str());
        }
        if let Some((trace_id, span_id)) = trace_context::ids_for_log(extensions.iter()) {
            push_key(&mut line, "traceId");
            push_str(&mut line, &trace_id);
            push_key(&mut line, "spanId");
            push_str(&mut line, &span_id);
        }
        push_key(&mut line, "msg");
        match &visitor.message {
            Some(message) => line.extend_from_slice(message),
            None => line.extend_from_slice(b"\"\""),
        }
        push_key(&mut line, "target");
        push_str(&mut line, event.metadata().target());
        for members in sources {
            for (key, member) in members.iter() {
                if !written.contains(&key) {
                    written.push(key);
                    line.extend_from_slice(member);
                }
            }
        }
        line.extend_from_slice(b"}\n");
        // Release the spans' extensions before the write, so a span recording a field on another
        // thread never waits for the log writer.
        drop(extensions);
        drop(spans);

        let _ = self.writer.make_writer().write_all(&line);
    }
}

fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// Appends `,"key":`.
fn push_key(out: &mut Vec<u8>, key: &str) {
    out.push(b',');
    push_str(out, key);
    out.push(b':');
}

/// Appends `value` as a JSON string, quoted and escaped.
fn push_str(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let _ = JsonEscaped(out).write_str(value);
    out.push(b'"');
}

/// Appends `value`'s JSON form (numbers, booleans; non-finite floats become `null`).
fn push_json(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// A `fmt::Write` that appends what is written as the inside of a JSON string, so `Debug` and
/// `Display` output is escaped on the fly without an intermediate `String`.
struct JsonEscaped<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let out = &mut *self.0;
        let mut plain = 0;
        for (i, byte) in s.bytes().enumerate() {
            let escape: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x00..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(&s.as_bytes()[plain..i]);
            if escape.is_empty() {
                let _ = write!(out, "\\u{byte:04x}");
            } else {
                out.extend_from_slice(escape);
            }
            plain = i + 1;
        }
        out.extend_from_slice(&s.as_bytes()[plain..]);
        Ok(())
    }
}

/// Rendered JSON members (`,"key":value` each) in one buffer, with where each one starts.
#[derive(Default)]
struct Members {
    bytes: Vec<u8>,
    keys: Vec<(&'static str, usize)>,
}

impl Members {
    /// Starts the member `key`; its value is appended to the returned buffer.
    fn start(&mut self, key: &'static str) -> &mut Vec<u8> {
        self.keys.push((key, self.bytes.len()));
        push_key(&mut self.bytes, key);
        &mut self.bytes
    }

    /// Each key with its rendered member, in the order they were added.
    fn iter(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.keys.iter().enumerate().map(|(i, &(key, start))| {
            let end = self
                .keys
                .get(i + 1)
                .map_or(self.bytes.len(), |&(_, next)| next);
            (key, &self.bytes[start..end])
        })
    }

    /// The rendered member `key`, if present.
    fn get(&self, key: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, member)| member)
    }

    /// Drops the member `key`, if present.
    fn remove(&mut self, key: &str) {
        if self.get(key).is_some() {
            let kept = std::mem::take(self);
            for (k, member) in kept.iter().filter(|(k, _)| *k != key) {
                self.keys.push((k, self.bytes.len()));
                self.bytes.extend_from_slice(member);
            }
        }
    }

    /// Appends every member of `other`.
    fn append(&mut self, other: &Self) {
        for (key, member) in other.iter() {
            self.keys.push((key, self.bytes.len()));
            self.bytes.extend_from_slice(member);
        }
    }
}

/// Renders fields as JSON members, keeping the `message` field apart (already a JSON string).
#[derive(Default)]
struct JsonVisitor {
    members: Members,
    message: Option<Vec<u8>>,
}

impl JsonVisitor {
    /// Where the value of `field` goes: the message buffer, a new member of `members`, or nowhere
    /// for an OpenTelemetry attribute (a dotted name, which belongs to the trace).
    fn slot(&mut self, field: &Field) -> Option<&mut Vec<u8>> {
        let name = field.name();
        if name == "message" {
            Some(self.message.insert(Vec::new()))
        } else if name.contains('.') {
            None
        } else {
            Some(self.members.start(name))
        }
    }
}

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if let Some(out) = self.slot(field) {
            out.push(b'"');
            let _ = write!(JsonEscaped(out), "{value:?}");
            out.push(b'"');
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(out) = self.slot(field) {
            push_str(out, value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Some(out) = self.slot(field) {
            push_json(out, &value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(out) = self.slot(field) {
            push_json(out, &value);
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if let Some(out) = self.slot(field) {
            push_json(out, &value);
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if let Some(out) = self.slot(field) {
            push_json(out, &value);
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if let Some(out) = self.slot(field) {
            out.push(b'"');
            let _ = write!(JsonEscaped(out), "{value}");
            out.push(b'"');
        }
    }
}

/// A [`MakeWriter`] that appends to a shared buffer, for tests that inspect log lines.
#[derive(Debug, Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Every line captured so far, parsed as JSON (lines that do not parse are skipped).
    pub fn lines(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CapturedLogs {
    type Writer = Self;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON-lines subscriber for `service` at `info`, and the lines it writes.
    fn json_lines(service: &'static str) -> (CapturedLogs, Box<dyn Subscriber + Send + Sync>) {
        let logs = CapturedLogs::default();
        let settings = TelemetrySettings {
            format: LogFormat::Json,
            filter: "info".to_owned(),
            otlp_endpoint: None,
        };
        let subscriber = get_subscriber(service, &settings, logs.clone());
        (logs, subscriber)
    }

    #[test]
    fn a_line_is_flat_json_with_service_correlation_id_and_msg() {
        let (logs, subscriber) = json_lines("order");
        let id = correlation::CorrelationId::parse("abc-123").expect("valid");
        tracing::subscriber::with_default(subscriber, || {
            correlation::sync_scope(id, || {
                let span = tracing::info_span!("http", method = "POST", path = "/orders");
                let _entered = span.enter();
                tracing::info!(status = 201_u16, "POST /orders");
            });
            tracing::info!("outside any request");
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["level"], "info");
        assert_eq!(lines[0]["service"], "order");
        assert_eq!(lines[0]["correlationId"], "abc-123");
        assert_eq!(lines[0]["msg"], "POST /orders");
        assert_eq!(lines[0]["status"], 201);
        assert_eq!(lines[0]["path"], "/orders");
        assert!(lines[1].get("correlationId").is_none());
    }

    #[test]
    fn strings_numbers_and_debug_values_are_escaped_into_valid_json() {
        let (logs, subscriber) = json_lines("order");
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} ünï";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("http", path = awkward);
            let _entered = span.enter();
            tracing::info!(
                text = awkward,
                debug = ?awkward,
                negative = -3_i64,
                ratio = 0.5_f64,
                nan = f64::NAN,
                flag = true,
                "msg with {}",
                awkward
            );
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), 1, "the line must parse as JSON");
        let line = &lines[0];
        assert_eq!(line["msg"], format!("msg with {awkward}"));
        assert_eq!(line["text"], awkward);
        assert_eq!(line["debug"], format!("{awkward:?}"));
        assert_eq!(line["path"], awkward);
        assert_eq!(line["negative"], -3);
        assert_eq!(line["ratio"], 0.5);
        assert!(line["nan"].is_null());
        assert_eq!(line["flag"], true);
    }

    #[test]
    fn a_field_repeated_by_the_event_and_nested_spans_is_written_once_innermost_first() {
        let (logs, subscriber) = json_lines("test");
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("consumer", service = "pricing", queue = "outer");
            let _outer = outer.enter();
            let inner = tracing::info_span!(
                "message",
                service = "inventory",
                queue = "inner",
                message_id = "span-id",
                attempt = tracing::field::Empty,
            );
            let _inner = inner.enter();
            inner.record("attempt", 1_u32);
            inner.record("attempt", 2_u32);
            tracing::info!(message_id = "event-id", msg = "shadowed", "handled message");
        });
        let raw = String::from_utf8(logs.0.lock().expect("logs").clone()).expect("utf-8");
        for key in ["service", "queue", "message_id", "attempt", "msg"] {
            assert_eq!(
                raw.matches(&format!("\"{key}\":")).count(),
                1,
                "{key} once in {raw}"
            );
        }
        let line = &logs.lines()[0];
        assert_eq!(line["service"], "inventory");
        assert_eq!(line["queue"], "inner");
        assert_eq!(line["message_id"], "event-id");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["msg"], "handled message");
    }

    #[test]
    fn a_service_span_field_overrides_the_process_service_name() {
        let (logs, subscriber) = json_lines("test");
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("worker", service = "inventory");
            let _entered = span.enter();
            tracing::warn!(sku = "BK-12", "low stock");
        });
        let lines = logs.lines();
        assert_eq!(lines[0]["service"], "inventory");
        assert_eq!(lines[0]["level"], "warn");
        assert_eq!(lines[0].as_object().map(|o| o.len()), Some(6));
    }
}
