//! Transactional outbox: events are written in the same transaction as the state change that
//! caused them, and a relay publishes them with confirms afterwards.
//!
//! This closes the gap between "committed" and "published": if the process dies after the
//! commit, the event is still in the table and goes out when the relay runs again; if publishing
//! fails, the row stays unsent and is retried. Delivery is therefore at least once (a row whose
//! confirm was lost is sent again), and consumers deduplicate by message ID.
//!
//! Sent rows are kept for an hour (so an operator can see what went out, and when) and then
//! pruned, which keeps the table small.
//!
//! Writing a row ([`sqlite::enqueue`] in a [`Database::write`] transaction, [`postgres::enqueue`]
//! on PostgreSQL) happens inside the service's own transaction; the relay reaches
//! the table only through [`OutboxStorage`], so another database backend adds an implementation
//! beside [`SqliteOutbox`] and keeps the relay: [`postgres`] holds the outbox on PostgreSQL and
//! [`postgres::PgOutbox`], whose leader guard lets several replicas share one outbox.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::correlation::{self, CorrelationId};
use crate::db::{Database, DatabaseError};
use crate::messaging::{OutgoingMessage, Publisher};
use crate::trace_context;

pub mod postgres;
pub mod sqlite;

/// The SQL that creates the outbox table; include it in the service's migrations.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
";

/// The SQL that adds the trace context columns to the outbox (after [`MIGRATION`]; a migration of
/// its own so databases created before it are upgraded, not rebuilt): the `traceparent` and
/// `tracestate` of the request that wrote the row, so the publish span joins that request's trace
/// even when the event waited in the outbox while the broker was away.
pub const TRACE_CONTEXT_MIGRATION: &str = "\
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN tracestate TEXT;
";

/// Rows published per round: as many as the default publish window holds
/// ([`crate::messaging::settings::DEFAULT_PUBLISH_WINDOW`]), so one round fills the window and
/// pays the broker's confirm latency (it confirms persistent messages once they are on disk, a
/// few milliseconds) once for the whole window. With 256 rows a round the relay managed about
/// 2,500 events/s on the benchmark machine, waiting on confirms; a round of 1024 rows is still
/// well under a megabyte of memory and one short `UPDATE`.
pub const BATCH_SIZE: i64 = 1024;

/// When nothing is pending, the relay also looks once a second, in case a writer forgot to
/// [`notify`](OutboxRelay::notify) (or another process wrote the row).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// First delay after a failed round; the broker being away is the usual reason, and publishes
/// already wait for a reconnect for the operation timeout, so retries need not be eager.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest delay between failed rounds: the backlog goes out within seconds of the broker's return.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long sent rows are kept for inspection before they are pruned.
const KEEP_SENT: Duration = Duration::from_secs(3600);
/// How often sent rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The statement that writes an outbox row ([`sqlite::enqueue_message`]); its parameters are
/// [`Columns`]' fields in order.
const ENQUEUE: &str = "INSERT INTO outbox \
     (message_id, event_type, version, correlation_id, data, traceparent, tracestate) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// Marks the rows whose ids are in the JSON array parameter sent, all in one statement.
const MARK_SENT: &str = "UPDATE outbox SET sent_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
     WHERE id IN (SELECT value FROM json_each(?))";

/// Deletes rows sent before the parameter's offset from now (`-3600 seconds`).
const PRUNE_SENT: &str = "DELETE FROM outbox WHERE sent_at IS NOT NULL \
     AND sent_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)";

/// An outbox row's columns as [`ENQUEUE`] binds them.
struct Columns<'a> {
    message_id: String,
    event_type: &'a str,
    version: i64,
    correlation_id: Option<&'a str>,
    data: &'a str,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl<'a> Columns<'a> {
    /// The row of `message`, its trace context as text.
    fn of(message: &'a OutgoingMessage) -> Result<Self, std::str::Utf8Error> {
        let (traceparent, tracestate) = message
            .trace
            .as_ref()
            .map_or((None, None), trace_context::to_text);
        Ok(Self {
            message_id: message.message_id.to_string(),
            event_type: &message.event_type,
            version: i64::from(message.version),
            correlation_id: message.correlation_id.as_deref(),
            data: std::str::from_utf8(&message.data)?,
            traceparent,
            tracestate,
        })
    }
}

