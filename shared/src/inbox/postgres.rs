//! The consumer inbox on PostgreSQL: the same contract as the SQLite one, for replicas that
//! compete on one queue.
//!
//! Two replicas may hold the same message at once (a redelivery after a lost ack reaches the
//! other replica while the first still works on it). Both insert its ID; the primary key makes
//! the second insert wait for the first transaction, and `ON CONFLICT DO NOTHING` then reports
//! "already handled" once the first commits (or inserts, if the first rolled back). So exactly
//! one of them applies the effect.

use sqlx::PgConnection;
use uuid::Uuid;

/// The SQL that creates the inbox table; include it in the service's PostgreSQL migrations.
/// Rows are kept, as on SQLite: a message redriven from a DLQ days later is still recognised.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY NOT NULL,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// Records `message_id` as handled inside the caller's transaction; `false` if it already was
/// (then the caller must skip the effect and commit nothing else).
///
/// # Errors
/// Database failure.
pub async fn record(tx: &mut PgConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id.to_string())
    .execute(tx)
    .await?;
    let first = inserted.rows_affected() == 1;
    if !first {
        crate::messaging::metrics::mark_duplicate();
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PgDatabase;
    use crate::testing::postgres::TestDatabase;

    #[tokio::test]
    async fn a_message_id_is_recorded_once() {
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), &[(1, "inbox", MIGRATION)])
            .await
            .expect("opens");
        let id = Uuid::new_v4();
        let mut tx = database.pool().begin().await.expect("begins");
        assert!(record(&mut tx, id).await.expect("records"));
        assert!(!record(&mut tx, id).await.expect("records"));
        tx.commit().await.expect("commits");
        let mut tx = database.pool().begin().await.expect("begins");
        assert!(!record(&mut tx, id).await.expect("records"));
        assert!(record(&mut tx, Uuid::new_v4()).await.expect("records"));
    }

    #[tokio::test]
    async fn two_replicas_handling_one_message_at_once_apply_it_once() {
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), &[(1, "inbox", MIGRATION)])
            .await
            .expect("opens");
        let id = Uuid::new_v4();
        let mut first = database.pool().begin().await.expect("begins");
        assert!(record(&mut first, id).await.expect("records"));
        // The second replica's insert waits on the first's uncommitted row.
        let pool = database.pool().clone();
        let second = tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begins");
            let recorded = record(&mut tx, id).await.expect("records");
            tx.commit().await.expect("commits");
            recorded
        });
        crate::testing::assert_eventually(
            "the second insert waits on the first's row lock",
            || {
                let pool = database.pool().clone();
                async move {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|waiting| waiting == 1)
                }
            },
        )
        .await;
        assert!(!second.is_finished());
        first.commit().await.expect("commits");
        assert!(
            !second.await.expect("runs"),
            "the second replica skips the effect"
        );
    }
}
