//! SQLite storage: one database file per service (in memory for tests), WAL, a busy timeout,
//! foreign keys, a small pool for reads, one connection for writes, and migrations embedded in
//! the binary.
//!
//! SQLite allows one writer at a time, so a [`Database`] has exactly one write connection, behind
//! an async mutex: writers queue for it in tokio, first come first served, instead of several
//! pooled connections racing for the file's write lock and sleeping in SQLite's busy handler
//! (1, 2, 5, 10 … 100 ms) when they lose, which under load made most of a write's latency. The
//! write connection also skips the pool's pings (at check-out and check-in), each a round trip to
//! sqlx's worker thread. Reads use the pool; in WAL mode they never wait for the writer.
//!
//! A request whose deadline passes is dropped mid-await, and sqlx's worker still runs a statement
//! once it was sent: a `BEGIN` or `COMMIT` may land after its caller is gone. So the write
//! connection is marked "in a transaction" *before* either is sent and until `COMMIT` returns,
//! and the next writer first makes a marked connection clean (`ROLLBACK`, or a new connection
//! when there is nothing to roll back or the old one is broken).
//!
//! A transaction that reads and then writes starts as a reader and must upgrade its lock; SQLite
//! may refuse that upgrade with `SQLITE_BUSY` at once, bypassing the busy timeout, when another
//! process writes the same file. Write transactions therefore start with `BEGIN IMMEDIATE`
//! ([`Database::begin_write`]), which takes the write lock up front and waits politely for it.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::config::{ConfigError, Env};

/// How long a connection waits for another's lock before giving up with `SQLITE_BUSY`: every
/// transaction here takes milliseconds, so 5 s only runs out when something is badly stuck, and
/// it stays within a request's budget.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections of a file database (the write connection comes on top): WAL lets readers
/// run beside the writer, and a few keep 2 cores busy; more would only hold memory and files.
pub const MAX_CONNECTIONS: u32 = 4;

/// A database failure as a store reports it, whatever the backend: the cause (for logs) and
/// whether the same operation may succeed when retried shortly. Store traits and their error
/// enums carry this instead of a driver's error type, so that a caller (an HTTP error mapping, a
/// consumer deciding between retry and dead letter) never depends on which database is behind
/// the trait.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct DatabaseError {
    source: Box<dyn std::error::Error + Send + Sync>,
    transient: bool,
}

impl DatabaseError {
    /// A failure caused by `source`; `transient` when retrying shortly may succeed.
    pub fn new(
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
        transient: bool,
    ) -> Self {
        Self {
            source: source.into(),
            transient,
        }
    }

    /// Whether the database was only busy (a lock or a connection not free in time), so the
    /// operation may succeed when retried: a `503` with `Retry-After` rather than a `500`.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

impl From<sqlx::Error> for DatabaseError {
    /// Transient means retrying shortly may succeed: the pool had no connection in time, the
    /// connection to the server was lost, SQLite's `BUSY` or `LOCKED` (extended codes keep the
    /// primary code in the low byte), or one of PostgreSQL's [`transient_sqlstate`]s.
    fn from(error: sqlx::Error) -> Self {
        let transient = match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
            sqlx::Error::Database(db) => {
                match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    Some(pg) => transient_sqlstate(pg.code()),
                    None => db
                        .code()
                        .and_then(|code| code.parse::<i32>().ok())
                        .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
                }
            }
            _ => false,
        };
        Self::new(error, transient)
    }
}

/// Whether a PostgreSQL error code (SQLSTATE) means "busy or briefly away" rather than "this
/// statement is wrong": a statement cancelled by `statement_timeout` (`57014`, a lock held too
/// long), a lock not available (`55P03`), a serialization failure or deadlock (`40001`, `40P01`,
/// the server chose this transaction to roll back), too many connections (`53300`), the server
/// shutting down or starting (`57P01`–`57P03`), and every connection exception (class `08`).
/// Each of these is a `503` with `Retry-After` to a client and a retry to a consumer; anything
/// else (a constraint violated, a syntax error) stays a bug to surface.
pub fn transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "57014" | "55P03" | "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
}

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
    /// [`ConfigError`] for a `DATABASE_URL` that is neither `sqlite:` nor `postgres://` (so a
    /// typo fails at startup, naming the variable) or an unknown `SQLITE_SYNCHRONOUS`.
    pub fn from_env(env: &Env, service: &str) -> Result<Self, ConfigError> {
        let url = env.string_or("DATABASE_URL", &format!("sqlite://data/{service}.db"));
        crate::pg::Backend::of(&url)?;
        Ok(Self {
            url,
            durability: env.parse_or("SQLITE_SYNCHRONOUS", Durability::Normal)?,
        })
    }

    /// Which database [`DbSettings::url`] names.
    ///
    /// # Errors
    /// [`ConfigError`] naming `DATABASE_URL` for an unknown scheme.
    pub fn backend(&self) -> Result<crate::pg::Backend, ConfigError> {
        crate::pg::Backend::of(&self.url)
    }
}

