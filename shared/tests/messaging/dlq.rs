//! Malformed messages are dead-lettered at once; dead letters can be redriven.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::messaging::QueueType;
use shared::messaging::{HandlerError, OutgoingMessage, dlq};

use crate::assert_eventually;
use crate::helpers::{QUEUE, Recorder, TestBroker, consumer, price_changed, publish_raw, settings};
use crate::on_both_queue_types;

on_both_queue_types!(a_malformed_body_goes_straight_to_the_dlq_without_reaching_the_handler);
async fn a_malformed_body_goes_straight_to_the_dlq_without_reaching_the_handler(
    queue_type: QueueType,
) {
    let recorder = Recorder::accepting();
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;

    publish_raw(&test.settings, "price.changed", b"this is not an envelope").await;

    assert_eventually!(
        dlq::list(&test.settings, QUEUE, 10)
            .await
            .expect("lists")
            .len()
            == 1,
        "the malformed message never reached the DLQ"
    );
    let letter = dlq::list(&test.settings, QUEUE, 10)
        .await
        .expect("lists")
        .remove(0);
    assert_eq!(letter.message_id.as_deref(), Some("malformed-1"));
    assert_eq!(letter.correlation_id.as_deref(), Some("corr-malformed"));
    assert_eq!(letter.reason.as_deref(), Some("rejected"));
    assert_eq!(letter.body_preview, "this is not an envelope");
    assert_eq!(recorder.count(), 0);
    test.cleanup().await;
}

on_both_queue_types!(a_redriven_message_is_processed_once_the_handler_is_fixed);
async fn a_redriven_message_is_processed_once_the_handler_is_fixed(queue_type: QueueType) {
    let broken = Arc::new(AtomicBool::new(true));
    let flag = broken.clone();
    let recorder = Recorder::with(move |_| {
        if flag.load(Ordering::SeqCst) {
            Err(HandlerError::Permanent("bug".to_owned()))
        } else {
            Ok(())
        }
    });
    let test = TestBroker::connected(settings(queue_type), vec![consumer(recorder.clone())]).await;
    let message = OutgoingMessage::new(&price_changed("BK-12")).expect("serialises");
    test.broker
        .publisher()
        .publish(message.clone())
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

    broken.store(false, Ordering::SeqCst);
    let moved = dlq::redrive(&test.settings, QUEUE, None)
        .await
        .expect("redrives");

    assert_eq!(moved, 1);
    assert_eventually!(
        recorder.count() == 2,
        "the redriven message was not handled"
    );
    let last = recorder.seen().pop().expect("seen");
    assert_eq!(last.message.message_id, message.message_id);
    assert_eq!(last.message.attempt, 1, "redrive resets the attempt count");
    assert!(
        dlq::list(&test.settings, QUEUE, 10)
            .await
            .expect("lists")
            .is_empty()
    );
    test.cleanup().await;
}
