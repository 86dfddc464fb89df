//! Deliveries waiting together are applied as one batch, acknowledged together; a failing batch
//! is handled again message by message, so a poison message is dead-lettered alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use shared::correlation::{self, CorrelationId};
use shared::db::{self, Database, DatabaseError};
use shared::events::PriceChanged;
use shared::inbox;
use shared::messaging::QueueType;
use shared::messaging::topology::namespaced;
use shared::messaging::{
    Handler, HandlerError, HandlerFuture, IncomingMessage, MessagingSettings, OutgoingMessage, dlq,
};
use shared::metrics::Metrics;
use sqlx::Row;
use tokio::sync::watch;
use uuid::Uuid;

use crate::assert_eventually;
use crate::helpers::{QUEUE, TestBroker, consumer, deliveries, price_changed, settings};
use crate::on_both_queue_types;

pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "inbox", inbox::MIGRATION),
    (
        2,
        "effects",
        "CREATE TABLE effects (message_id TEXT NOT NULL, sku TEXT NOT NULL);",
    ),
];

/// The SKU whose messages can never be applied.
const POISON: &str = "POISON";

/// The SKU whose message holds the consumer until the test opens the gate.
pub const GATE: &str = "GATE";

/// Applies `price.changed` as an effects row plus an inbox row, one message or a whole batch per
/// transaction; refuses [`POISON`] for good.
pub struct Ledger {
    db: Database,
    gate: watch::Receiver<bool>,
    /// The size of every batch offered to `handle_batch`, and how many messages `handle` saw.
    batches: Mutex<Vec<usize>>,
    singles: Mutex<usize>,
}

impl Ledger {
    pub fn new(db: Database, gate: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            db,
            gate,
            batches: Mutex::new(Vec::new()),
            singles: Mutex::new(0),
        })
    }

    /// Decodes `messages` and refuses a batch holding [`POISON`]; waits while one of them is the
    /// [`GATE`] and the gate is shut. Answers each message's ID and SKU.
    async fn admit(
        &self,
        messages: &[IncomingMessage],
    ) -> Result<Vec<(Uuid, String)>, HandlerError> {
        let mut effects = Vec::with_capacity(messages.len());
        for message in messages {
            let event: PriceChanged = message.decode()?;
            if event.sku == POISON {
                return Err(HandlerError::Permanent("poisoned".to_owned()));
            }
            if event.sku == GATE {
                let mut gate = self.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
            }
            effects.push((message.message_id, event.sku));
        }
        Ok(effects)
    }

    /// Applies the admitted messages in one transaction: all of them, or (on an error) none.
    async fn apply(&self, effects: Vec<(Uuid, String)>) -> Result<(), HandlerError> {
        self.db
            .write(move |tx| {
                for (message_id, sku) in &effects {
                    if inbox::sqlite::record(tx, *message_id)? {
                        tx.prepare_cached("INSERT INTO effects (message_id, sku) VALUES (?, ?)")?
                            .execute([message_id.to_string(), sku.clone()])?;
                    }
                }
                Ok::<_, rusqlite::Error>(())
            })
            .await
            .map_err(|error| HandlerError::Transient(DatabaseError::from(error).to_string()))
    }
}

impl Handler for Ledger {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(async move {
            *self.singles.lock().expect("lock") += 1;
            let effects = self.admit(std::slice::from_ref(&message)).await?;
            self.apply(effects).await
        })
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        Some(Box::pin(async move {
            self.batches.lock().expect("lock").push(messages.len());
            // A poison message refuses the whole batch before anything is written.
            let effects = self.admit(messages).await?;
            self.apply(effects).await
        }))
    }
}

/// How many times each message ID's effect was applied.
async fn effects(db: &Database) -> HashMap<String, i64> {
    sqlx::query("SELECT message_id, count(*) AS n FROM effects GROUP BY message_id")
        .fetch_all(db.pool())
        .await
        .expect("reads")
        .iter()
        .map(|row| (row.get("message_id"), row.get("n")))
        .collect()
}

/// Messages of the test queue not yet sent to a consumer.
pub async fn ready(settings: &MessagingSettings) -> u32 {
    let connection = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    let queue = namespaced(&settings.namespace, QUEUE);
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = connection.close(200, "OK".into()).await;
    declared.message_count()
}

/// The `messaging_batch_size` histogram's observation count and sum.
fn batch_sizes(metrics: &Metrics) -> (u64, f64) {
    let rendered = metrics.render();
    let value = |prefix: &str| {
        rendered
            .lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_default()
    };
    let count = value("messaging_batch_size_count{");
    (count as u64, value("messaging_batch_size_sum{"))
}

