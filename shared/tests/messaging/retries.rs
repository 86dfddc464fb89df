//! Transient failures are retried through the retry queue; permanent ones go to the DLQ.

use shared::correlation::{self, CorrelationId};
use shared::messaging::QueueType;
use shared::messaging::{HandlerError, OutgoingMessage, dlq};
use shared::metrics::Metrics;

use crate::assert_eventually;
use crate::helpers::{
    QUEUE, Recorder, TestBroker, consumer, deliveries, failing_first, price_changed, settings,
};
use crate::on_both_queue_types;

on_both_queue_types!(a_handler_failing_twice_is_retried_and_the_message_processed_once);
async fn a_handler_failing_twice_is_retried_and_the_message_processed_once(queue_type: QueueType) {
    let recorder = Recorder::with(failing_first(2));
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let message = OutgoingMessage::new(&price_changed("TS-33")).expect("serialises");

    test.broker
        .publisher()
        .publish(message.clone())
        .await
        .expect("confirmed");

    assert_eventually!(recorder.count() == 3, "saw {} attempts", recorder.count());
    let seen = recorder.seen();
    let attempts: Vec<u32> = seen.iter().map(|s| s.message.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert!(
        seen.iter()
            .all(|s| s.message.message_id == message.message_id)
    );
    let dead = dlq::list(&test.settings, QUEUE, 10).await.expect("lists");
    assert!(dead.is_empty(), "{dead:?}");
    assert_eventually!(
        deliveries(&metrics, "applied") == 1,
        "the last attempt is counted applied"
    );
    assert_eq!(deliveries(&metrics, "retried"), 2);
    test.cleanup().await;
}

on_both_queue_types!(an_always_failing_handler_ends_in_the_dlq_with_its_headers);
async fn an_always_failing_handler_ends_in_the_dlq_with_its_headers(queue_type: QueueType) {
    let recorder = Recorder::with(|_| Err(HandlerError::Transient("always".to_owned())));
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let id = CorrelationId::parse("corr-doomed").expect("valid");
    let message = correlation::scope(id, async {
        OutgoingMessage::new(&price_changed("HD-44")).expect("serialises")
    })
    .await;

    test.broker
        .publisher()
        .publish(message.clone())
        .await
        .expect("confirmed");

    // One first attempt plus `max_retries` retries, then the DLQ.
    let attempts = 1 + test.settings.max_retries as usize;
    assert_eventually!(
        recorder.count() == attempts,
        "saw {} attempts",
        recorder.count()
    );
    assert_eventually!(
        dlq::list(&test.settings, QUEUE, 10)
            .await
            .expect("lists")
            .len()
            == 1,
        "the message never reached the DLQ"
    );
    let letters = dlq::list(&test.settings, QUEUE, 10).await.expect("lists");
    let letter = &letters[0];
    assert_eq!(
        letter.message_id.as_deref(),
        Some(message.message_id.to_string().as_str())
    );
    assert_eq!(letter.event_type.as_deref(), Some("price.changed"));
    assert_eq!(letter.correlation_id.as_deref(), Some("corr-doomed"));
    assert_eq!(letter.headers["x-correlation-id"], "corr-doomed");
    assert_eq!(letter.headers["x-schema-version"], "1");
    assert_eq!(letter.headers["x-attempt"], attempts.to_string());
    assert_eq!(letter.reason.as_deref(), Some("rejected"));
    assert_eq!(letter.death_count, Some(1));
    let queue = format!("{}.{QUEUE}", test.settings.namespace);
    assert_eq!(letter.death_queue.as_deref(), Some(queue.as_str()));
    assert!(
        letter.body_preview.contains("HD-44"),
        "{}",
        letter.body_preview
    );
    // Nothing is handled again once it is parked.
    assert_eq!(recorder.count(), attempts);
    test.cleanup().await;
}

on_both_queue_types!(a_permanent_failure_goes_to_the_dlq_without_retries);
async fn a_permanent_failure_goes_to_the_dlq_without_retries(queue_type: QueueType) {
    let recorder = Recorder::with(|_| Err(HandlerError::Permanent("invalid".to_owned())));
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let message = OutgoingMessage::new(&price_changed("ST-01")).expect("serialises");

    test.broker
        .publisher()
        .publish(message)
        .await
        .expect("confirmed");

    assert_eventually!(
        dlq::list(&test.settings, QUEUE, 10)
            .await
            .expect("lists")
            .len()
            == 1,
        "the message never reached the DLQ"
    );
    assert_eq!(recorder.count(), 1);
    assert_eventually!(
        deliveries(&metrics, "dead_lettered") == 1,
        "the dead letter is counted"
    );
    test.cleanup().await;
}
