//! W3C trace context (`traceparent`, `tracestate`): continued on the way in, injected on the way
//! out, in one place each.
//!
//! ```text
//!  inbound HTTP ──extract──► server span ─► client attempt span ──inject──► outbound HTTP
//!  (chassis)                    │            (one per attempt)               (client)
//!                               └─► outbox row (traceparent, tracestate columns)
//!                                      └─► producer span ──inject──► AMQP headers
//!                                                                        └─extract─► consumer span
//! ```
//!
//! Two modes, chosen once at start-up by [`crate::telemetry`]:
//!
//! - **Exporting** (`OTEL_EXPORTER_OTLP_ENDPOINT` set): spans are OpenTelemetry spans through
//!   `tracing-opentelemetry`; what goes out on the wire is the context of this process's own span
//!   (the client attempt, the producer), so the callee's span becomes its child.
//! - **Not exporting**: no span of ours is recorded, and the incoming context is forwarded
//!   unchanged, as a W3C intermediary that does not participate would: a caller that traces still
//!   sees its callee's spans join its trace. The forwarded context is kept in the request span's
//!   extensions (so it follows the span into spawned tasks) and costs nothing when absent.
//!
//! Incoming context is untrusted input. A `traceparent` that is not exactly the W3C form (version
//! `00`: 55 characters, lowercase hex, non-zero IDs) or is longer than [`MAX_TRACEPARENT_LEN`] is
//! ignored and a new trace starts; a `tracestate` longer than [`MAX_TRACESTATE_LEN`] is dropped.
//! The context only ever decides which trace a span joins (and, through the parent-based sampler,
//! whether it is sampled); nothing else reads it.
//!
//! Messaging spans follow OpenTelemetry's messaging conventions: a PRODUCER span
//! `publish {routing key}` per message sent and a CONSUMER span `process {routing key}` per
//! delivery, whose parent is the producer's span. A consumer that handles a batch of deliveries in
//! one span cannot have every producer as its parent: it starts its own span and adds one link per
//! message ([`link_messages`]); see `docs/decisions/0201-consumer-spans-parent-or-link.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, Method};
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Registry;
use tracing_subscriber::registry::LookupSpan;

/// The W3C header (and AMQP header, and outbox column) carrying trace ID, parent ID and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";
/// Longest accepted `traceparent`. Version `00` is exactly 55 characters; later versions may
/// append fields, and 128 leaves room for that while keeping a hostile header from being copied
/// into every span and every hop.
pub const MAX_TRACEPARENT_LEN: usize = 128;
/// Longest accepted `tracestate`: the 512 characters W3C asks every vendor to propagate. A longer
/// one is dropped whole (the trace is still continued), since cutting it could split a member.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// Whether `value` is a `traceparent` this service continues: `00-<32 hex>-<16 hex>-<2 hex>`
/// in lowercase with non-zero IDs, or a later version (`01`–`fe`) that starts with that form and
/// continues with `-`. Anything else (uppercase, wrong lengths, version `ff`, all-zero IDs,
/// longer than [`MAX_TRACEPARENT_LEN`]) is refused.
pub fn is_valid_traceparent(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() < 55 || bytes.len() > MAX_TRACEPARENT_LEN {
        return false;
    }
    let hex = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let not_zero = |range: std::ops::Range<usize>| bytes[range].iter().any(|b| *b != b'0');
    let shape = hex(0..2)
        && bytes[2] == b'-'
        && hex(3..35)
        && bytes[35] == b'-'
        && hex(36..52)
        && bytes[52] == b'-'
        && hex(53..55);
    let version_ok = match &bytes[0..2] {
        b"00" => bytes.len() == 55,
        b"ff" => false,
        _ => bytes.len() == 55 || bytes[55] == b'-',
    };
    shape && version_ok && not_zero(3..35) && not_zero(36..52)
}