/// Opens (creating if needed) the SQLite database at `url` (`sqlite://orders.db` or
/// `sqlite::memory:`) with WAL, a busy timeout, a read pool and a write connection, and runs
/// `migrations` (`(version, description, sql)`, embedded with `include_str!`). Commits use
/// [`Durability::Normal`]; see [`connect_with`] to choose.
///
/// # Errors
/// Connection or migration failure.
pub async fn connect(
    url: &str,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<Database, sqlx::Error> {
    let settings = DbSettings {
        url: url.to_owned(),
        durability: Durability::Normal,
    };
    connect_with(&settings, migrations).await
}

/// [`connect`] with explicit [`DbSettings`].
///
/// An in-memory database lives only as long as a connection to it, so an in-memory pool holds
/// exactly one connection that never idles out or expires, and that one connection serves the
/// writes as well (tests do not need the write connection's queueing).
///
/// # Errors
/// Connection or migration failure.
pub async fn connect_with(
    settings: &DbSettings,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<Database, sqlx::Error> {
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
    // A ping before every checkout guards against a server that hung up while the connection
    // sat idle; an embedded database cannot hang up, and each ping is a round trip to sqlx's
    // worker thread on every query of the hot path.
    .test_before_acquire(false)
    .connect_with(options.clone())
    .await?;
    migrate(&pool, migrations).await?;
    let writer = if in_memory {
        Writer::Pool
    } else {
        Writer::Dedicated(Arc::new(Mutex::new(WriteSlot {
            connection: SqliteConnection::connect_with(&options).await?,
            options,
            in_transaction: false,
        })))
    };
    Ok(Database { pool, writer })
}

/// A service's database: a pool for reads and one connection for writes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    writer: Writer,
}

#[derive(Debug, Clone)]
enum Writer {
    /// The file's one write connection.
    Dedicated(Arc<Mutex<WriteSlot>>),
    /// In memory: the pool's only connection writes too.
    Pool,
}

/// The write connection of a file database and its state.
#[derive(Debug)]
pub struct WriteSlot {
    connection: SqliteConnection,
    /// How to open a replacement.
    options: SqliteConnectOptions,
    /// A `BEGIN` was sent and no `COMMIT` or `ROLLBACK` is known to have finished: the
    /// connection may be inside a transaction, and the next writer makes it clean first.
    in_transaction: bool,
}

impl WriteSlot {
    /// Ends whatever transaction a cancelled or failed writer left open.
    async fn make_clean(&mut self) -> Result<(), sqlx::Error> {
        if sqlx::query("ROLLBACK")
            .execute(&mut self.connection)
            .await
            .is_err()
        {
            // Nothing to roll back (a cancelled COMMIT went through) or the connection is
            // broken: a new connection is clean either way, and closing the old one ends any
            // transaction it still has.
            self.connection = SqliteConnection::connect_with(&self.options).await?;
        }
        self.in_transaction = false;
        Ok(())
    }
}

impl Database {
    /// The read pool: `sqlx::query(...).fetch_one(db.pool())`. Writes go through
    /// [`Database::begin_write`] or [`Database::writer`], not through the pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The write connection, for one statement in its own (autocommit) transaction. Waits, in
    /// turn, for the writers before it; no timeout of its own, since every writer holds it for
    /// one short transaction and a request's deadline bounds the wait of a request.
    ///
    /// # Errors
    /// When a connection left unclean by a cancelled writer cannot be replaced or, in memory, no
    /// connection is available.
    pub async fn writer(&self) -> Result<WriteConnection, sqlx::Error> {
        let mut connection = match &self.writer {
            Writer::Dedicated(slot) => WriteConnection::Dedicated(slot.clone().lock_owned().await),
            Writer::Pool => WriteConnection::Pooled(self.pool.acquire().await?),
        };
        connection.make_clean().await?;
        Ok(connection)
    }

    /// Starts a write transaction with `BEGIN IMMEDIATE` on the write connection. Use it for
    /// every transaction that writes; plain reads use [`Database::pool`]. Dropped without
    /// [`WriteTransaction::commit`], the transaction is rolled back.
    ///
    /// # Errors
    /// As [`Database::writer`], and when the write lock is not granted within [`BUSY_TIMEOUT`]
    /// (another process holds it).
    pub async fn begin_write(&self) -> Result<WriteTransaction, sqlx::Error> {
        let mut connection = self.writer().await?;
        // Marked before it is sent: if this future is dropped mid-await, the BEGIN may still run.
        connection.set_in_transaction(true);
        if let Err(error) = sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *connection)
            .await
        {
            connection.set_in_transaction(false);
            return Err(error);
        }
        Ok(WriteTransaction {
            connection: Some(connection),
        })
    }

    /// Closes the read pool; the write connection closes with the last clone of the database.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The write connection, held until dropped. Derefs to the connection, so it is an executor:
/// `sqlx::query(...).execute(&mut *connection)`.
#[derive(Debug)]
pub enum WriteConnection {
    /// A file database's write connection.
    Dedicated(OwnedMutexGuard<WriteSlot>),
    /// An in-memory database's only connection.
    Pooled(PoolConnection<Sqlite>),
}

impl WriteConnection {
    fn set_in_transaction(&mut self, open: bool) {
        if let Self::Dedicated(slot) = self {
            slot.in_transaction = open;
        }
    }

    /// Ends a transaction a cancelled or failed writer may have left open. The pooled (in-memory)
    /// connection keeps no mark, so it is always rolled back, its error ("no transaction is
    /// active") ignored: one extra statement per write, in tests only.
    async fn make_clean(&mut self) -> Result<(), sqlx::Error> {
        match self {
            Self::Dedicated(slot) if slot.in_transaction => slot.make_clean().await,
            Self::Dedicated(_) => Ok(()),
            Self::Pooled(connection) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut **connection).await;
                Ok(())
            }
        }
    }
}