/// Rows not yet confirmed by the broker (for readiness details and tests).
///
/// # Errors
/// Database failure.
pub async fn pending(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT count(*) AS n FROM outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await?
        .try_get("n")
}

/// How often the relay reads the backlog gauges (`outbox_pending_rows`, the oldest row's age):
/// once a second is finer than any scrape interval and costs one indexed query.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// An unsent outbox row as the relay reads it.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// The row's position in the outbox (rows are published in this order).
    pub id: i64,
    /// The message to publish.
    pub message: OutgoingMessage,
}

/// The unsent part of an outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogSize {
    /// Rows not yet confirmed by the broker.
    pub pending: i64,
    /// Age of the oldest of them in seconds (0 when none).
    pub oldest_age_secs: f64,
}

/// The relay's access to an outbox table: one implementation per database backend
/// ([`SqliteOutbox`] here), while the relay's flow (rounds in order, only the confirmed prefix
/// marked sent, backoff, the pruning schedule) stays in [`OutboxRelay`], above this trait.
pub trait OutboxStorage: std::fmt::Debug + Send + Sync + 'static {
    /// Up to `limit` unsent rows, oldest first.
    ///
    /// # Errors
    /// Database failure, or a row that does not decode.
    fn unsent(&self, limit: i64) -> BoxFuture<'_, Result<Vec<PendingRow>, DatabaseError>>;
    /// Marks the rows `ids` sent, all in one statement.
    ///
    /// # Errors
    /// Database failure.
    fn mark_sent<'a>(&'a self, ids: &'a [i64]) -> BoxFuture<'a, Result<(), DatabaseError>>;
    /// How many rows are unsent and how old the oldest is.
    ///
    /// # Errors
    /// Database failure.
    fn backlog(&self) -> BoxFuture<'_, Result<BacklogSize, DatabaseError>>;
    /// Deletes rows sent more than `keep` ago.
    ///
    /// # Errors
    /// Database failure.
    fn prune_sent(&self, keep: Duration) -> BoxFuture<'_, Result<(), DatabaseError>>;
}

/// [`OutboxStorage`] on a SQLite [`Database`]: reads from its pool, writes with
/// [`Database::write`].
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    db: Database,
}

impl SqliteOutbox {
    /// The outbox table of `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

fn undecodable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DatabaseError {
    DatabaseError::new(error, false)
}

/// Decodes an outbox row as either backend's `unsent` query selects it (`id, message_id,
/// event_type, version, correlation_id, data, traceparent, tracestate`): one decoder for both, so
/// the backends cannot drift apart in what a row means.
pub(crate) fn pending_row<'r, R>(row: &'r R) -> Result<PendingRow, DatabaseError>
where
    R: Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let message_id: String = row.try_get("message_id")?;
    let data: String = row.try_get("data")?;
    Ok(PendingRow {
        id: row.try_get("id")?,
        message: OutgoingMessage {
            message_id: Uuid::parse_str(&message_id).map_err(undecodable)?,
            event_type: row.try_get("event_type")?,
            version: u32::try_from(row.try_get::<i64, _>("version")?).map_err(undecodable)?,
            correlation_id: row.try_get("correlation_id")?,
            data: Bytes::from(data),
            trace: trace_context::from_text(
                row.try_get::<Option<String>, _>("traceparent")?.as_deref(),
                row.try_get::<Option<String>, _>("tracestate")?.as_deref(),
            ),
        },
    })
}

impl OutboxStorage for SqliteOutbox {
    fn unsent(&self, limit: i64) -> BoxFuture<'_, Result<Vec<PendingRow>, DatabaseError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, message_id, event_type, version, correlation_id, data, traceparent, \
                 tracestate FROM outbox \
                 WHERE sent_at IS NULL ORDER BY id LIMIT ?",
            )
            .bind(limit)
            .fetch_all(self.db.pool())
            .await?;
            rows.iter().map(pending_row).collect()
        })
    }

    fn mark_sent<'a>(&'a self, ids: &'a [i64]) -> BoxFuture<'a, Result<(), DatabaseError>> {
        Box::pin(async move {
            let ids = serde_json::to_string(ids).map_err(undecodable)?;
            self.db
                .write(move |tx| tx.prepare_cached(MARK_SENT)?.execute([ids]))
                .await?;
            Ok(())
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<BacklogSize, DatabaseError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT count(*) AS n, \
                 coalesce((julianday('now') - julianday(min(created_at))) * 86400.0, 0.0) AS age \
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
            let offset = format!("-{} seconds", keep.as_secs());
            self.db
                .write(move |tx| tx.prepare_cached(PRUNE_SENT)?.execute([offset]))
                .await?;
            Ok(())
        })
    }
}

