//! Consumer inbox: deduplication by message ID, recorded in the same transaction as the effect.
//!
//! Delivery is at least once, so a consumer may see a message twice. Recording the ID and
//! applying the effect in one transaction makes the pair atomic: either both happened (and a
//! redelivery is skipped) or neither did (and the redelivery does the work).
//!
//! This module is the SQLite inbox for sqlx write transactions ([`crate::db::Database::begin_write`]);
//! [`sqlite`] is the same inside a [`crate::db::Database::write`] transaction, and [`postgres`] on
//! PostgreSQL.

pub mod postgres;
pub mod sqlite;

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

/// The statement that records a message ID, one for both SQLite drivers so they cannot drift:
/// one row inserted when the ID is new, none when it was already recorded.
const RECORD: &str =
    "INSERT INTO inbox (message_id) VALUES (?) ON CONFLICT (message_id) DO NOTHING";

/// Records `message_id` as handled inside the caller's transaction; `false` if it already was
/// (then the caller must skip the effect and commit nothing else).
///
/// # Errors
/// Database failure.
pub async fn record(tx: &mut SqliteConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(RECORD)
        .bind(message_id.to_string())
        .execute(tx)
        .await?;
    Ok(recorded(inserted.rows_affected()))
}

/// Whether `inserted` rows of [`RECORD`] mean a message seen for the first time; counts a
/// duplicate.
fn recorded(inserted: u64) -> bool {
    let first = inserted == 1;
    if !first {
        // Counted as `duplicate` in `messaging_deliveries_total` by the consumer running this.
        crate::messaging::metrics::mark_duplicate();
    }
    first
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