impl Deref for WriteConnection {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Self::Dedicated(slot) => &slot.connection,
            Self::Pooled(connection) => connection,
        }
    }
}

impl DerefMut for WriteConnection {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Self::Dedicated(slot) => &mut slot.connection,
            Self::Pooled(connection) => connection,
        }
    }
}

/// A write transaction on the write connection (`BEGIN IMMEDIATE` … `COMMIT`). Derefs to the
/// connection: `sqlx::query(...).execute(&mut *tx)`.
#[derive(Debug)]
pub struct WriteTransaction {
    /// `None` once committed.
    connection: Option<WriteConnection>,
}

impl WriteTransaction {
    /// Commits and gives the write connection to the next writer.
    ///
    /// # Errors
    /// When the commit fails; the transaction is then rolled back. (If this future is dropped
    /// instead, the COMMIT may still land: the connection stays marked until it is known clean.)
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if let Some(connection) = self.connection.as_mut() {
            sqlx::query("COMMIT").execute(&mut **connection).await?;
            connection.set_in_transaction(false);
        }
        self.connection = None;
        Ok(())
    }

    fn connection(&mut self) -> &mut WriteConnection {
        self.connection.as_mut().unwrap_or_else(|| {
            unreachable!("only `commit` takes the connection, and it consumes the transaction")
        })
    }
}

impl Deref for WriteTransaction {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.connection.as_deref().unwrap_or_else(|| {
            unreachable!("only `commit` takes the connection, and it consumes the transaction")
        })
    }
}

impl DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.connection()
    }
}