/// The remote span context in `carrier`, if its `traceparent` is valid (see the module
/// documentation for what is refused).
pub fn extract(carrier: &dyn Extractor) -> Option<SpanContext> {
    let traceparent = carrier.get(TRACEPARENT)?.trim();
    if !is_valid_traceparent(traceparent) {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&Bounded(carrier));
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Writes `span_context` into `carrier` as `traceparent` (and `tracestate` when it has one).
pub fn inject(span_context: &SpanContext, carrier: &mut dyn Injector) {
    if !span_context.is_valid() {
        return;
    }
    let context = opentelemetry::Context::new().with_remote_span_context(span_context.clone());
    TraceContextPropagator::new().inject_context(&context, &mut SkipEmpty(carrier));
}

/// The remote span context in HTTP `headers`, if valid.
pub fn from_http(headers: &HeaderMap) -> Option<SpanContext> {
    extract(&HeaderExtractor(headers))
}

/// Writes `span_context` into HTTP `headers`.
pub fn to_http(span_context: &SpanContext, headers: &mut HeaderMap) {
    inject(span_context, &mut HeaderInjector(headers));
}

/// The remote span context in AMQP message `headers`, if valid.
pub fn from_amqp(headers: Option<&FieldTable>) -> Option<SpanContext> {
    extract(&AmqpHeaders(headers?))
}

/// Writes `span_context` into AMQP message `headers`.
pub fn to_amqp(span_context: &SpanContext, headers: &mut FieldTable) {
    inject(span_context, &mut AmqpHeadersMut(headers));
}

/// `span_context` as the `(traceparent, tracestate)` text stored with an outbox row.
pub fn to_text(span_context: &SpanContext) -> (Option<String>, Option<String>) {
    let mut fields = HashMap::new();
    inject(span_context, &mut fields);
    (fields.remove(TRACEPARENT), fields.remove(TRACESTATE))
}

/// The span context stored as `(traceparent, tracestate)` text, if valid.
pub fn from_text(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut fields = HashMap::new();
    fields.insert(TRACEPARENT.to_owned(), traceparent?.to_owned());
    if let Some(state) = tracestate {
        fields.insert(TRACESTATE.to_owned(), state.to_owned());
    }
    extract(&fields)
}

/// Reads trace context from AMQP headers (long or short strings).
#[derive(Debug)]
pub struct AmqpHeaders<'a>(pub &'a FieldTable);

impl Extractor for AmqpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|key| key.as_str()).collect()
    }
}

/// Writes trace context into AMQP headers as long strings.
#[derive(Debug)]
pub struct AmqpHeadersMut<'a>(pub &'a mut FieldTable);

impl Injector for AmqpHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(
            key.into(),
            AMQPValue::LongString(LongString::from(value.into_bytes())),
        );
    }
}

/// Hides a `tracestate` longer than [`MAX_TRACESTATE_LEN`] from the propagator.
struct Bounded<'a>(&'a dyn Extractor);

impl Extractor for Bounded<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .filter(|value| key != TRACESTATE || value.len() <= MAX_TRACESTATE_LEN)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys()
    }
}

/// Drops the empty `tracestate` the propagator writes for a context without one.
struct SkipEmpty<'a>(&'a mut dyn Injector);

impl Injector for SkipEmpty<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.set(key, value);
        }
    }
}

/// Marks a subscriber that exports traces (installed by [`crate::telemetry`] with the
/// OpenTelemetry layer), so spans that exist only for the trace are not built otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportingMarker;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ExportingMarker {}

/// Set once a subscriber that exports has been built ([`crate::telemetry`] calls
/// [`exporter_built`]): until then, in every process that exports nothing, the checks below are
/// one atomic load each instead of a look-up in the current subscriber (measured: the look-ups
/// and context walks cost the gateway's pass-through about 4 % more instructions per request).
static EXPORTER_BUILT: AtomicBool = AtomicBool::new(false);
/// Set once a remote context has been kept for forwarding: until then no span is searched for one.
static FORWARDING: AtomicBool = AtomicBool::new(false);

/// Records that a subscriber exporting traces exists in this process.
pub(crate) fn exporter_built() {
    EXPORTER_BUILT.store(true, Ordering::Relaxed);
}

/// Whether the current subscriber exports traces.
pub fn exporting() -> bool {
    EXPORTER_BUILT.load(Ordering::Relaxed)
        && tracing::dispatcher::get_default(|dispatch| {
            dispatch.downcast_ref::<ExportingMarker>().is_some()
        })
}

/// The forwarded remote context, kept in a span's extensions when nothing exports.
#[derive(Debug, Clone)]
struct Forwarded(SpanContext);

