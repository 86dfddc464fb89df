//! The supervisor rebuilds the connection by itself after it is cut, and waits for a broker that
//! is not there yet instead of failing.

use shared::messaging::QueueType;
use shared::messaging::{OutgoingMessage, PublishError};

use crate::assert_eventually;
use crate::helpers::{Proxy, Recorder, TestBroker, consumer, price_changed, settings};
use crate::on_both_queue_types;

on_both_queue_types!(a_cut_connection_is_rebuilt_and_consumers_resume);
async fn a_cut_connection_is_rebuilt_and_consumers_resume(queue_type: QueueType) {
    let proxy = Proxy::start().await;
    let mut settings = settings(queue_type);
    settings.amqp_url = proxy.amqp_url();
    let recorder = Recorder::accepting();
    let test = TestBroker::connected(settings, vec![consumer(recorder.clone())]).await;
    let publisher = test.broker.publisher();
    publisher
        .publish(OutgoingMessage::new(&price_changed("BEFORE")).expect("serialises"))
        .await
        .expect("confirmed");
    assert_eventually!(recorder.count() == 1, "the first event was not consumed");

    proxy.sever();

    assert_eventually!(!test.broker.is_connected(), "the cut was not noticed");
    let health = test.broker.health_check();
    assert!(!health.ok);
    assert_eq!(health.detail["connected"], false);
    let during = publisher
        .publish(OutgoingMessage::new(&price_changed("DURING")).expect("serialises"))
        .await;
    assert!(
        matches!(
            during,
            Err(PublishError::Disconnected | PublishError::Timeout)
        ),
        "{during:?}"
    );

    proxy.restore();

    assert_eventually!(@ std::time::Duration::from_secs(30), test.broker.is_connected(), "no reconnect");
    publisher
        .publish(OutgoingMessage::new(&price_changed("AFTER")).expect("serialises"))
        .await
        .expect("confirmed after the reconnect");
    assert_eventually!(
        recorder
            .seen()
            .iter()
            .any(|s| s.message.data.windows(5).any(|w| w == b"AFTER")),
        "the consumer did not resume"
    );
    let health = test.broker.health_check();
    assert!(health.ok);
    assert!(
        health.detail["reconnects"].as_u64() >= Some(1),
        "{}",
        health.detail
    );
    assert!(health.detail["lastError"].is_string(), "{}", health.detail);
    test.cleanup().await;
}

on_both_queue_types!(startup_waits_for_an_absent_broker_and_connects_when_it_appears);
async fn startup_waits_for_an_absent_broker_and_connects_when_it_appears(queue_type: QueueType) {
    let proxy = Proxy::start().await;
    proxy.sever();
    let mut settings = settings(queue_type);
    settings.amqp_url = proxy.amqp_url();
    let test = TestBroker::start(settings, vec![consumer(Recorder::accepting())]);

    assert_eventually!(
        test.broker.health_check().detail["lastError"].is_string(),
        "no connection attempt was made"
    );
    assert!(!test.broker.is_connected());

    proxy.restore();

    assert_eventually!(@ std::time::Duration::from_secs(30), test.broker.is_connected(), "never connected");
    test.cleanup().await;
}

on_both_queue_types!(shutdown_closes_the_connection_and_turns_readiness_off);
async fn shutdown_closes_the_connection_and_turns_readiness_off(queue_type: QueueType) {
    let test =
        TestBroker::connected(settings(queue_type), vec![consumer(Recorder::accepting())]).await;

    test.shutdown.cancel();

    tokio::time::timeout(std::time::Duration::from_secs(15), test.broker.stopped())
        .await
        .expect("the supervisor stops within its drain bounds");
    assert!(!test.broker.is_connected());
    let after = test
        .broker
        .publisher()
        .publish(OutgoingMessage::new(&price_changed("LATE")).expect("serialises"))
        .await;
    assert!(
        matches!(after, Err(PublishError::Disconnected)),
        "{after:?}"
    );
    test.cleanup().await;
}
