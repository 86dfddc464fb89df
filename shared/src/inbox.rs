//! Consumer inbox (deduplication by message ID). API SKELETON — see the messaging/storage task.

use sqlx::SqliteConnection;
use uuid::Uuid;

/// The SQL that creates the inbox table; include it in the service's migrations.
pub const MIGRATION: &str = "";

/// Records `message_id` as handled inside the caller's transaction; `false` if it already was
/// (then the caller must skip the effect and commit nothing else).
///
/// # Errors
/// Database failure.
pub async fn record(tx: &mut SqliteConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    todo!()
}
