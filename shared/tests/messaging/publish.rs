//! Confirmed publishing and acknowledged consuming.

use std::time::{Duration, Instant};

use shared::correlation::{self, CorrelationId};
use shared::deadline::{self, Deadline};
use shared::events::PriceChanged;
use shared::messaging::QueueType;
use shared::messaging::{OutgoingMessage, PublishError};

use crate::assert_eventually;
use crate::helpers::{Recorder, TestBroker, consumer, price_changed, settings};
use crate::on_both_queue_types;

on_both_queue_types!(a_published_event_is_consumed_with_its_correlation_id_restored);
async fn a_published_event_is_consumed_with_its_correlation_id_restored(queue_type: QueueType) {
    let recorder = Recorder::accepting();
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let publisher = test.broker.publisher();

    let id = CorrelationId::parse("corr-publish-1").expect("valid");
    let message = correlation::scope(id, async {
        let message = OutgoingMessage::new(&price_changed("BK-12")).expect("serialises");
        let budget = Deadline::after(Duration::from_secs(3));
        deadline::scope(budget, publisher.publish(message.clone()))
            .await
            .expect("confirmed");
        message
    })
    .await;

    assert_eventually!(recorder.count() == 1, "the event was not consumed");
    let seen = &recorder.seen()[0];
    assert_eq!(seen.message.message_id, message.message_id);
    assert_eq!(seen.message.event_type, "price.changed");
    assert_eq!(seen.message.attempt, 1);
    assert_eq!(seen.correlation_id.as_deref(), Some("corr-publish-1"));
    let event: PriceChanged = seen.message.decode().expect("decodes");
    assert_eq!(event, price_changed("BK-12"));
    assert!(test.broker.health_check().ok);
    test.cleanup().await;
}

on_both_queue_types!(an_event_that_no_queue_is_bound_for_is_reported_unroutable);
async fn an_event_that_no_queue_is_bound_for_is_reported_unroutable(queue_type: QueueType) {
    let test = TestBroker::connected(settings(queue_type), vec![]).await;
    let message = OutgoingMessage::new(&price_changed("MG-07")).expect("serialises");

    let result = test.broker.publisher().publish(message).await;

    assert!(
        matches!(&result, Err(PublishError::Unroutable(key)) if key == "price.changed"),
        "{result:?}"
    );
    test.cleanup().await;
}

on_both_queue_types!(a_batch_of_2000_events_is_all_confirmed_quickly);
async fn a_batch_of_2000_events_is_all_confirmed_quickly(queue_type: QueueType) {
    // The queue is declared by one broker client that then stops, so nothing consumes while the
    // rate is measured; the other client only publishes.
    let settings = settings(queue_type);
    let declarer =
        TestBroker::connected(settings.clone(), vec![consumer(Recorder::accepting())]).await;
    declarer.shutdown.cancel();
    declarer.broker.stopped().await;
    let test = TestBroker::connected(settings, vec![]).await;
    let publisher = test.broker.publisher();

    let batch: Vec<_> = (0..2000)
        .map(|i| OutgoingMessage::new(&price_changed(&format!("SKU-{i}"))).expect("serialises"))
        .collect();
    let started = Instant::now();
    let results = publisher.publish_batch(batch).await;
    let elapsed = started.elapsed();
    let confirmed = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(confirmed, 2000, "{:?}", results.iter().find(|r| r.is_err()));
    let batch_rate = 2000.0 / elapsed.as_secs_f64();

    let started = Instant::now();
    for i in 0..200 {
        let message =
            OutgoingMessage::new(&price_changed(&format!("ONE-{i}"))).expect("serialises");
        publisher.publish(message).await.expect("confirmed");
    }
    let serial_rate = 200.0 / started.elapsed().as_secs_f64();
    println!(
        "publish rate with confirms: batch of 2000 in {elapsed:?} = {batch_rate:.0} msgs/s; \
         one at a time = {serial_rate:.0} msgs/s"
    );

    test.shutdown.cancel();
    declarer.cleanup().await;
}
