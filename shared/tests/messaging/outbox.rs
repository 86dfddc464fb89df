//! The outbox relay publishes committed rows in order and marks them sent.

use shared::events::PriceChanged;
use shared::messaging::QueueType;
use shared::outbox::{self, OutboxRelay};
use tokio_util::sync::CancellationToken;

use crate::assert_eventually;
use crate::helpers::{Recorder, TestBroker, consumer, outbox_database, price_changed, settings};
use crate::on_both_queue_types;

on_both_queue_types!(the_relay_publishes_enqueued_rows_in_order_and_marks_them_sent);
async fn the_relay_publishes_enqueued_rows_in_order_and_marks_them_sent(queue_type: QueueType) {
    let database = outbox_database().await;
    let recorder = Recorder::accepting();
    let mut settings = settings(queue_type);
    // One message at a time, so handling order shows publishing order.
    settings.prefetch = 1;
    let test = TestBroker::connected(settings, vec![consumer(recorder.clone())]).await;
    let relay = OutboxRelay::new(database.clone(), test.broker.publisher());
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(stop.clone()));

    let skus: Vec<String> = (0..300).map(|i| format!("SKU-{i:03}")).collect();
    let enqueued = skus.clone();
    database
        .write(move |tx| {
            for sku in &enqueued {
                outbox::sqlite::enqueue(tx, &price_changed(sku))?;
            }
            Ok::<_, rusqlite::Error>(())
        })
        .await
        .expect("enqueues");
    relay.notify();

    assert_eventually!(
        recorder.count() == skus.len(),
        "{} of {} consumed",
        recorder.count(),
        skus.len()
    );
    let consumed: Vec<String> = recorder
        .seen()
        .iter()
        .map(|s| s.message.decode::<PriceChanged>().expect("decodes").sku)
        .collect();
    assert_eq!(consumed, skus);
    assert_eventually!(
        outbox::pending(database.pool()).await.expect("counts") == 0,
        "rows are still unsent"
    );

    stop.cancel();
    running.await.expect("the relay stops");
    test.cleanup().await;
}
