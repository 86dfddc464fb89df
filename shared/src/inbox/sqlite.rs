//! The SQLite inbox, inside a [`Database::write`](crate::db::Database::write) transaction on the
//! writer thread (rusqlite).

use rusqlite::Transaction;
use uuid::Uuid;

/// The statement that records a message ID: one row inserted when the ID is new, none when it
/// was already recorded.
const RECORD: &str =
    "INSERT INTO inbox (message_id) VALUES (?) ON CONFLICT (message_id) DO NOTHING";

/// Records `message_id` as handled inside the caller's transaction; `false` if it already was
/// (then the caller must skip the effect and commit nothing else).
///
/// # Errors
/// Database failure.
pub fn record(tx: &Transaction<'_>, message_id: Uuid) -> rusqlite::Result<bool> {
    let first = tx
        .prepare_cached(RECORD)?
        .execute([message_id.to_string()])?
        == 1;
    if !first {
        // Counted as `duplicate` in `messaging_deliveries_total` for the consumer running this
        // (the writer thread hands the count back to the caller's task).
        crate::messaging::metrics::mark_duplicate();
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{self, DatabaseError};

    #[tokio::test]
    async fn a_message_id_is_recorded_once_and_a_duplicate_is_false() {
        let database = db::connect("sqlite::memory:", &[(1, "inbox", super::super::MIGRATION)])
            .await
            .expect("opens");
        let id = Uuid::new_v4();
        let first = database
            .write(move |tx| Ok::<_, DatabaseError>((record(tx, id)?, record(tx, id)?)))
            .await
            .expect("records");
        assert_eq!(first, (true, false));
        let (again, other) = database
            .write(move |tx| Ok::<_, DatabaseError>((record(tx, id)?, record(tx, Uuid::new_v4())?)))
            .await
            .expect("records");
        assert!(!again, "the committed id is still recorded");
        assert!(other, "another id is new");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(database.pool())
            .await
            .expect("counts");
        assert_eq!(rows, 2);
    }

    #[tokio::test]
    async fn a_duplicate_recognised_on_the_writer_thread_is_counted_for_the_consumer_handling_it() {
        let database = db::connect("sqlite::memory:", &[(1, "inbox", super::super::MIGRATION)])
            .await
            .expect("opens");
        let (seen, known) = (Uuid::new_v4(), Uuid::new_v4());
        database
            .write(move |tx| record(tx, seen))
            .await
            .expect("records");

        let (first, duplicates) = crate::messaging::metrics::watching_duplicates(async {
            database
                .write(move |tx| {
                    Ok::<_, DatabaseError>((
                        record(tx, seen)?,
                        record(tx, known)?,
                        record(tx, known)?,
                    ))
                })
                .await
        })
        .await;

        assert_eq!(first.expect("records"), (false, true, false));
        assert_eq!(duplicates, 2);
    }
}