/// Publishes pending outbox rows in order, marking them sent after the confirm.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    storage: Arc<dyn OutboxStorage>,
    publisher: Publisher,
    wake: Arc<Notify>,
    backlog: Backlog,
}

/// The outbox's backlog as last read by the relay.
#[derive(Debug, Clone, Default)]
struct Backlog {
    pending: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
}

/// What one round achieved.
enum Round {
    /// Nothing was pending.
    Idle,
    /// Every row read was published; `full` when the batch was full (more may be waiting).
    Published { full: bool },
    /// Some row failed; the rows before it were marked sent.
    Failed(String),
}

impl OutboxRelay {
    /// A relay over `db`'s outbox publishing through `publisher`.
    pub fn new(db: Database, publisher: Publisher) -> Self {
        Self::with_storage(Arc::new(SqliteOutbox::new(db)), publisher)
    }

    /// A relay over the outbox in `storage` (any backend) publishing through `publisher`.
    pub fn with_storage(storage: Arc<dyn OutboxStorage>, publisher: Publisher) -> Self {
        Self {
            storage,
            publisher,
            wake: Arc::new(Notify::new()),
            backlog: Backlog::default(),
        }
    }

    /// Registers the backlog gauges in `metrics`: `outbox_pending_rows` and
    /// `outbox_oldest_pending_age_seconds` (0 when nothing is pending), read every second while
    /// the relay runs.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        metrics.register(
            "outbox_pending_rows",
            "Outbox rows not yet confirmed by the broker",
            self.backlog.pending.clone(),
        );
        metrics.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox row not yet confirmed by the broker (0 when none)",
            self.backlog.oldest_age.clone(),
        );
    }

    /// Reads the backlog into the gauges.
    async fn measure(&self) -> Result<(), DatabaseError> {
        let backlog = self.storage.backlog().await?;
        self.backlog.pending.set(backlog.pending);
        self.backlog.oldest_age.set(backlog.oldest_age_secs);
        Ok(())
    }

    /// Wakes the relay at once (call after committing a transaction that enqueued).
    pub fn notify(&self) {
        // `notify_one` keeps a permit when the relay is busy, so a wake-up is never lost.
        self.wake.notify_one();
    }

    /// Runs until `shutdown`: publishes what is pending in batches, marks the confirmed prefix
    /// of each batch sent, backs off while publishing fails, and otherwise waits for
    /// [`notify`](Self::notify) or the [`POLL_INTERVAL`].
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0_u32;
        let mut last_prune: Option<Instant> = None;
        let mut last_measured: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            let round = tokio::select! {
                () = shutdown.cancelled() => break,
                round = self.round() => round,
            };
            if last_measured.is_none_or(|at| at.elapsed() >= GAUGES_EVERY) {
                last_measured = Some(Instant::now());
                if let Err(error) = self.measure().await {
                    tracing::debug!(error = %error, "cannot measure the outbox backlog");
                }
            }
            let pause = match round {
                Ok(Round::Published { full: true }) => {
                    failures = 0;
                    continue;
                }
                Ok(Round::Published { full: false } | Round::Idle) => {
                    failures = 0;
                    if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                        last_prune = Some(Instant::now());
                        if let Err(error) = self.prune().await {
                            tracing::warn!(error = %error, "cannot prune sent outbox rows");
                        }
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                    continue;
                }
                Ok(Round::Failed(error)) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        error,
                        attempt = failures,
                        "outbox publish failed; will retry"
                    );
                    backoff(failures)
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %error, attempt = failures, "cannot read the outbox; will retry");
                    backoff(failures)
                }
            };
            // Wake-ups are ignored while backing off: requests keep notifying while the broker is
            // away, and they must not turn the backoff into a busy loop.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Publishes one batch and marks the confirmed prefix sent.
    async fn round(&self) -> Result<Round, DatabaseError> {
        let rows = self.storage.unsent(BATCH_SIZE).await?;
        if rows.is_empty() {
            return Ok(Round::Idle);
        }
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= BATCH_SIZE;
        let (ids, messages): (Vec<i64>, Vec<OutgoingMessage>) =
            rows.into_iter().map(|row| (row.id, row.message)).unzip();
        // The publish log lines carry the first row's correlation ID; each message carries its own.
        let id = messages
            .first()
            .and_then(|m| m.correlation_id.as_deref())
            .and_then(CorrelationId::parse)
            .unwrap_or_default();
        let results = correlation::scope(id, self.publisher.publish_batch(messages)).await;
        // Only the prefix up to the first failure is marked sent, so rows go out in order; a later
        // row that did get through is sent again next round and deduplicated by its consumer.
        // Every row whose confirm arrived is marked in one statement.
        let confirmed = results.iter().take_while(|r| r.is_ok()).count();
        if confirmed > 0 {
            self.storage.mark_sent(&ids[..confirmed]).await?;
        }
        match results.into_iter().find_map(Result::err) {
            Some(error) => Ok(Round::Failed(error.to_string())),
            None => Ok(Round::Published { full }),
        }
    }

    async fn prune(&self) -> Result<(), DatabaseError> {
        self.storage.prune_sent(KEEP_SENT).await
    }
}