/// Makes `span` continue the trace of `parent` (a remote context from [`from_http`] or
/// [`from_amqp`]). Without one, the span starts a new trace when exporting, even inside a
/// long-lived span (a consumer's, the broker supervisor's), so each request or delivery is a
/// trace of its own.
pub fn continue_from(span: &Span, parent: Option<SpanContext>) {
    let Some(parent) = parent else {
        if EXPORTER_BUILT.load(Ordering::Relaxed) {
            let _ = span.set_parent(opentelemetry::Context::new());
        }
        return;
    };
    let remote = opentelemetry::Context::new().with_remote_span_context(parent.clone());
    if !EXPORTER_BUILT.load(Ordering::Relaxed) || span.set_parent(remote).is_err() {
        // No OpenTelemetry layer: remember the context so it can be forwarded unchanged.
        FORWARDING.store(true, Ordering::Relaxed);
        span.with_subscriber(|(id, dispatch)| {
            if let Some(span) = dispatch
                .downcast_ref::<Registry>()
                .and_then(|registry| registry.span(id))
            {
                span.extensions_mut().insert(Forwarded(parent));
            }
        });
    }
}

/// The context to send from inside `span`: its own OpenTelemetry span context when exporting,
/// otherwise the remote context forwarded by it or its nearest ancestor.
pub fn context_of(span: &Span) -> Option<SpanContext> {
    if EXPORTER_BUILT.load(Ordering::Relaxed) {
        let own = span.context().span().span_context().clone();
        if own.is_valid() {
            return Some(own);
        }
    }
    if !FORWARDING.load(Ordering::Relaxed) {
        return None;
    }
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        registry.span(id)?.scope().find_map(|span| {
            span.extensions()
                .get::<Forwarded>()
                .map(|Forwarded(context)| context.clone())
        })
    })
    .flatten()
}

/// The context to send from the current span (see [`context_of`]).
pub fn current() -> Option<SpanContext> {
    if !EXPORTER_BUILT.load(Ordering::Relaxed) && !FORWARDING.load(Ordering::Relaxed) {
        return None;
    }
    context_of(&Span::current())
}

/// The trace and span ID (hex) that a log line written now belongs to: the active
/// OpenTelemetry span when exporting, or the forwarded context found in `spans` (innermost first).
pub(crate) fn ids_for_log<'a, 'b: 'a>(
    mut forwarded_in: impl Iterator<Item = &'a tracing_subscriber::registry::Extensions<'b>>,
) -> Option<(String, String)> {
    if EXPORTER_BUILT.load(Ordering::Relaxed) {
        let active = opentelemetry::Context::current();
        let span = active.span();
        let context = span.span_context();
        if context.is_valid() {
            return Some((
                context.trace_id().to_string(),
                context.span_id().to_string(),
            ));
        }
    }
    if !FORWARDING.load(Ordering::Relaxed) {
        return None;
    }
    forwarded_in
        .find_map(|extensions| extensions.get::<Forwarded>())
        .map(|Forwarded(context)| {
            (
                context.trace_id().to_string(),
                context.span_id().to_string(),
            )
        })
}

/// Makes the chassis's request `span` the SERVER span `{method} {route}` continuing the caller's
/// trace from `headers` (an invalid or absent `traceparent` starts a new trace).
pub fn server_span(span: &Span, method: &Method, route: &str, headers: &HeaderMap) {
    if !span.is_disabled() && exporting() {
        span.record("otel.name", format!("{method} {route}"));
    }
    continue_from(span, from_http(headers));
}

