//! SQLite storage helpers. API SKELETON — see the messaging/storage task.

use sqlx::SqlitePool;

/// Opens (creating if needed) the SQLite database at `url` (`sqlite://orders.db` or
/// `sqlite::memory:`) with WAL, a busy timeout and a small pool, and runs `migrations`
/// (`(version, description, sql)`, embedded with `include_str!`).
///
/// # Errors
/// Connection or migration failure.
pub async fn connect(
    url: &str,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<SqlitePool, sqlx::Error> {
    todo!()
}
