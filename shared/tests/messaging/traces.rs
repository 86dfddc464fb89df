//! Traces and metrics across the broker: the consumer's span joins the producer's trace, also
//! after the event waited in the outbox, and every publish and delivery is counted.

use opentelemetry::trace::{SpanId, SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use shared::messaging::OutgoingMessage;
use shared::messaging::QueueType;
use shared::metrics::Metrics;
use shared::outbox::{self, OutboxRelay};
use shared::telemetry::{CapturedLogs, LogFormat, TelemetrySettings, get_tracing_subscriber};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::assert_eventually;
use crate::batches::{GATE, Ledger, MIGRATIONS, ready};
use crate::helpers::{Recorder, TestBroker, consumer, outbox_database, price_changed, settings};
use crate::on_both_queue_types;

/// Spans exported in memory, each as it ends.
fn capture() -> (InMemorySpanExporter, tracing::subscriber::DefaultGuard) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let settings = TelemetrySettings {
        format: LogFormat::Json,
        filter: "info".to_owned(),
        otlp_endpoint: None,
    };
    let subscriber = get_tracing_subscriber(
        "pricing",
        &settings,
        CapturedLogs::default(),
        Some(provider.tracer("pricing")),
    );
    (exporter, tracing::subscriber::set_default(subscriber))
}

fn spans(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter.get_finished_spans().unwrap_or_default()
}

fn of_kind(spans: &[SpanData], kind: SpanKind) -> Vec<&SpanData> {
    spans.iter().filter(|s| s.span_kind == kind).collect()
}

fn metric_line<'a>(rendered: &'a str, prefix: &str) -> Option<&'a str> {
    rendered.lines().find(|line| line.starts_with(prefix))
}

on_both_queue_types!(a_consumed_message_is_a_child_of_its_publish_span_and_both_are_counted);
async fn a_consumed_message_is_a_child_of_its_publish_span_and_both_are_counted(
    queue_type: QueueType,
) {
    let (exporter, _guard) = capture();
    let recorder = Recorder::accepting();
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let metrics = Metrics::new("pricing");
    test.broker.register_metrics(&metrics);

    let request = tracing::info_span!("request");
    let message = {
        let _entered = request.enter();
        OutgoingMessage::new(&price_changed("BK-12")).expect("serialises")
    };
    test.broker
        .publisher()
        .publish(message)
        .instrument(request.clone())
        .await
        .expect("confirmed");
    drop(request);
    assert_eventually!(
        of_kind(&spans(&exporter), SpanKind::Consumer).len() == 1,
        "no consumer span"
    );

    let spans = spans(&exporter);
    let root = spans.iter().find(|s| s.name == "request").expect("request");
    let publish = of_kind(&spans, SpanKind::Producer)[0];
    let process = of_kind(&spans, SpanKind::Consumer)[0];
    assert_eq!(publish.name, "publish price.changed");
    assert_eq!(publish.parent_span_id, root.span_context.span_id());
    assert_eq!(process.name, "process price.changed");
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        root.span_context.trace_id()
    );
    let attribute = |span: &SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(
        attribute(process, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(process, "messaging.message.id"),
        Some(recorder.seen()[0].message.message_id.to_string())
    );

    let rendered = metrics.render();
    let queue = format!("{}.test.price-events", test.settings.namespace);
    assert!(
        metric_line(&rendered, "messaging_publishes_total{")
            .is_some_and(|l| l.contains("outcome=\"acked\"") && l.ends_with(" 1")),
        "{rendered}"
    );
    assert!(
        metric_line(&rendered, "messaging_deliveries_total{")
            .is_some_and(|l| l.contains(&queue) && l.contains("applied") && l.ends_with(" 1")),
        "{rendered}"
    );
    assert!(
        metric_line(&rendered, "messaging_confirm_duration_seconds_count{")
            .is_some_and(|l| l.ends_with(" 1")),
        "{rendered}"
    );
    assert!(
        metric_line(&rendered, "messaging_broker_connected{").is_some_and(|l| l.ends_with(" 1")),
        "{rendered}"
    );
    test.cleanup().await;
}

