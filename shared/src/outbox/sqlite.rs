//! Writing the SQLite outbox, inside a [`Database::write`](crate::db::Database::write)
//! transaction on the writer thread (rusqlite).

use rusqlite::Transaction;

use crate::events::Event;
use crate::messaging::OutgoingMessage;

/// Writes `event` to the outbox inside the caller's transaction. The message takes the
/// correlation ID and trace context of the caller of `Database::write`, which the closure runs
/// in.
///
/// # Errors
/// Database or serialisation failure.
pub fn enqueue<E: Event>(tx: &Transaction<'_>, event: &E) -> rusqlite::Result<()> {
    let message = OutgoingMessage::new(event)
        .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
    enqueue_message(tx, &message)
}

/// Writes an already built `message` to the outbox inside the caller's transaction.
///
/// # Errors
/// Database failure, or a payload that is not UTF-8.
pub fn enqueue_message(tx: &Transaction<'_>, message: &OutgoingMessage) -> rusqlite::Result<()> {
    let row = super::Columns::of(message)
        .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
    tx.prepare_cached(super::ENQUEUE)?
        .execute(rusqlite::params![
            row.message_id,
            row.event_type,
            row.version,
            row.correlation_id,
            row.data,
            row.traceparent,
            row.tracestate,
        ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::Row as _;
    use tracing::Instrument;

    use super::*;
    use crate::correlation::{self, CorrelationId};
    use crate::db::{self, Database};
    use crate::events::PriceChanged;
    use crate::money::Money;
    use crate::outbox::{BATCH_SIZE, OutboxStorage, SqliteOutbox};
    use crate::testing::CapturedSpans;
    use crate::trace_context;

    async fn outbox_database() -> Database {
        db::connect(
            "sqlite::memory:",
            &[
                (1, "outbox", super::super::MIGRATION),
                (
                    2,
                    "outbox trace context",
                    super::super::TRACE_CONTEXT_MIGRATION,
                ),
            ],
        )
        .await
        .expect("opens")
    }

    fn price_changed(sku: &str) -> PriceChanged {
        PriceChanged {
            sku: sku.to_owned(),
            price: Money(1250),
            currency: "EUR".to_owned(),
            version: 1,
        }
    }

    #[tokio::test]
    async fn a_row_written_on_the_writer_thread_carries_the_callers_trace_and_correlation_id() {
        let spans = CapturedSpans::default();
        let _guard = tracing::subscriber::set_default(spans.subscriber("pricing"));
        let database = outbox_database().await;
        let request = tracing::info_span!("request");
        let id = CorrelationId::parse("req-41").expect("valid");
        let event = price_changed("BK-12");

        correlation::scope(
            id,
            database
                .write(move |tx| {
                    tracing::info!("enqueueing");
                    enqueue(tx, &event)
                })
                .instrument(request.clone()),
        )
        .await
        .expect("enqueues");

        let expected = trace_context::context_of(&request).expect("the request is traced");
        let row = sqlx::query("SELECT correlation_id, traceparent FROM outbox")
            .fetch_one(database.pool())
            .await
            .expect("reads");
        assert_eq!(
            row.get::<Option<String>, _>("correlation_id").as_deref(),
            Some("req-41")
        );
        assert_eq!(
            row.get::<Option<String>, _>("traceparent"),
            trace_context::to_text(&expected).0
        );
        let logged = spans
            .logs()
            .lines()
            .into_iter()
            .find(|line| line["msg"] == "enqueueing")
            .expect("the closure's log line");
        assert_eq!(logged["correlationId"], "req-41");
        assert_eq!(logged["traceId"], expected.trace_id().to_string());
    }

    #[tokio::test]
    async fn the_relay_reads_a_row_written_on_the_writer_thread_as_the_message_that_was_enqueued() {
        let database = outbox_database().await;
        let message = OutgoingMessage::new(&price_changed("MG-07")).expect("serialises");
        let enqueued = message.clone();
        database
            .write(move |tx| enqueue_message(tx, &enqueued))
            .await
            .expect("enqueues");
        let storage = SqliteOutbox::new(database.clone());

        let unsent = storage.unsent(BATCH_SIZE).await.expect("reads");

        assert_eq!(unsent.len(), 1);
        let read = &unsent[0].message;
        assert_eq!(read.message_id, message.message_id);
        assert_eq!(read.event_type, "price.changed");
        assert_eq!(read.version, message.version);
        assert_eq!(read.data, message.data);
        storage.mark_sent(&[unsent[0].id]).await.expect("marks");
        assert_eq!(storage.backlog().await.expect("reads").pending, 0);
    }

    #[tokio::test]
    async fn an_outbox_row_rolled_back_with_its_transaction_is_never_relayed() {
        let database = outbox_database().await;
        let outcome = database
            .write(|tx| {
                enqueue(tx, &price_changed("HD-44"))?;
                Err::<(), _>(rusqlite::Error::QueryReturnedNoRows)
            })
            .await;
        assert!(matches!(outcome, Err(db::WriteError::Aborted(_))));
        assert_eq!(
            super::super::pending(database.pool())
                .await
                .expect("counts"),
            0
        );
    }
}