impl Drop for WriteTransaction {
    /// Not committed (an error, an early return, a cancelled request): end the transaction in a
    /// task that holds the write connection, so the write lock is given back at once and the
    /// next writer starts on a clean connection. Without a runtime (the process is ending) the
    /// connection stays marked and the next writer, if any, cleans it.
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = connection.make_clean().await {
                    tracing::warn!(%error, "cannot end an abandoned write transaction");
                }
            });
        }
    }
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
    migrator(migrations).await?.run(pool).await?;
    Ok(())
}

/// A migrator over embedded `(version, description, sql)` migrations, for either backend.
pub(crate) async fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<Migrator, sqlx::migrate::MigrateError> {
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
    Migrator::new(Embedded(resolved)).await
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
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

    fn temp_url() -> (std::path::PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("shared-db-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/nested/test.db", dir.display());
        (dir, url)
    }

    async fn count(database: &Database) -> i64 {
        sqlx::query("SELECT count(*) AS n FROM notes")
            .fetch_one(database.pool())
            .await
            .expect("reads")
            .try_get("n")
            .expect("n")
    }

    #[tokio::test]
    async fn an_in_memory_database_keeps_its_data_across_uses_of_the_pool() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let mut tx = database.begin_write().await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES ('kept')")
            .execute(&mut *tx)
            .await
            .expect("inserts");
        tx.commit().await.expect("commits");
        assert_eq!(count(&database).await, 1);
    }

    #[tokio::test]
    async fn two_in_memory_databases_are_separate() {
        let a = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let b = connect("sqlite::memory:", &[]).await.expect("opens");
        sqlx::query("INSERT INTO notes (body) VALUES ('a')")
            .execute(&mut *a.writer().await.expect("writer"))
            .await
            .expect("inserts");
        assert!(
            sqlx::query("SELECT * FROM notes")
                .fetch_all(b.pool())
                .await
                .is_err()
        );
    }

    #[test]
    fn a_database_url_of_an_unknown_scheme_fails_at_startup_naming_the_variable() {
        let env = crate::config::Env::from_pairs([("DATABASE_URL", "mysql://u:secret@h/db")]);
        let error = DbSettings::from_env(&env, "orders").expect_err("refused");
        assert_eq!(error.key, "DATABASE_URL");
        let env = crate::config::Env::from_pairs([("DATABASE_URL", "postgres://h/orders")]);
        let settings = DbSettings::from_env(&env, "orders").expect("accepted");
        assert_eq!(settings.backend().ok(), Some(crate::pg::Backend::Postgres));
        let default = DbSettings::from_env(
            &crate::config::Env::from_pairs::<[(&str, &str); 0], _, _>([]),
            "orders",
        )
        .expect("the default");
        assert_eq!(default.backend().ok(), Some(crate::pg::Backend::Sqlite));
    }

    #[tokio::test]
    async fn foreign_keys_are_enforced() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let orphan = sqlx::query("INSERT INTO tags (note_id) VALUES (42)")
            .execute(&mut *database.writer().await.expect("writer"))
            .await;
        assert!(orphan.is_err(), "an orphan row must be refused");
    }

    #[tokio::test]
    async fn a_file_database_is_created_with_its_directory_and_migrated_once() {
        let (dir, url) = temp_url();
        let settings = DbSettings {
            url: url.clone(),
            durability: Durability::Full,
        };
        let database = connect_with(&settings, MIGRATIONS).await.expect("opens");
        let mode = sqlx::query("PRAGMA journal_mode")
            .fetch_one(database.pool())
            .await
            .expect("pragma");
        assert_eq!(mode.try_get::<String, _>(0).expect("mode"), "wal");
        database.close().await;
        // Opening again runs no migration twice.
        let again = connect(&url, MIGRATIONS).await.expect("reopens");
        again.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_write_transaction_dropped_without_commit_is_rolled_back_before_the_next_writer() {
        let (dir, url) = temp_url();
        let database = connect(&url, MIGRATIONS).await.expect("opens");
        let mut abandoned = database.begin_write().await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES ('never committed')")
            .execute(&mut *abandoned)
            .await
            .expect("inserts");
        drop(abandoned);

        insert_note(&database, "committed").await;

        assert!(!has_note(&database, "never committed").await);
        assert!(has_note(&database, "committed").await);
        assert_eq!(count(&database).await, 1);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn insert_note(database: &Database, body: &str) {
        let mut tx = database.begin_write().await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES (?)")
            .bind(body)
            .execute(&mut *tx)
            .await
            .expect("inserts");
        tx.commit().await.expect("commits");
    }

    async fn has_note(database: &Database, body: &str) -> bool {
        sqlx::query("SELECT 1 FROM notes WHERE body = ?")
            .bind(body)
            .fetch_optional(database.pool())
            .await
            .expect("reads")
            .is_some()
    }

    #[tokio::test]
    async fn a_begin_cancelled_mid_flight_leaves_the_write_connection_usable() {
        let (dir, url) = temp_url();
        let database = connect(&url, MIGRATIONS).await.expect("opens");
        // Polled once and dropped, as a request whose deadline passes is: the BEGIN was sent to
        // sqlx's worker and still runs, after its caller is gone.
        drop(database.begin_write().now_or_never());

        insert_note(&database, "after a cancelled begin").await;
        sqlx::query("INSERT INTO notes (body) VALUES ('autocommit')")
            .execute(&mut *database.writer().await.expect("writer"))
            .await
            .expect("inserts");

        assert!(has_note(&database, "after a cancelled begin").await);
        assert!(has_note(&database, "autocommit").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_commit_cancelled_mid_flight_leaves_the_write_connection_usable() {
        let (dir, url) = temp_url();
        let database = connect(&url, MIGRATIONS).await.expect("opens");
        let mut tx = database.begin_write().await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES ('maybe committed')")
            .execute(&mut *tx)
            .await
            .expect("inserts");
        // The COMMIT may land after its caller is gone (then the clean-up finds nothing to roll
        // back); either way, the writers after it must work.
        drop(tx.commit().now_or_never());

        for i in 0..3 {
            insert_note(&database, &format!("later {i}")).await;
        }

        for i in 0..3 {
            assert!(has_note(&database, &format!("later {i}")).await);
        }
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_in_memory_write_transaction_dropped_without_commit_keeps_the_database() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        insert_note(&database, "kept").await;
        let mut abandoned = database.begin_write().await.expect("begins");
        sqlx::query("INSERT INTO notes (body) VALUES ('never committed')")
            .execute(&mut *abandoned)
            .await
            .expect("inserts");
        drop(abandoned);
        drop(database.begin_write().now_or_never());

        insert_note(&database, "after").await;

        assert!(has_note(&database, "kept").await);
        assert!(has_note(&database, "after").await);
        assert!(!has_note(&database, "never committed").await);
    }

    #[tokio::test]
    async fn concurrent_read_modify_write_transactions_queue_for_the_writer_and_lose_no_update() {
        let (dir, url) = temp_url();
        let database = connect(&url, MIGRATIONS).await.expect("opens");
        sqlx::query("INSERT INTO notes (id, body) VALUES (1, '0')")
            .execute(&mut *database.writer().await.expect("writer"))
            .await
            .expect("seeds");
        // Each task reads the counter and writes it back plus one, with a yield in between: two
        // writers interleaving would lose increments.
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let database = database.clone();
                tokio::spawn(async move {
                    let mut tx = database.begin_write().await.expect("begins");
                    let n: String = sqlx::query("SELECT body FROM notes WHERE id = 1")
                        .fetch_one(&mut *tx)
                        .await
                        .expect("reads")
                        .get("body");
                    tokio::task::yield_now().await;
                    let next = n.parse::<i64>().expect("a number") + 1;
                    sqlx::query("UPDATE notes SET body = ? WHERE id = 1")
                        .bind(next.to_string())
                        .execute(&mut *tx)
                        .await
                        .expect("writes");
                    tx.commit().await.expect("commits");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("the task completes");
        }
        let body: String = sqlx::query("SELECT body FROM notes WHERE id = 1")
            .fetch_one(database.pool())
            .await
            .expect("reads")
            .get("body");
        assert_eq!(body, "50");
        assert_eq!(count(&database).await, 1);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_busy_database_is_transient_and_a_broken_one_is_not() {
        assert!(DatabaseError::from(sqlx::Error::PoolTimedOut).is_transient());
        let broken = DatabaseError::from(sqlx::Error::Protocol("bad frame".to_owned()));
        assert!(!broken.is_transient());
        assert_eq!(
            broken.to_string(),
            "encountered unexpected or invalid data: bad frame"
        );
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
