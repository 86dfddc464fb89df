//! A duplicate delivery has one effect: the consumer's inbox records the message ID in the same
//! transaction as the effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use shared::db::{self, Database, DatabaseError};
use shared::inbox;
use shared::messaging::QueueType;
use shared::messaging::{Handler, HandlerError, IncomingMessage, OutgoingMessage};
use shared::metrics::Metrics;
use sqlx::Row;

use crate::assert_eventually;
use crate::helpers::{TestBroker, consumer, deliveries, price_changed, settings};
use crate::on_both_queue_types;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "inbox", inbox::MIGRATION),
    (
        2,
        "effects",
        "CREATE TABLE effects (message_id TEXT NOT NULL);",
    ),
];

/// Applies each message's effect once, however often it is delivered.
struct Idempotent {
    db: Database,
    deliveries: AtomicUsize,
}

impl Handler for Idempotent {
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let id = message.message_id;
            self.db
                .write(move |tx| {
                    if inbox::sqlite::record(tx, id)? {
                        tx.prepare_cached("INSERT INTO effects (message_id) VALUES (?)")?
                            .execute([id.to_string()])?;
                    }
                    Ok::<_, rusqlite::Error>(())
                })
                .await
                .map_err(|e| HandlerError::Transient(DatabaseError::from(e).to_string()))?;
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

on_both_queue_types!(a_duplicate_delivery_of_the_same_message_id_has_one_effect);
async fn a_duplicate_delivery_of_the_same_message_id_has_one_effect(queue_type: QueueType) {
    let database = db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("opens");
    let handler = Arc::new(Idempotent {
        db: database.clone(),
        deliveries: AtomicUsize::new(0),
    });
    let test = TestBroker::connected(settings(queue_type), vec![consumer(handler.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let message = OutgoingMessage::new(&price_changed("MG-07")).expect("serialises");

    let publisher = test.broker.publisher();
    publisher.publish(message.clone()).await.expect("confirmed");
    publisher.publish(message.clone()).await.expect("confirmed");

    assert_eventually!(
        handler.deliveries.load(Ordering::SeqCst) == 2,
        "both deliveries should be handled"
    );
    let effects = sqlx::query("SELECT count(*) AS n FROM effects")
        .fetch_one(database.pool())
        .await
        .expect("counts")
        .get::<i64, _>("n");
    assert_eq!(effects, 1);
    assert_eventually!(
        deliveries(&metrics, "duplicate") == 1,
        "the second delivery is counted a duplicate"
    );
    assert_eq!(deliveries(&metrics, "applied"), 1);
    test.cleanup().await;
}