on_both_queue_types!(
    an_event_published_later_by_the_outbox_relay_joins_the_trace_of_the_request_that_stored_it
);
async fn an_event_published_later_by_the_outbox_relay_joins_the_trace_of_the_request_that_stored_it(
    queue_type: QueueType,
) {
    let (exporter, _guard) = capture();
    let database = outbox_database().await;
    let recorder = Recorder::accepting();
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let relay = OutboxRelay::new(database.clone(), test.broker.publisher());
    let metrics = Metrics::new("pricing");
    relay.register_metrics(&metrics);

    // The request commits the row and ends before anything is published.
    let request = tracing::info_span!("request");
    database
        .write(|tx| outbox::sqlite::enqueue(tx, &price_changed("BK-12")))
        .instrument(request.clone())
        .await
        .expect("enqueues");
    let root = shared::trace_context::context_of(&request).expect("the request is traced");
    drop(request);

    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    assert_eventually!(recorder.count() == 1, "the event was not consumed");
    assert_eventually!(
        of_kind(&spans(&exporter), SpanKind::Consumer).len() == 1,
        "no consumer span"
    );
    let spans = spans(&exporter);
    let publish = of_kind(&spans, SpanKind::Producer)[0];
    let process = of_kind(&spans, SpanKind::Consumer)[0];
    assert_eq!(publish.parent_span_id, root.span_id());
    assert_eq!(publish.span_context.trace_id(), root.trace_id());
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_ne!(process.parent_span_id, SpanId::INVALID);
    assert_eventually!(
        metric_line(&metrics.render(), "outbox_pending_rows{").is_some_and(|l| l.ends_with(" 0")),
        "the backlog gauge was not updated"
    );

    stop.cancel();
    running.await.expect("the relay stops");
    test.cleanup().await;
}

on_both_queue_types!(
    a_batch_is_one_consumer_span_linked_to_every_message_while_a_lone_message_keeps_its_parent
);
async fn a_batch_is_one_consumer_span_linked_to_every_message_while_a_lone_message_keeps_its_parent(
    queue_type: QueueType,
) {
    let (exporter, _guard) = capture();
    let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("opens");
    let (open, gate) = tokio::sync::watch::channel(false);
    let mut settings = settings(queue_type);
    settings.prefetch = 16;
    let test = TestBroker::connected(settings, vec![consumer(Ledger::new(database, gate))]).await;
    let publisher = test.broker.publisher();
    let publish_in_request = |sku: &'static str| {
        let publisher = publisher.clone();
        async move {
            let request = tracing::info_span!("request");
            let message = {
                let _entered = request.enter();
                OutgoingMessage::new(&price_changed(sku)).expect("serialises")
            };
            publisher
                .publish(message)
                .instrument(request)
                .await
                .expect("confirmed");
        }
    };

    // The gate's message is handled alone and holds the consumer while two more queue up.
    publish_in_request(GATE).await;
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the gate was not delivered"
    );
    publish_in_request("BK-12").await;
    publish_in_request("MG-07").await;
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the batch was not delivered"
    );
    open.send(true).expect("the handler holds the gate");
    assert_eventually!(
        of_kind(&spans(&exporter), SpanKind::Consumer).len() == 2,
        "expected one consumer span for the gate and one for the batch"
    );

    let spans = spans(&exporter);
    let publishes = of_kind(&spans, SpanKind::Producer);
    let consumers = of_kind(&spans, SpanKind::Consumer);
    let lone = consumers
        .iter()
        .find(|s| s.name == "process price.changed")
        .expect("the gate's own span");
    assert_eq!(lone.parent_span_id, publishes[0].span_context.span_id());
    let queue =
        shared::messaging::topology::namespaced(&test.settings.namespace, crate::helpers::QUEUE);
    let batch = consumers
        .iter()
        .find(|s| s.name == format!("process {queue}"))
        .unwrap_or_else(|| panic!("no batch span among {consumers:?}"));
    assert_eq!(
        batch.parent_span_id,
        SpanId::INVALID,
        "a batch starts its own trace"
    );
    let linked: Vec<_> = batch
        .links
        .iter()
        .map(|link| link.span_context.span_id())
        .collect();
    assert_eq!(
        linked,
        [
            publishes[1].span_context.span_id(),
            publishes[2].span_context.span_id()
        ],
        "the batch links to each message's publish span"
    );
    test.cleanup().await;
}
