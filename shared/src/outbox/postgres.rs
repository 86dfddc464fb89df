//! The outbox on PostgreSQL: rows written in the caller's transaction, and the relay's leader
//! guard, so that of several replicas exactly one publishes at a time.
//!
//! The guard is a session-level advisory lock (`pg_try_advisory_lock`) held on a connection of
//! its own for as long as the replica relays. Every round reads and marks rows on that same
//! connection, so a round that succeeds proves the session, and with it the lock, is alive. When
//! the leader dies (even by `SIGKILL`) the server ends its session and frees the lock, and a
//! standby takes over at its next poll. Why a leader rather than claimed batches: see
//! `docs/decisions/0520-outbox-relay-leader.md`.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::Mutex;

use super::{BacklogSize, OutboxStorage, PendingRow, pending_row};
use crate::db::DatabaseError;
use crate::messaging::OutgoingMessage;
use crate::pg::PgDatabase;
use crate::trace_context;

/// The SQL that creates the outbox table (with its trace context columns); include it in the
/// service's PostgreSQL migrations. `data` is `TEXT`, not `JSONB`, so the bytes published are
/// the bytes written.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    version BIGINT NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL,
    traceparent TEXT,
    tracestate TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
";

/// The advisory lock that makes a replica the relay's leader: one key per database (each
/// service has its own), the ASCII of `outbox`.
pub const RELAY_LOCK: i64 = 0x6f75_7462_6f78;