on_both_queue_types!(
    a_poison_message_in_a_batch_is_dead_lettered_alone_and_the_rest_are_applied_once
);
async fn a_poison_message_in_a_batch_is_dead_lettered_alone_and_the_rest_are_applied_once(
    queue_type: QueueType,
) {
    let db = db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("opens");
    let (open, gate) = watch::channel(false);
    let ledger = Ledger::new(db.clone(), gate);
    let mut settings = settings(queue_type);
    // Batches of up to 8: room for the gate's delivery and the whole batch behind it.
    settings.prefetch = 16;
    let test = TestBroker::connected(settings, vec![consumer(ledger.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let publisher = test.broker.publisher();

    // The consumer takes the gate's message alone and holds on to it, so the next six are all
    // waiting when it lets go.
    let gate_message = OutgoingMessage::new(&price_changed(GATE)).expect("serialises");
    publisher.publish(gate_message).await.expect("confirmed");
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the gate was not delivered"
    );
    let skus = ["BK-12", "MG-07", POISON, "HD-44", "TS-33", "ST-01"];
    let mut messages = Vec::new();
    for sku in skus {
        let id = CorrelationId::parse(&format!("order-{sku}")).expect("valid");
        let message = correlation::scope(id, async { OutgoingMessage::new(&price_changed(sku)) })
            .await
            .expect("serialises");
        publisher.publish(message.clone()).await.expect("confirmed");
        messages.push(message);
    }
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the batch was not delivered"
    );
    open.send(true).expect("the handler holds the gate");

    assert_eventually!(
        deliveries(&metrics, "applied") == 6 && deliveries(&metrics, "dead_lettered") == 1,
        "the deliveries were not all settled"
    );
    let letters = dlq::list(&test.settings, QUEUE, 10).await.expect("lists");
    assert_eq!(letters.len(), 1, "only the poison message is dead-lettered");
    let poison = &messages[2];
    assert_eq!(
        letters[0].message_id,
        Some(poison.message_id.to_string()),
        "the dead letter is the poison message"
    );
    assert_eq!(letters[0].reason.as_deref(), Some("rejected"));
    assert_eq!(letters[0].correlation_id.as_deref(), Some("order-POISON"));
    assert_eq!(
        letters[0]
            .headers
            .get("x-correlation-id")
            .map(String::as_str),
        Some("order-POISON"),
        "the dead letter keeps its headers"
    );
    assert_eq!(
        letters[0]
            .headers
            .get("x-schema-version")
            .map(String::as_str),
        Some("1")
    );
    let applied = effects(&db).await;
    assert_eq!(applied.len(), 6, "the gate and five messages have effects");
    for message in messages
        .iter()
        .filter(|m| m.message_id != poison.message_id)
    {
        assert_eq!(
            applied.get(&message.message_id.to_string()),
            Some(&1),
            "each message other than the poison is applied exactly once"
        );
    }
    let batches = ledger.batches.lock().expect("lock").clone();
    assert!(
        batches.iter().any(|size| *size >= 2),
        "the waiting messages were offered as a batch: {batches:?}"
    );
    assert_eq!(deliveries(&metrics, "duplicate"), 0);
    test.cleanup().await;
}

on_both_queue_types!(a_lone_delivery_is_handled_at_once_without_waiting_for_a_batch);
async fn a_lone_delivery_is_handled_at_once_without_waiting_for_a_batch(queue_type: QueueType) {
    let db = db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("opens");
    let (_open, gate) = watch::channel(true);
    let ledger = Ledger::new(db.clone(), gate);
    let test = TestBroker::connected(settings(queue_type), vec![consumer(ledger.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);

    let message = OutgoingMessage::new(&price_changed("BK-12")).expect("serialises");
    test.broker
        .publisher()
        .publish(message.clone())
        .await
        .expect("confirmed");

    assert_eventually!(
        deliveries(&metrics, "applied") == 1,
        "the lone delivery was not handled"
    );
    assert_eq!(
        effects(&db).await.get(&message.message_id.to_string()),
        Some(&1)
    );
    assert_eq!(*ledger.singles.lock().expect("lock"), 1);
    assert!(ledger.batches.lock().expect("lock").is_empty());
    assert_eq!(batch_sizes(&metrics), (1, 1.0), "one batch of one");
    test.cleanup().await;
}

on_both_queue_types!(a_batch_that_was_already_applied_is_counted_as_duplicates);
async fn a_batch_that_was_already_applied_is_counted_as_duplicates(queue_type: QueueType) {
    let db = db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("opens");
    let (open, gate) = watch::channel(false);
    let ledger = Ledger::new(db.clone(), gate);
    let mut settings = settings(queue_type);
    settings.prefetch = 16;
    let test = TestBroker::connected(settings, vec![consumer(ledger.clone())]).await;
    let metrics = Metrics::new("test");
    test.broker.register_metrics(&metrics);
    let publisher = test.broker.publisher();

    let gate_message = OutgoingMessage::new(&price_changed(GATE)).expect("serialises");
    publisher.publish(gate_message).await.expect("confirmed");
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the gate was not delivered"
    );
    let message = OutgoingMessage::new(&price_changed("MG-07")).expect("serialises");
    for _ in 0..3 {
        publisher.publish(message.clone()).await.expect("confirmed");
    }
    assert_eventually!(
        ready(&test.settings).await == 0,
        "the copies were not delivered"
    );
    open.send(true).expect("the handler holds the gate");

    assert_eventually!(
        deliveries(&metrics, "applied") + deliveries(&metrics, "duplicate") == 4,
        "the deliveries were not all settled"
    );
    assert_eq!(deliveries(&metrics, "applied"), 2, "the gate and one copy");
    assert_eq!(deliveries(&metrics, "duplicate"), 2);
    assert_eq!(
        effects(&db).await.get(&message.message_id.to_string()),
        Some(&1)
    );
    test.cleanup().await;
}