/// Capped exponential backoff with full jitter.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(2_u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;
    use crate::events::PriceChanged;
    use crate::money::Money;

    #[tokio::test]
    async fn an_enqueued_event_waits_unsent_in_the_outbox() {
        let database = db::connect(
            "sqlite::memory:",
            &[
                (1, "outbox", MIGRATION),
                (2, "outbox trace context", TRACE_CONTEXT_MIGRATION),
            ],
        )
        .await
        .expect("opens");
        let event = PriceChanged {
            sku: "MG-07".to_owned(),
            price: Money(1250),
            currency: "EUR".to_owned(),
            version: 1,
        };
        let enqueued = event.clone();
        database
            .write(move |tx| sqlite::enqueue(tx, &enqueued))
            .await
            .expect("enqueues");
        assert_eq!(pending(database.pool()).await.expect("counts"), 1);
        let row = sqlx::query("SELECT event_type, data FROM outbox")
            .fetch_one(database.pool())
            .await
            .expect("reads");
        assert_eq!(row.get::<String, _>("event_type"), "price.changed");
        let data: PriceChanged =
            serde_json::from_str(&row.get::<String, _>("data")).expect("payload");
        assert_eq!(data, event);
    }

    #[tokio::test]
    async fn sent_rows_leave_the_backlog_and_are_pruned_only_once_old() {
        let database = db::connect(
            "sqlite::memory:",
            &[
                (1, "outbox", MIGRATION),
                (2, "outbox trace context", TRACE_CONTEXT_MIGRATION),
            ],
        )
        .await
        .expect("opens");
        database
            .write(|tx| {
                for sku in ["MG-07", "BK-12", "HD-44"] {
                    let event = PriceChanged {
                        sku: sku.to_owned(),
                        price: Money(1250),
                        currency: "EUR".to_owned(),
                        version: 1,
                    };
                    sqlite::enqueue(tx, &event)?;
                }
                Ok::<_, rusqlite::Error>(())
            })
            .await
            .expect("enqueues");
        let storage = SqliteOutbox::new(database.clone());

        let unsent = storage.unsent(BATCH_SIZE).await.expect("reads");
        let ids: Vec<i64> = unsent.iter().map(|row| row.id).collect();
        assert_eq!(unsent.len(), 3);
        assert!(ids.is_sorted(), "oldest first");
        storage.mark_sent(&ids[..2]).await.expect("marks");
        assert_eq!(storage.backlog().await.expect("reads").pending, 1);
        let oldest = ids[0];
        database
            .write(move |tx| {
                tx.execute(
                    "UPDATE outbox SET sent_at = '2000-01-01T00:00:00.000Z' WHERE id = ?",
                    [oldest],
                )
            })
            .await
            .expect("ages a row");

        storage.prune_sent(KEEP_SENT).await.expect("prunes");

        let left: Vec<i64> = sqlx::query("SELECT id FROM outbox ORDER BY id")
            .fetch_all(database.pool())
            .await
            .expect("reads")
            .iter()
            .map(|row| row.get("id"))
            .collect();
        assert_eq!(left, ids[1..], "only the row sent long ago is pruned");
    }

    #[test]
    fn relay_backoff_is_capped() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= BACKOFF_CAP);
        }
    }
}