/// Records the response `status` on the current (SERVER) span; a `5xx` marks it failed.
pub fn record_response(status: u16) {
    if !exporting() {
        return;
    }
    let span = Span::current();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The CLIENT span of one attempt of an outbound call to `dependency` (`resend` counts the
/// attempts before it), or a disabled span when nothing exports. Enter it around the attempt,
/// call [`inject_attempt`] on the attempt's headers and [`record_attempt`] with its outcome.
pub fn client_attempt(dependency: &'static str, method: &Method, path: &str, resend: u32) -> Span {
    if !exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "http.client",
        otel.name = method.as_str(),
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = method.as_str(),
        http.request.resend_count = Empty,
        http.response.status_code = Empty,
        url.full = Empty,
        url.path = path,
        server.address = Empty,
        server.port = Empty,
        peer.service = dependency,
        error.type = Empty,
    );
    if resend > 0 {
        span.record("http.request.resend_count", resend);
    }
    span
}

/// Names the attempt's target on the current attempt span and writes the context to send into
/// `headers`: the attempt span's own when exporting, otherwise the forwarded one.
pub fn inject_attempt(url: &url::Url, headers: &mut HeaderMap) {
    if exporting() {
        let span = Span::current();
        span.record("url.full", url.as_str());
        if let Some(host) = url.host_str() {
            span.record("server.address", host);
        }
        if let Some(port) = url.port_or_known_default() {
            span.record("server.port", port);
        }
    }
    if let Some(context) = current() {
        to_http(&context, headers);
    }
}

/// Records an attempt's outcome on its span: the response status, or the error's kind.
pub fn record_attempt(
    span: &Span,
    result: &Result<crate::client::ClientResponse, crate::client::ClientError>,
) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(response) => {
            span.record("http.response.status_code", response.status.as_u16());
        }
        Err(crate::client::ClientError::Status { status, .. }) => {
            span.record("http.response.status_code", status.as_u16());
            if status.is_server_error() || *status == http::StatusCode::TOO_MANY_REQUESTS {
                span.record("error.type", status.as_str());
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(error) => {
            use crate::client::ClientError;
            let kind = match error {
                ClientError::Timeout { .. } => "timeout",
                ClientError::Connect { .. } => "connect",
                ClientError::Transport { .. } => "transport",
                _ => "error",
            };
            span.record("error.type", kind);
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// The PRODUCER span `publish {routing key}` of `message` on `exchange`, child of the context
/// the message was created in (the request that stored its outbox row) or else of the current
/// span, or a disabled span when nothing exports.
pub fn producer(exchange: &str, message: &crate::messaging::OutgoingMessage) -> Span {
    if !exporting() {
        return Span::none();
    }
    let routing_key = message.event_type.as_str();
    let span = tracing::info_span!(
        "messaging.publish",
        otel.name = format!("publish {routing_key}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = message.correlation_id.as_deref(),
        error.type = Empty,
    );
    continue_from(&span, message.trace.clone());
    span
}

/// Makes the consumer's delivery `span` the CONSUMER span `process {routing_key}`, child of the
/// producer's context `parent` from the message headers (forwarded unchanged when nothing
/// exports). One delivery, one parent; a batch uses links instead ([`link_messages`]).
pub fn consumer_span(span: &Span, routing_key: &str, parent: Option<SpanContext>) {
    if !span.is_disabled() && exporting() {
        span.record("otel.name", format!("process {routing_key}"));
    }
    continue_from(span, parent);
}

/// Makes a batch's `span` the CONSUMER span `process {queue}`: a trace of its own (a batch has
/// as many producers as messages, and a span has one parent), linked to every message's producer
/// context in `contexts`.
pub fn consumer_batch_span<'a>(
    span: &Span,
    queue: &str,
    contexts: impl IntoIterator<Item = &'a SpanContext>,
) {
    if span.is_disabled() || !exporting() {
        return;
    }
    span.record("otel.name", format!("process {queue}"));
    continue_from(span, None);
    link_messages(span, contexts);
}

/// Marks a messaging span failed with `error_type` (`nacked`, `unroutable`, `dead_lettered`, ...).
pub fn record_failure(span: &Span, error_type: &'static str) {
    span.record("error.type", error_type);
    span.record("otel.status_code", "ERROR");
}

/// Links `span` to the producer context of every message in a batch: the span model for a
/// consumer that applies several deliveries at once, which cannot be a child of all of them.
pub fn link_messages<'a>(span: &Span, contexts: impl IntoIterator<Item = &'a SpanContext>) {
    for context in contexts {
        span.add_link(context.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().expect("header value"));
        }
        headers
    }

    #[test]
    fn a_valid_traceparent_and_tracestate_are_read_from_http_headers() {
        let context = from_http(&headers(&[
            (TRACEPARENT, VALID),
            (TRACESTATE, "vendor=abc"),
        ]))
        .expect("valid");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert!(context.is_remote());
        assert_eq!(context.trace_state().header(), "vendor=abc");
    }

    #[test]
    fn http_headers_round_trip_through_inject_and_extract() {
        let context =
            from_http(&headers(&[(TRACEPARENT, VALID), (TRACESTATE, "a=1,b=2")])).expect("valid");
        let mut out = HeaderMap::new();
        to_http(&context, &mut out);
        assert_eq!(out[TRACEPARENT], VALID);
        assert_eq!(out[TRACESTATE], "a=1,b=2");
    }

    #[test]
    fn a_context_without_tracestate_injects_no_empty_tracestate_header() {
        let context = from_http(&headers(&[(TRACEPARENT, VALID)])).expect("valid");
        let mut out = HeaderMap::new();
        to_http(&context, &mut out);
        assert!(out.get(TRACESTATE).is_none());
    }

    #[test]
    fn amqp_headers_round_trip_and_short_strings_are_read_too() {
        let context =
            from_http(&headers(&[(TRACEPARENT, VALID), (TRACESTATE, "k=v")])).expect("valid");
        let mut table = FieldTable::default();
        table.insert("x-correlation-id".into(), AMQPValue::LongLongInt(7));
        to_amqp(&context, &mut table);
        assert!(matches!(
            table.inner().get(TRACEPARENT),
            Some(AMQPValue::LongString(_))
        ));
        let back = from_amqp(Some(&table)).expect("round trip");
        assert_eq!(back.trace_id(), context.trace_id());
        assert_eq!(back.span_id(), context.span_id());
        assert_eq!(back.trace_state().header(), "k=v");

        let mut short = FieldTable::default();
        short.insert(TRACEPARENT.into(), AMQPValue::ShortString(VALID.into()));
        assert!(from_amqp(Some(&short)).is_some());
        assert!(from_amqp(None).is_none());
    }

    #[test]
    fn an_amqp_header_of_another_type_is_no_context() {
        let mut table = FieldTable::default();
        table.insert(TRACEPARENT.into(), AMQPValue::LongLongInt(1));
        assert!(from_amqp(Some(&table)).is_none());
    }

    #[test]
    fn outbox_text_round_trips_and_bad_text_is_no_context() {
        let context =
            from_http(&headers(&[(TRACEPARENT, VALID), (TRACESTATE, "k=v")])).expect("valid");
        let (parent, state) = to_text(&context);
        assert_eq!(parent.as_deref(), Some(VALID));
        let back = from_text(parent.as_deref(), state.as_deref()).expect("round trip");
        assert_eq!(back.span_id(), context.span_id());
        assert!(from_text(None, Some("k=v")).is_none());
        assert!(from_text(Some("garbage"), None).is_none());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-1-1-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?} must be refused");
            assert!(
                from_http(&headers(&[(TRACEPARENT, bad)])).is_none(),
                "{bad:?} must give no context"
            );
        }
    }

    #[test]
    fn an_oversized_traceparent_is_ignored_and_an_oversized_tracestate_dropped() {
        let long = format!("01{}-{}", &VALID[2..], "a".repeat(MAX_TRACEPARENT_LEN));
        assert!(from_http(&headers(&[(TRACEPARENT, &long)])).is_none());
        let future = format!("01{}-more", &VALID[2..]);
        assert!(from_http(&headers(&[(TRACEPARENT, &future)])).is_some());

        let state = format!("k={}", "v".repeat(MAX_TRACESTATE_LEN));
        let context =
            from_http(&headers(&[(TRACEPARENT, VALID), (TRACESTATE, &state)])).expect("continued");
        assert_eq!(context.trace_state().header(), "");
    }

    #[test]
    fn without_an_exporting_subscriber_an_attempt_span_is_disabled() {
        assert!(client_attempt("pricing", &Method::GET, "/prices/BK-12", 0).is_disabled());
    }

    /// The chassis in front of a handler that calls `upstream` once through the resilient client
    /// (which retries a `503` once, after a millisecond).
    fn service_calling(upstream: &wiremock::MockServer) -> axum::Router {
        use crate::client::{ClientConfig, ClientRequest, ResilientClient};
        let base = url::Url::parse(&upstream.uri()).expect("wiremock url");
        let mut config = ClientConfig::new("pricing", vec![base]);
        config.retry.base_delay = std::time::Duration::from_millis(1);
        config.retry.max_delay = std::time::Duration::from_millis(1);
        config.retry.budget_min_per_sec = 1000;
        let client = ResilientClient::new(config).expect("client");
        let router = axum::Router::new().route(
            "/orders",
            axum::routing::get(move || {
                let client = client.clone();
                async move {
                    let answer = client.send(ClientRequest::get("/prices/BK-12")).await;
                    tracing::info!(ok = answer.is_ok(), "priced");
                    http::StatusCode::OK
                }
            }),
        );
        let metrics = crate::metrics::Metrics::new("order");
        crate::server::Chassis {
            service: "order",
            request_budget: std::time::Duration::from_secs(5),
            body_limit: crate::server::DEFAULT_BODY_LIMIT,
            admission: crate::admission::Admission::new(
                crate::admission::LimitSettings::default(),
                crate::admission::Refusal::TooManyRequests,
                &metrics,
            ),
            metrics,
        }
        .wrap(router)
    }

    /// An upstream that answers `503` once, then `200`.
    async fn flaky_upstream() -> wiremock::MockServer {
        use wiremock::{Mock, ResponseTemplate, matchers::any};
        let upstream = wiremock::MockServer::start().await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&upstream)
            .await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200).set_body_string("{}"))
            .mount(&upstream)
            .await;
        upstream
    }

    async fn get_orders(router: axum::Router, traceparent: Option<&str>) -> http::StatusCode {
        use tower::ServiceExt;
        let mut request = http::Request::builder().uri("/orders");
        if let Some(value) = traceparent {
            request = request.header(TRACEPARENT, value);
        }
        let request = request.body(axum::body::Body::empty()).expect("request");
        router.oneshot(request).await.expect("infallible").status()
    }

    fn sent_traceparents(requests: &[wiremock::Request]) -> Vec<String> {
        requests
            .iter()
            .map(|r| {
                r.headers
                    .get(TRACEPARENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned()
            })
            .collect()
    }

    fn attribute(span: &opentelemetry_sdk::trace::SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[tokio::test]
    async fn a_request_continues_the_callers_trace_and_each_client_attempt_is_its_own_span() {
        use opentelemetry::trace::SpanKind;
        let captured = crate::testing::CapturedSpans::default();
        let _guard = tracing::subscriber::set_default(captured.subscriber("order"));
        let upstream = flaky_upstream().await;

        let status = get_orders(service_calling(&upstream), Some(VALID)).await;
        assert_eq!(status, http::StatusCode::OK);

        let spans = captured.spans();
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .expect("a server span");
        assert_eq!(server.name, "GET /orders");
        assert_eq!(
            server.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(server.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            attribute(server, "http.response.status_code").as_deref(),
            Some("200")
        );

        let attempts: Vec<_> = spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Client)
            .collect();
        assert_eq!(attempts.len(), 2, "one CLIENT span per attempt");
        for attempt in &attempts {
            assert_eq!(attempt.parent_span_id, server.span_context.span_id());
            assert_eq!(
                attempt.span_context.trace_id(),
                server.span_context.trace_id()
            );
            assert_eq!(attempt.name, "GET");
        }
        assert_eq!(
            attribute(attempts[0], "http.response.status_code").as_deref(),
            Some("503")
        );
        assert_eq!(attribute(attempts[0], "http.request.resend_count"), None);
        assert_eq!(
            attribute(attempts[1], "http.request.resend_count").as_deref(),
            Some("1")
        );

        // Each attempt told the upstream its own span as the parent.
        let expected: Vec<String> = attempts
            .iter()
            .map(|a| {
                format!(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                    a.span_context.span_id()
                )
            })
            .collect();
        let received = upstream.received_requests().await.expect("recorded");
        assert_eq!(sent_traceparents(&received), expected);

        // The log lines written inside the request carry its trace.
        let lines = captured.logs().lines();
        let priced = lines
            .iter()
            .find(|l| l["msg"] == "priced")
            .expect("the handler's line");
        assert_eq!(priced["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(priced["spanId"], server.span_context.span_id().to_string());
        assert!(
            priced.get("otel.kind").is_none(),
            "attributes stay out of logs"
        );
    }

    #[tokio::test]
    async fn a_malformed_or_oversized_traceparent_starts_a_new_trace_and_the_request_succeeds() {
        use opentelemetry::trace::{SpanId, SpanKind};
        let oversized = format!("01{}-{}", &VALID[2..], "a".repeat(8 * 1024));
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "not a traceparent",
            oversized.as_str(),
        ] {
            let captured = crate::testing::CapturedSpans::default();
            let _guard = tracing::subscriber::set_default(captured.subscriber("order"));
            let upstream = flaky_upstream().await;
            assert_eq!(
                get_orders(service_calling(&upstream), Some(bad)).await,
                http::StatusCode::OK
            );
            let spans = captured.spans();
            let server = spans
                .iter()
                .find(|s| s.span_kind == SpanKind::Server)
                .expect("a server span");
            assert_eq!(server.parent_span_id, SpanId::INVALID, "a new root");
            assert_ne!(
                server.span_context.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
        }
    }

    #[tokio::test]
    async fn without_export_the_incoming_context_is_forwarded_unchanged_on_every_attempt() {
        let logs = crate::telemetry::CapturedLogs::default();
        let _guard =
            tracing::subscriber::set_default(crate::testing::untraced_subscriber(logs.clone()));
        let upstream = flaky_upstream().await;
        assert_eq!(
            get_orders(service_calling(&upstream), Some(VALID)).await,
            http::StatusCode::OK
        );
        let received = upstream.received_requests().await.expect("recorded");
        assert_eq!(sent_traceparents(&received), vec![VALID, VALID]);
        let lines = logs.lines();
        let priced = lines.iter().find(|l| l["msg"] == "priced").expect("line");
        assert_eq!(priced["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");

        // A request without context sends none.
        let upstream = flaky_upstream().await;
        get_orders(service_calling(&upstream), None).await;
        let received = upstream.received_requests().await.expect("recorded");
        assert_eq!(sent_traceparents(&received), vec!["none", "none"]);
    }

    #[test]
    fn a_batch_span_links_every_message_instead_of_choosing_one_parent() {
        let captured = crate::testing::CapturedSpans::default();
        let contexts: Vec<SpanContext> = ["00f067aa0ba902b7", "00f067aa0ba902b8"]
            .iter()
            .map(|span| {
                from_http(&headers(&[(
                    TRACEPARENT,
                    &format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01"),
                )]))
                .expect("valid")
            })
            .collect();
        tracing::subscriber::with_default(captured.subscriber("inventory"), || {
            let batch = tracing::info_span!("process batch");
            link_messages(&batch, &contexts);
        });
        let spans = captured.spans();
        assert_eq!(spans.len(), 1);
        let linked: Vec<_> = spans[0]
            .links
            .iter()
            .map(|l| l.span_context.span_id())
            .collect();
        assert_eq!(
            linked,
            contexts
                .iter()
                .map(SpanContext::span_id)
                .collect::<Vec<_>>()
        );
    }

    proptest! {
        #[test]
        fn any_well_formed_traceparent_round_trips(
            trace in "[0-9a-f]{32}",
            span in "[0-9a-f]{16}",
            flags in "[0-9a-f]{2}",
        ) {
            prop_assume!(trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0'));
            let header = format!("00-{trace}-{span}-{flags}");
            prop_assert!(is_valid_traceparent(&header));
            let context = from_http(&headers(&[(TRACEPARENT, &header)])).expect("valid");
            prop_assert_eq!(context.trace_id().to_string(), trace);
            prop_assert_eq!(context.span_id().to_string(), span);
            let sampled = u8::from_str_radix(&flags, 16).expect("hex") & 1 == 1;
            prop_assert_eq!(context.is_sampled(), sampled);
        }

        #[test]
        fn arbitrary_text_never_panics_and_what_is_accepted_is_well_formed(raw in ".{0,200}") {
            let mut fields = HashMap::new();
            fields.insert(TRACEPARENT.to_owned(), raw.clone());
            if let Some(context) = extract(&fields) {
                prop_assert!(is_valid_traceparent(raw.trim()));
                let (out, _) = to_text(&context);
                prop_assert_eq!(out.map(|s| s.len()), Some(55));
            }
        }

        #[test]
        fn one_changed_character_outside_the_hex_alphabet_is_refused(
            index in 0_usize..55,
            replacement in "[g-zA-Z_ .]",
        ) {
            let mut header = VALID.to_owned().into_bytes();
            header[index] = replacement.as_bytes()[0];
            let header = String::from_utf8(header).expect("ascii");
            prop_assert!(!is_valid_traceparent(&header));
        }
    }
}
