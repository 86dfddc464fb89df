//! Consumer inbox: deduplication by message ID, recorded in the same transaction as the effect.
//!
//! Delivery is at least once, so a consumer may see a message twice. Recording the ID and
//! applying the effect in one transaction makes the pair atomic: either both happened (and a
//! redelivery is skipped) or neither did (and the redelivery does the work).
//!
//! This module is the SQLite inbox; [`postgres`] is the same on PostgreSQL.

pub mod postgres;

use sqlx::SqliteConnection;
use uuid::Uuid;

/// The SQL that creates the inbox table; include it in the service's migrations. Rows are kept:
/// a message may be redriven from a DLQ days later and must still be recognised.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY NOT NULL,
    handled_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

/// Records `message_id` as handled inside the caller's transaction; `false` if it already was
/// (then the caller must skip the effect and commit nothing else).
///
/// # Errors
/// Database failure.
pub async fn record(tx: &mut SqliteConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id) VALUES (?) ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id.to_string())
    .execute(tx)
    .await?;
    let first = inserted.rows_affected() == 1;
    if !first {
        // Counted as `duplicate` in `messaging_deliveries_total` by the consumer running this.
        crate::messaging::metrics::mark_duplicate();
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;

    #[tokio::test]
    async fn a_message_id_is_recorded_once() {
        let database = db::connect("sqlite::memory:", &[(1, "inbox", MIGRATION)])
            .await
            .expect("opens");
        let id = Uuid::new_v4();
        let mut tx = database.begin_write().await.expect("begins");
        assert!(record(&mut tx, id).await.expect("records"));
        assert!(!record(&mut tx, id).await.expect("records"));
        tx.commit().await.expect("commits");
        let mut tx = database.begin_write().await.expect("begins");
        assert!(!record(&mut tx, id).await.expect("records"));
        assert!(record(&mut tx, Uuid::new_v4()).await.expect("records"));
    }
}