/// Writes `event` to the outbox inside the caller's transaction.
///
/// # Errors
/// Database or serialisation failure.
pub async fn enqueue<E: crate::events::Event>(
    tx: &mut PgConnection,
    event: &E,
) -> Result<(), sqlx::Error> {
    let message = OutgoingMessage::new(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    enqueue_message(tx, &message).await
}

/// Writes an already built `message` to the outbox inside the caller's transaction.
///
/// # Errors
/// Database failure.
pub async fn enqueue_message(
    tx: &mut PgConnection,
    message: &OutgoingMessage,
) -> Result<(), sqlx::Error> {
    let data = std::str::from_utf8(&message.data).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let (traceparent, tracestate) = message
        .trace
        .as_ref()
        .map_or((None, None), trace_context::to_text);
    sqlx::query(
        "INSERT INTO outbox \
         (message_id, event_type, version, correlation_id, data, traceparent, tracestate) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(message.message_id.to_string())
    .bind(&message.event_type)
    .bind(i64::from(message.version))
    .bind(message.correlation_id.as_deref())
    .bind(data)
    .bind(traceparent)
    .bind(tracestate)
    .execute(tx)
    .await?;
    Ok(())
}

/// Rows not yet confirmed by the broker (for readiness details and tests).
///
/// # Errors
/// Database failure.
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await
}

/// [`OutboxStorage`] on PostgreSQL, shared by several replicas: rows are read and marked only
/// while this replica holds [`RELAY_LOCK`] on its leader session; otherwise [`unsent`] answers
/// nothing and the relay idles until its next poll, when it tries for the lock again. Dropping
/// the storage (with the last relay) closes the session and frees the lock.
///
/// [`unsent`]: OutboxStorage::unsent
#[derive(Debug)]
pub struct PgOutbox {
    db: PgDatabase,
    session: Mutex<Session>,
}

#[derive(Debug, Default)]
struct Session {
    connection: Option<PgConnection>,
    /// The connection holds [`RELAY_LOCK`].
    leading: bool,
}

impl PgOutbox {
    /// The outbox table of `db`.
    pub fn new(db: PgDatabase) -> Self {
        Self {
            db,
            session: Mutex::new(Session::default()),
        }
    }

    async fn unsent_on(
        db: &PgDatabase,
        session: &mut Session,
        limit: i64,
    ) -> Result<Vec<PendingRow>, DatabaseError> {
        if session.connection.is_none() {
            let options = db.pool().connect_options();
            session.connection = Some(PgConnection::connect_with(&options).await?);
        }
        let Some(connection) = session.connection.as_mut() else {
            return Ok(Vec::new());
        };
        if !session.leading {
            let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut *connection)
                .await?;
            if !won {
                return Ok(Vec::new());
            }
            session.leading = true;
            tracing::info!("this replica now relays the outbox");
        }
        let rows = sqlx::query(
            "SELECT id, message_id, event_type, version, correlation_id, data, traceparent, \
             tracestate FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *connection)
        .await?;
        rows.iter().map(pending_row).collect()
    }

    /// Whether this replica holds the lead (for tests and logs).
    pub async fn is_leading(&self) -> bool {
        self.session.lock().await.leading
    }
}

impl OutboxStorage for PgOutbox {
    /// Read on the leader session; empty while another replica leads. A failure drops the
    /// session (and so the lock, if it was held).
    fn unsent(&self, limit: i64) -> BoxFuture<'_, Result<Vec<PendingRow>, DatabaseError>> {
        Box::pin(async move {
            let mut session = self.session.lock().await;
            let result = Self::unsent_on(&self.db, &mut session, limit).await;
            if result.is_err() {
                *session = Session::default();
            }
            result
        })
    }

    /// Marked on the leader session, so rows are marked only by the replica that read them.
    fn mark_sent<'a>(&'a self, ids: &'a [i64]) -> BoxFuture<'a, Result<(), DatabaseError>> {
        Box::pin(async move {
            let mut session = self.session.lock().await;
            let leading = session.leading;
            let Some(connection) = session.connection.as_mut().filter(|_| leading) else {
                return Err(DatabaseError::new(
                    "the relay's leader session is gone",
                    true,
                ));
            };
            let marked = sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
                .bind(ids)
                .execute(&mut *connection)
                .await;
            if marked.is_err() {
                *session = Session::default();
            }
            marked?;
            Ok(())
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<BacklogSize, DatabaseError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT count(*) AS n, \
                 coalesce(extract(epoch FROM now() - min(created_at))::float8, 0.0) AS age \
                 FROM outbox WHERE sent_at IS NULL",
            )
            .fetch_one(self.db.pool())
            .await?;
            Ok(BacklogSize {
                pending: row.try_get("n")?,
                oldest_age_secs: row.try_get::<f64, _>("age")?.max(0.0),
            })
        })
    }

    fn prune_sent(&self, keep: Duration) -> BoxFuture<'_, Result<(), DatabaseError>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)")
                .bind(keep.as_secs_f64())
                .execute(self.db.pool())
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::events::PriceChanged;
    use crate::messaging::{
        Broker, ConsumerSpec, Handler, HandlerFuture, IncomingMessage, MessagingSettings,
    };
    use crate::money::Money;
    use crate::outbox::{OutboxRelay, OutboxStorage};
    use crate::testing::postgres::TestDatabase;
    use crate::testing::{amqp_url, assert_eventually};

    /// Records the SKUs of the `price.changed` events it handles, in handling order.
    #[derive(Default)]
    struct Skus(StdMutex<Vec<String>>);

    impl Skus {
        fn seen(&self) -> Vec<String> {
            self.0.lock().expect("lock").clone()
        }
    }

    impl Handler for Skus {
        fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
            Box::pin(async move {
                let event: PriceChanged = message.decode().expect("a price change");
                self.0.lock().expect("lock").push(event.sku);
                Ok(())
            })
        }
    }

    async fn enqueue_all(database: &PgDatabase, skus: &[String]) {
        let mut tx = database.pool().begin().await.expect("begins");
        for sku in skus {
            let event = PriceChanged {
                sku: sku.clone(),
                price: Money(1999),
                currency: "EUR".to_owned(),
                version: 1,
            };
            enqueue(&mut tx, &event).await.expect("enqueues");
        }
        tx.commit().await.expect("commits");
    }

    async fn leader_locks(database: &PgDatabase) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(database.pool())
        .await
        .expect("reads the locks")
    }

    fn skus(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("SKU-{i:03}")).collect()
    }

    #[tokio::test]
    async fn of_two_relays_on_one_outbox_one_publishes_each_row_once_in_order_and_the_other_takes_over_when_it_stops()
     {
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), &[(1, "outbox", MIGRATION)])
            .await
            .expect("opens");
        let seen = Arc::new(Skus::default());
        let mut settings =
            MessagingSettings::new(amqp_url(), format!("t-{}", uuid::Uuid::new_v4()));
        // One message at a time, so handling order shows publishing order.
        settings.prefetch = 1;
        let stop_broker = CancellationToken::new();
        let consumer = ConsumerSpec {
            queue: "test.price-events".to_owned(),
            event_types: vec!["price.changed"],
            handler: seen.clone(),
        };
        let broker = Broker::start("test", settings, vec![consumer], stop_broker.clone());
        assert_eventually("the broker connects", || {
            let connected = broker.is_connected();
            async move { connected }
        })
        .await;

        let relay = |database: &PgDatabase| {
            OutboxRelay::with_storage(
                Arc::new(PgOutbox::new(database.clone())),
                broker.publisher(),
            )
        };
        let first = relay(&database);
        let stop_first = CancellationToken::new();
        let first_running = tokio::spawn(first.clone().run(stop_first.clone()));
        assert_eventually("the first relay leads", || async {
            leader_locks(&database).await == 1
        })
        .await;
        let second = relay(&database);
        let stop_second = CancellationToken::new();
        let second_running = tokio::spawn(second.clone().run(stop_second.clone()));

        let before = skus(0..300);
        enqueue_all(&database, &before).await;
        first.notify();
        second.notify();
        assert_eventually("the first rows are consumed", || async {
            seen.seen().len() >= before.len()
        })
        .await;
        assert_eq!(leader_locks(&database).await, 1, "one leader at a time");

        stop_first.cancel();
        first_running.await.expect("the first relay stops");
        // The last relay over its storage is gone: its session closes and frees the lock.
        drop(first);
        let after = skus(300..600);
        enqueue_all(&database, &after).await;
        second.notify();
        assert_eventually("the standby publishes the later rows", || async {
            pending(database.pool()).await.is_ok_and(|n| n == 0) && seen.seen().len() >= 600
        })
        .await;

        assert_eq!(seen.seen(), skus(0..600), "every row once, in order");
        stop_second.cancel();
        second_running.await.expect("the second relay stops");
        broker
            .delete_topology()
            .await
            .expect("deletes the topology");
        stop_broker.cancel();
        database.close().await;
    }

    #[tokio::test]
    async fn a_relay_whose_leader_session_is_killed_gives_up_the_lead_and_regains_it() {
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), &[(1, "outbox", MIGRATION)])
            .await
            .expect("opens");
        let outbox = PgOutbox::new(database.clone());
        outbox.unsent(10).await.expect("reads");
        assert!(outbox.is_leading().await, "leads");
        let standby = PgOutbox::new(database.clone());
        standby.unsent(10).await.expect("reads");
        assert!(!standby.is_leading().await, "stands by");

        // What the server does when the leader's process dies: its session ends.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .execute(database.pool())
        .await
        .expect("terminates the leader's session");

        assert!(outbox.unsent(10).await.is_err(), "the old leader notices");
        // pg_terminate_backend only signals the session: its locks are freed when it has exited.
        crate::testing::assert_eventually("the killed session's lock is freed", || {
            let pool = database.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
                )
                .fetch_one(&pool)
                .await
                .is_ok_and(|held| held == 0)
            }
        })
        .await;
        standby.unsent(10).await.expect("reads");
        assert!(standby.is_leading().await, "the standby leads");
        outbox.unsent(10).await.expect("reads");
        assert!(!outbox.is_leading().await, "the old leader stands by");
        database.close().await;
    }
}
