//! SQLite storage: one database file per service (in memory for tests), WAL, a busy timeout,
//! foreign keys, a small pool, and migrations embedded in the binary.
//!
//! SQLite allows one writer at a time. A transaction that reads and then writes starts as a
//! reader and must upgrade its lock; two such transactions can each hold a read lock while
//! waiting for the other, and SQLite breaks that tie by failing one with `SQLITE_BUSY` at once
//! (the busy timeout does not help). Write transactions therefore start with [`begin_write`]
//! (`BEGIN IMMEDIATE`), which takes the write lock up front and waits politely for it.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::config::{ConfigError, Env};

/// How long a connection waits for another's lock before giving up with `SQLITE_BUSY`: every
/// transaction here takes milliseconds, so 5 s only runs out when something is badly stuck, and
/// it stays within a request's budget.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections of a file database: SQLite has one writer at a time, and WAL lets a few readers
/// run beside it; more connections would only queue on the write lock (the machine has 2 cores).
pub const MAX_CONNECTIONS: u32 = 4;

/// How durable a commit is (`SQLITE_SYNCHRONOUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL` (default): with WAL, a commit survives a process crash or `kill -9`;
    /// the last commits may be lost on power loss or an OS crash. Much faster than `Full`.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is fsynced and survives power loss too.
    Full,
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_uppercase().as_str() {
            "NORMAL" => Ok(Self::Normal),
            "FULL" => Ok(Self::Full),
            _ => Err("expected NORMAL or FULL".to_owned()),
        }
    }
}

/// Where the database is and how durable commits are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbSettings {
    /// `DATABASE_URL`: `sqlite://data/orders.db`, or `sqlite::memory:` for tests.
    pub url: String,
    /// `SQLITE_SYNCHRONOUS`.
    pub durability: Durability,
}

impl DbSettings {
    /// Reads `DATABASE_URL` (default `sqlite://data/<service>.db`, relative to the working
    /// directory) and `SQLITE_SYNCHRONOUS` (`NORMAL` or `FULL`, default `NORMAL`).
    ///
    /// # Errors
    /// [`ConfigError`] for an unknown `SQLITE_SYNCHRONOUS`.
    pub fn from_env(env: &Env, service: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            url: env.string_or("DATABASE_URL", &format!("sqlite://data/{service}.db")),
            durability: env.parse_or("SQLITE_SYNCHRONOUS", Durability::Normal)?,
        })
    }
}

/// Opens (creating if needed) the SQLite database at `url` (`sqlite://orders.db` or
/// `sqlite::memory:`) with WAL, a busy timeout and a small pool, and runs `migrations`
/// (`(version, description, sql)`, embedded with `include_str!`). Commits use
/// [`Durability::Normal`]; see [`connect_with`] to choose.
///
/// # Errors
/// Connection or migration failure.
pub async fn connect(
    url: &str,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<SqlitePool, sqlx::Error> {
    let settings = DbSettings {
        url: url.to_owned(),
        durability: Durability::Normal,
    };
    connect_with(&settings, migrations).await
}

/// [`connect`] with explicit [`DbSettings`].
///
/// An in-memory database lives only as long as a connection to it, and every in-memory
/// connection is a database of its own; so an in-memory pool holds exactly one connection that
/// never idles out or expires.
///
/// # Errors
/// Connection or migration failure.
pub async fn connect_with(
    settings: &DbSettings,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<SqlitePool, sqlx::Error> {
    let in_memory = settings.url.contains(":memory:") || settings.url.contains("mode=memory");
    let options = SqliteConnectOptions::from_str(&settings.url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match settings.durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        })
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = if in_memory {
        SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        // `create_if_missing` creates the file, not its directory (`data/` by default).
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            tokio::fs::create_dir_all(parent).await?;
        }
        SqlitePoolOptions::new().max_connections(MAX_CONNECTIONS)
    }
    .connect_with(options)
    .await?;
    migrate(&pool, migrations).await?;
    Ok(pool)
}

/// Starts a write transaction with `BEGIN IMMEDIATE`: it takes the write lock at once (waiting
/// up to [`BUSY_TIMEOUT`] for it) instead of upgrading a read lock later, which SQLite may refuse
/// with `SQLITE_BUSY`. Use it for every transaction that writes, plain `pool.begin()` for reads.
///
/// # Errors
/// When no connection is available or the lock is not granted in time.
pub async fn begin_write(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Migrations built at run time from embedded SQL (no `migrate!` macro, which needs sqlx's
/// `macros` feature and a build-time directory).
#[derive(Debug)]
struct Embedded(Vec<Migration>);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

async fn migrate(
    pool: &SqlitePool,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<(), sqlx::Error> {
    let mut resolved: Vec<Migration> = migrations
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            )
        })
        .collect();
    resolved.sort_by_key(|m| m.version);
    Migrator::new(Embedded(resolved)).await?.run(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    const MIGRATIONS: &[(i64, &str, &str)] = &[
        (
            1,
            "notes",
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
        ),
        (
            2,
            "tags",
            "CREATE TABLE tags (note_id INTEGER NOT NULL REFERENCES notes(id));",
        ),
    ];

    #[tokio::test]
    async fn an_in_memory_database_keeps_its_data_across_uses_of_the_pool() {
        let pool = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let mut tx = begin_write(&pool).await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES ('kept')")
            .execute(&mut *tx)
            .await
            .expect("inserts");
        tx.commit().await.expect("commits");
        let row = sqlx::query("SELECT count(*) AS n FROM notes")
            .fetch_one(&pool)
            .await
            .expect("reads");
        assert_eq!(row.try_get::<i64, _>("n").expect("n"), 1);
    }

    #[tokio::test]
    async fn two_in_memory_databases_are_separate() {
        let a = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let b = connect("sqlite::memory:", &[]).await.expect("opens");
        sqlx::query("INSERT INTO notes (body) VALUES ('a')")
            .execute(&a)
            .await
            .expect("inserts");
        assert!(
            sqlx::query("SELECT * FROM notes")
                .fetch_all(&b)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn foreign_keys_are_enforced() {
        let pool = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let orphan = sqlx::query("INSERT INTO tags (note_id) VALUES (42)")
            .execute(&pool)
            .await;
        assert!(orphan.is_err(), "an orphan row must be refused");
    }

    #[tokio::test]
    async fn a_file_database_is_created_with_its_directory_and_migrated_once() {
        let dir = std::env::temp_dir().join(format!("shared-db-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/nested/test.db", dir.display());
        let settings = DbSettings {
            url: url.clone(),
            durability: Durability::Full,
        };
        let pool = connect_with(&settings, MIGRATIONS).await.expect("opens");
        let mode = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .expect("pragma");
        assert_eq!(mode.try_get::<String, _>(0).expect("mode"), "wal");
        pool.close().await;
        // Opening again runs no migration twice.
        let again = connect(&url, MIGRATIONS).await.expect("reopens");
        again.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn durability_is_read_from_the_environment() {
        let env = Env::from_pairs([("SQLITE_SYNCHRONOUS", "full")]);
        let settings = DbSettings::from_env(&env, "order").expect("valid");
        assert_eq!(settings.durability, Durability::Full);
        assert_eq!(settings.url, "sqlite://data/order.db");
        let bad = Env::from_pairs([("SQLITE_SYNCHRONOUS", "sometimes")]);
        assert!(DbSettings::from_env(&bad, "order").is_err());
    }
}
