//! What differs between queue types: a queue keeps the type it was created with, quorum queues
//! park a message that keeps coming back unacknowledged, and a full queue refuses publishes.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use shared::messaging::topology::namespaced;
use shared::messaging::{OutgoingMessage, PublishError, QueueType, dlq};
use shared::outbox::{self, OutboxRelay};
use tokio_util::sync::CancellationToken;

use crate::assert_eventually;
use crate::helpers::{
    QUEUE, Recorder, TestBroker, consumer, outbox_database, price_changed, settings,
};
use crate::on_both_queue_types;

on_both_queue_types!(an_existing_queue_of_the_other_type_is_not_redeclared_and_readiness_says_why);
async fn an_existing_queue_of_the_other_type_is_not_redeclared_and_readiness_says_why(
    queue_type: QueueType,
) {
    let mut earlier = settings(queue_type);
    earlier.queue_type = match queue_type {
        QueueType::Classic => QueueType::Quorum,
        QueueType::Quorum => QueueType::Classic,
    };
    let declarer =
        TestBroker::connected(earlier.clone(), vec![consumer(Recorder::accepting())]).await;
    declarer.shutdown.cancel();
    declarer.broker.stopped().await;

    let mut now = earlier.clone();
    now.queue_type = queue_type;
    let refused = TestBroker::start(now, vec![consumer(Recorder::accepting())]);
    let last_error = || refused.broker.health_check().detail["lastError"].clone();
    assert_eventually!(
        last_error().is_string(),
        "the refused declaration was never reported"
    );

    let check = refused.broker.health_check();
    assert!(!check.ok, "ready with a refused queue: {:?}", check.detail);
    assert!(!refused.broker.is_connected());
    let error = last_error();
    let error = error.as_str().expect("text");
    let queue = namespaced(&earlier.namespace, QUEUE);
    assert!(error.contains(&format!("queue {queue} ")), "{error}");
    assert!(error.contains("check AMQP_QUEUE_TYPE,"), "{error}");
    assert!(error.contains("PRECONDITION_FAILED"), "{error}");
    refused.shutdown.cancel();
    refused.broker.stopped().await;
    declarer.cleanup().await;
}

#[tokio::test]
async fn a_quorum_queue_parks_a_message_returned_more_often_than_its_delivery_limit() {
    let mut settings = settings(QueueType::Quorum);
    settings.delivery_limit = 2;
    // Declared by a client that then stops, so that only the raw channels below take the message.
    let declarer =
        TestBroker::connected(settings.clone(), vec![consumer(Recorder::accepting())]).await;
    declarer.shutdown.cancel();
    declarer.broker.stopped().await;
    let publisher = TestBroker::connected(settings.clone(), vec![]).await;
    let message = OutgoingMessage::new(&price_changed("PO-15")).expect("serialises");
    publisher
        .broker
        .publisher()
        .publish(message.clone())
        .await
        .expect("confirmed");

    // A consumer that dies with the message unacknowledged: its channel closes and the broker
    // takes the message back, counting one return each time.
    let connection = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
        .await
        .expect("connects");
    let queue = namespaced(&settings.namespace, QUEUE);
    let mut deliveries = 0;
    loop {
        let channel = connection.create_channel().await.expect("channel");
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("gets");
        if got.is_none() {
            break;
        }
        deliveries += 1;
        assert!(deliveries <= 10, "the message is never parked");
        channel.close(200, "OK".into()).await.expect("closes");
    }
    let _ = connection.close(200, "OK".into()).await;

    // The first delivery plus `delivery_limit` returns.
    assert_eq!(deliveries, 1 + settings.delivery_limit);
    assert_eventually!(
        dlq::list(&settings, QUEUE, 10).await.expect("lists").len() == 1,
        "the message never reached the DLQ"
    );
    let letters = dlq::list(&settings, QUEUE, 10).await.expect("lists");
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(message.message_id.to_string().as_str())
    );
    assert_eq!(letters[0].reason.as_deref(), Some("delivery_limit"));
    publisher.shutdown.cancel();
    declarer.cleanup().await;
}

on_both_queue_types!(a_full_queue_nacks_a_publish_and_the_outbox_relay_sends_it_once_there_is_room);
async fn a_full_queue_nacks_a_publish_and_the_outbox_relay_sends_it_once_there_is_room(
    queue_type: QueueType,
) {
    let mut settings = settings(queue_type);
    settings.max_length = Some(1);
    let declarer =
        TestBroker::connected(settings.clone(), vec![consumer(Recorder::accepting())]).await;
    declarer.shutdown.cancel();
    declarer.broker.stopped().await;
    let test = TestBroker::connected(settings.clone(), vec![]).await;
    let metrics = shared::metrics::Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let nacked = || {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("messaging_publishes_total{") && l.contains("\"nacked\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let publisher = test.broker.publisher();
    // A classic queue refuses the publish past `max_length`; a quorum queue finds out that it is
    // over its bound only after an enqueue, so it takes one message more first.
    let mut accepted = Vec::new();
    let result = loop {
        let sku = format!("FL-{:02}", accepted.len());
        let message = OutgoingMessage::new(&price_changed(&sku)).expect("serialises");
        match publisher.publish(message).await {
            Ok(()) if accepted.len() < 5 => accepted.push(sku),
            other => break other,
        }
    };
    assert!(
        matches!(result, Err(PublishError::Nacked)),
        "{result:?} after {accepted:?}"
    );
    let room = 1 + usize::from(queue_type == QueueType::Quorum);
    assert_eq!(accepted.len(), room, "accepted {accepted:?}");
    assert_eq!(nacked(), 1);

    // The relay keeps the refused row and tries again until a consumer makes room.
    let database = outbox_database().await;
    let relay = OutboxRelay::new(database.clone(), publisher.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));
    database
        .write(|tx| outbox::sqlite::enqueue(tx, &price_changed("FL-RELAYED")))
        .await
        .expect("enqueues");
    relay.notify();
    assert_eventually!(nacked() >= 2, "the relay's publish was never refused");
    assert_eq!(outbox::pending(database.pool()).await.expect("counts"), 1);

    let recorder = Recorder::accepting();
    let consuming = TestBroker::connected(settings, vec![consumer(recorder.clone())]).await;
    // 20 s: the relay backs off up to 5 s between refused rounds, on a loaded CI machine.
    assert_eventually!(
        @ Duration::from_secs(20),
        outbox::pending(database.pool()).await.expect("counts") == 0,
        "the relay never sent the row"
    );
    accepted.push("FL-RELAYED".to_owned());
    assert_eventually!(
        recorder.count() == accepted.len(),
        "consumed {}",
        recorder.count()
    );
    let skus: Vec<String> = recorder
        .seen()
        .iter()
        .map(|s| {
            s.message
                .decode::<shared::events::PriceChanged>()
                .expect("decodes")
                .sku
        })
        .collect();
    assert_eq!(skus, accepted);

    stop.cancel();
    running.await.expect("the relay stops");
    test.shutdown.cancel();
    consuming.cleanup().await;
}
