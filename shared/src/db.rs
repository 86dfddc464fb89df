//! SQLite storage: one database file per service (a private temporary file for tests), WAL, a
//! busy timeout, foreign keys, a small pool for reads, one writer, and migrations embedded in the
//! binary.
//!
//! SQLite allows one writer at a time, so a [`Database`] has exactly one: a thread of its own
//! (`db/writer.rs`) holding a rusqlite connection, which runs each write transaction whole, handed to
//! it as a closure ([`Database::write`]). Writers queue for it first come first served instead of
//! several connections racing for the file's write lock and sleeping in SQLite's busy handler
//! (1, 2, 5, 10 … 100 ms) when they lose. Through sqlx every statement is a round trip to the
//! connection's worker thread (a channel send, a wake-up, a reply); a transaction of `BEGIN`,
//! five statements and `COMMIT` was seven of them, and on the writer thread it is one
//! (docs/decisions/0410-sqlite-writer-thread.md). Reads stay on sqlx's pool; in WAL mode they
//! never wait for the writer.
//!
//! A request whose deadline passes is dropped mid-await. A closure cannot be stopped halfway: the
//! thread runs it to `COMMIT` (on `Ok`) or `ROLLBACK` (on `Err` or a panic) whatever its caller
//! does, so a cancelled write is all or nothing by construction, and a job whose caller is gone
//! before it starts is not run at all.
//!
//! A transaction that reads and then writes starts as a reader and must upgrade its lock; SQLite
//! may refuse that upgrade with `SQLITE_BUSY` at once, bypassing the busy timeout, when another
//! process writes the same file. Write transactions therefore start with `BEGIN IMMEDIATE`, which
//! takes the write lock up front and waits politely for it.

mod writer;

use std::borrow::Cow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::SqlitePool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::config::{ConfigError, Env};
use writer::WriterThread;
pub use writer::{WRITE_GROUP, WRITE_QUEUE};

/// How long a connection waits for another's lock before giving up with `SQLITE_BUSY`: every
/// transaction here takes milliseconds, so 5 s only runs out when something is badly stuck, and
/// it stays within a request's budget.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections of a file database (the writer thread's connection comes on top): WAL lets readers
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

impl From<rusqlite::Error> for DatabaseError {
    /// Transient for SQLite's `BUSY` and `LOCKED` (the write lock not granted within
    /// [`BUSY_TIMEOUT`], a table locked by another connection), as for sqlx's errors.
    fn from(error: rusqlite::Error) -> Self {
        let transient = matches!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        Self::new(error, transient)
    }
}

/// Why [`Database::write`] did not commit. Nothing of the transaction was kept in either case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    /// The closure returned this error, and the transaction was rolled back.
    #[error(transparent)]
    Aborted(E),
    /// The database failed: the write lock was not granted within [`BUSY_TIMEOUT`] (transient),
    /// `BEGIN` or `COMMIT` failed, the closure panicked (rolled back), or the database is closed
    /// (transient).
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl<E: From<DatabaseError>> WriteError<E> {
    /// The closure's error, or the database's converted into the closure's error type: for a
    /// store whose error enum wraps [`DatabaseError`],
    /// `db.write(...).await.map_err(WriteError::flatten)?`.
    pub fn flatten(self) -> E {
        match self {
            Self::Aborted(error) => error,
            Self::Database(error) => E::from(error),
        }
    }
}

impl<E: Into<DatabaseError>> From<WriteError<E>> for DatabaseError {
    /// A closure whose errors are database errors (`rusqlite::Error`, [`DatabaseError`]) fails
    /// a store call with `?` directly.
    fn from(error: WriteError<E>) -> Self {
        match error {
            WriteError::Aborted(error) => error.into(),
            WriteError::Database(error) => error,
        }
    }
}

/// A column value both SQLite drivers decode: `String`, `i64`, `u32`, `bool`, `f64` and their
/// `Option`s (every type that implements sqlx's and rusqlite's decoding both).
pub trait ColumnValue:
    for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + rusqlite::types::FromSql
{
}

impl<T> ColumnValue for T where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + rusqlite::types::FromSql
{
}

/// A SQLite row read by column name, whichever driver read it: sqlx's on the read pool, rusqlite's
/// inside a [`Database::write`] transaction (a `RETURNING` clause, a read before a write). A
/// store decodes each of its row types in one function over `&impl Columns`, so its reads and
/// its write transactions cannot come to disagree about a row's format.
pub trait Columns {
    /// The value of the column `name`.
    ///
    /// # Errors
    /// No such column, or a stored value of another type (a [`DatabaseError`] that is not
    /// transient: the row is corrupt or the query wrong).
    fn value<T: ColumnValue>(&self, name: &str) -> Result<T, DatabaseError>;
}

impl Columns for sqlx::sqlite::SqliteRow {
    fn value<T: ColumnValue>(&self, name: &str) -> Result<T, DatabaseError> {
        Ok(sqlx::Row::try_get(self, name)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn value<T: ColumnValue>(&self, name: &str) -> Result<T, DatabaseError> {
        Ok(self.get(name)?)
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
    /// `SQLITE_WRITE_GROUP`: the most waiting writes one `COMMIT` takes (see [`Database::write`]);
    /// 1 commits every write on its own.
    pub write_group: usize,
}

impl DbSettings {
    /// Reads `DATABASE_URL` (default `sqlite://data/<service>.db`, relative to the working
    /// directory), `SQLITE_SYNCHRONOUS` (`NORMAL` or `FULL`, default `NORMAL`) and
    /// `SQLITE_WRITE_GROUP` (1 to [`WRITE_QUEUE`], default [`WRITE_GROUP`]).
    ///
    /// # Errors
    /// [`ConfigError`] for a `DATABASE_URL` that is neither `sqlite:` nor `postgres://` (so a
    /// typo fails at startup, naming the variable), an unknown `SQLITE_SYNCHRONOUS`, or a
    /// `SQLITE_WRITE_GROUP` out of range.
    pub fn from_env(env: &Env, service: &str) -> Result<Self, ConfigError> {
        let url = env.string_or("DATABASE_URL", &format!("sqlite://data/{service}.db"));
        crate::pg::Backend::of(&url)?;
        let write_group = env.parse_or("SQLITE_WRITE_GROUP", WRITE_GROUP)?;
        if !(1..=WRITE_QUEUE).contains(&write_group) {
            return Err(ConfigError {
                key: "SQLITE_WRITE_GROUP".to_owned(),
                value: write_group.to_string(),
                reason: format!("must be between 1 and {WRITE_QUEUE}"),
            });
        }
        Ok(Self {
            url,
            durability: env.parse_or("SQLITE_SYNCHRONOUS", Durability::Normal)?,
            write_group,
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
/// `sqlite::memory:`, see [`connect_with`]) with WAL, a busy timeout, a read pool and a writer
/// thread, and runs
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
        write_group: WRITE_GROUP,
    };
    connect_with(&settings, migrations).await
}

/// [`connect`] with explicit [`DbSettings`].
///
/// An in-memory URL (`sqlite::memory:`, `mode=memory`) opens a private temporary file instead, in
/// [`std::env::temp_dir`] under a name of its own, deleted when the last clone of the
/// [`Database`] is dropped: the writer thread's connection cannot share an in-memory database
/// with sqlx's, and tests then keep their isolation and run the same WAL and writer path as
/// production. (Keep the [`Database`], not only a clone of its pool, for as long as the data is
/// needed.)
///
/// # Errors
/// Connection or migration failure, or the writer thread cannot open its connection.
pub async fn connect_with(
    settings: &DbSettings,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<Database, sqlx::Error> {
    let in_memory = settings.url.contains(":memory:") || settings.url.contains("mode=memory");
    let temporary = in_memory.then(TemporaryFile::new);
    let options = match &temporary {
        Some(file) => SqliteConnectOptions::new().filename(&file.path),
        None => SqliteConnectOptions::from_str(&settings.url)?,
    }
    .create_if_missing(true)
    .journal_mode(SqliteJournalMode::Wal)
    .synchronous(match settings.durability {
        Durability::Normal => SqliteSynchronous::Normal,
        Durability::Full => SqliteSynchronous::Full,
    })
    .busy_timeout(BUSY_TIMEOUT)
    .foreign_keys(true);
    // `create_if_missing` creates the file, not its directory (`data/` by default).
    if let Some(parent) = options.get_filename().parent()
        && !parent.as_os_str().is_empty()
    {
        tokio::fs::create_dir_all(parent).await?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        // A ping before every checkout guards against a server that hung up while the
        // connection sat idle; an embedded database cannot hang up, and each ping is a round
        // trip to sqlx's worker thread on every query of the hot path.
        .test_before_acquire(false)
        .connect_with(options.clone())
        .await?;
    migrate(&pool, migrations).await?;
    let thread = WriterThread::start(
        options.get_filename(),
        settings.durability,
        settings.write_group,
    )
    .await
    .map_err(|error| sqlx::Error::Io(std::io::Error::other(error)))?;
    Ok(Database {
        pool,
        shared: Arc::new(Shared {
            thread,
            _temporary: temporary,
        }),
    })
}

/// A service's database: a pool for reads and one writer thread. Cheap to clone; the writer
/// thread stops (and a temporary file is deleted) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    shared: Arc<Shared>,
}

/// What the clones of a [`Database`] share and the last one ends.
#[derive(Debug)]
struct Shared {
    thread: WriterThread,
    /// Held for its `Drop`; declared after the thread, so the thread's handle is dropped (and
    /// the thread told to stop) first.
    _temporary: Option<TemporaryFile>,
}

/// The private file behind an in-memory URL, deleted (with its WAL and shared-memory files)
/// when dropped. A connection still open to it keeps working on the unlinked file.
#[derive(Debug)]
struct TemporaryFile {
    path: PathBuf,
}

impl TemporaryFile {
    fn new() -> Self {
        let name = format!("shared-db-{}.db", uuid::Uuid::new_v4());
        Self {
            path: std::env::temp_dir().join(name),
        }
    }

    /// The database file and SQLite's companions to it.
    fn paths(&self) -> [PathBuf; 3] {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let mut shm = self.path.clone().into_os_string();
        shm.push("-shm");
        [self.path.clone(), wal.into(), shm.into()]
    }
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        for path in self.paths() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "cannot delete a temporary database file");
                }
            }
        }
    }
}

impl Database {
    /// The read pool: `sqlx::query(...).fetch_one(db.pool())`. Writes go through
    /// [`Database::write`], not through the pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Runs `work` as one write transaction on the writer thread: its statements take effect
    /// when it returns `Ok` and are rolled back when it returns `Err` or panics. The whole
    /// transaction is one hand-off to the thread and one back, so `work` is synchronous rusqlite
    /// code (`tx.prepare_cached(sql)?.execute(params)?`) that should do nothing but the
    /// transaction's statements: no waiting on the network, no awaiting. It runs in the caller's
    /// tracing span and correlation ID, so [`crate::outbox::sqlite::enqueue`] captures both. It
    /// must not end the transaction itself (`COMMIT`, `ROLLBACK`), nor change the connection's
    /// settings, nor rely on deferred constraints (see below).
    ///
    /// Group commit: writes already waiting when the thread takes the next one (at most
    /// [`DbSettings::write_group`], default [`WRITE_GROUP`]) run one after another, in queue order, inside one `BEGIN IMMEDIATE
    /// … COMMIT`, each in a `SAVEPOINT` of its own: a write that fails or panics is rolled back to
    /// its savepoint alone, and each caller is answered only once the shared `COMMIT` has
    /// succeeded (or with its failure, when it failed: then nothing of the group is stored). A
    /// lone write never waits for company. Serially, each write sees the ones before it, exactly
    /// as if each had committed on its own; only a deferred constraint (checked at `COMMIT`)
    /// could make one write fail the others, and no schema here declares one.
    ///
    /// Cancellation: dropping the returned future never leaves a transaction open or half
    /// applied. A transaction not yet started when its caller is gone is skipped; one already
    /// running goes on to `COMMIT` or `ROLLBACK` as if the caller were still there, and the
    /// next write starts on a clean connection.
    ///
    /// Writers wait in turn, first come first served (see [`WRITE_QUEUE`]); there is no timeout
    /// of its own, since each transaction takes a fraction of a millisecond and a request's
    /// deadline bounds the wait of a request.
    ///
    /// # Errors
    /// [`WriteError::Aborted`] with the closure's error (rolled back), or
    /// [`WriteError::Database`]: the write lock not granted within [`BUSY_TIMEOUT`] (another
    /// process holds it; transient), a failed `COMMIT`, a panic in `work`, or a closed database
    /// (transient).
    pub async fn write<F, T, E>(&self, work: F) -> Result<T, WriteError<E>>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.shared.thread.write(work).await
    }

    /// Registers the writer thread's counters in `metrics`: `database_writes_total` (write
    /// transactions) and `database_write_commits_total` (`COMMIT`s; several writes waiting
    /// together share one, so writes / commits is the mean group size).
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let stats = self.shared.thread.stats();
        metrics.register(
            "database_writes",
            "Write transactions run on the SQLite writer thread",
            stats.writes.clone(),
        );
        metrics.register(
            "database_write_commits",
            "COMMITs on the SQLite writer thread (writes waiting together share one)",
            stats.commits.clone(),
        );
    }

    /// Closes the read pool and stops the writer thread after the writes already queued; later
    /// writes fail with a transient error.
    pub async fn close(&self) {
        self.shared.thread.close().await;
        self.pool.close().await;
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
        (
            3,
            "late tags",
            "CREATE TABLE late_tags (note_id INTEGER NOT NULL \
             REFERENCES notes(id) DEFERRABLE INITIALLY DEFERRED);",
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
        insert_note(&database, "kept").await;
        assert_eq!(count(&database).await, 1);
        assert!(has_note(&database, "kept").await);
    }

    #[tokio::test]
    async fn two_in_memory_databases_are_separate() {
        let a = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let b = connect("sqlite::memory:", &[]).await.expect("opens");
        insert_note(&a, "a").await;
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
    async fn a_file_database_is_created_with_its_directory_and_migrated_once() {
        let (dir, url) = temp_url();
        let settings = DbSettings {
            url: url.clone(),
            durability: Durability::Full,
            write_group: WRITE_GROUP,
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

    async fn insert_note(database: &Database, body: &str) {
        let body = body.to_owned();
        database
            .write(move |tx| add_note(tx, &body))
            .await
            .expect("inserts");
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
    async fn a_write_polled_once_and_dropped_is_applied_whole_or_not_at_all_and_the_next_write_works()
     {
        let (dir, url) = temp_url();
        let database = connect(&url, MIGRATIONS).await.expect("opens");
        // Polled once and dropped, as a request whose deadline passes is: the job was handed to
        // the writer thread, which may skip it or be running it already.
        drop(
            database
                .write(|tx| {
                    for body in ["dropped", "dropped", "dropped"] {
                        add_note(tx, body)?;
                    }
                    Ok::<_, rusqlite::Error>(())
                })
                .now_or_never(),
        );

        insert_note(&database, "after a cancelled write").await;

        let dropped: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE body = 'dropped'")
            .fetch_one(database.pool())
            .await
            .expect("reads");
        assert!(dropped == 0 || dropped == 3, "half applied: {dropped} of 3");
        assert!(has_note(&database, "after a cancelled write").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_in_memory_database_keeps_its_data_through_rolled_back_and_abandoned_writes() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        insert_note(&database, "kept").await;
        let rolled_back = database
            .write(|tx| {
                add_note(tx, "never committed")?;
                Err::<(), _>(rusqlite::Error::QueryReturnedNoRows)
            })
            .await;
        assert!(matches!(rolled_back, Err(WriteError::Aborted(_))));
        drop(database.write(|tx| add_note(tx, "maybe")).now_or_never());

        insert_note(&database, "after").await;

        assert!(has_note(&database, "kept").await);
        assert!(has_note(&database, "after").await);
        assert!(!has_note(&database, "never committed").await);
    }

    /// Holds the writer thread inside a write (it stores the note "held") until the returned gate
    /// is sent to, so the writes queued meanwhile wait behind it (and are taken as one group);
    /// returns the held write's handle and the gate.
    async fn hold_writer(
        database: &Database,
    ) -> (
        tokio::task::JoinHandle<Result<(), WriteError<rusqlite::Error>>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel();
        let held = {
            let database = database.clone();
            tokio::spawn(async move {
                database
                    .write(move |tx| {
                        let _ = entered.send(());
                        let _ = gate.recv();
                        add_note(tx, "held")
                    })
                    .await
            })
        };
        inside.await.expect("the held write runs");
        (held, open)
    }

    async fn wait_queued(database: &Database, count: usize) {
        while database.shared.thread.queued() < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn stats(database: &Database) -> (u64, u64) {
        let stats = database.shared.thread.stats();
        (stats.writes.get(), stats.commits.get())
    }

    #[tokio::test]
    async fn writes_waiting_together_share_one_commit_and_one_that_fails_or_panics_is_undone_alone()
    {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let (held, open) = hold_writer(&database).await;
        let write = |body: &'static str, fails: Option<bool>| {
            let database = database.clone();
            tokio::spawn(async move {
                database
                    .write(move |tx| {
                        add_note(tx, body)?;
                        match fails {
                            None => Ok(()),
                            Some(false) => Err(rusqlite::Error::QueryReturnedNoRows),
                            Some(true) => panic!("a write that panics"),
                        }
                    })
                    .await
            })
        };
        let kept = write("kept", None);
        wait_queued(&database, 1).await;
        let failed = write("failed", Some(false));
        wait_queued(&database, 2).await;
        let panicked = write("panicked", Some(true));
        wait_queued(&database, 3).await;
        let after = write("after", None);
        wait_queued(&database, 4).await;
        open.send(()).expect("releases the held write");

        assert!(held.await.expect("joins").is_ok());
        assert!(kept.await.expect("joins").is_ok());
        assert!(matches!(
            failed.await.expect("joins"),
            Err(WriteError::Aborted(_))
        ));
        assert!(matches!(
            panicked.await.expect("joins"),
            Err(WriteError::Database(e)) if e.to_string().contains("a write that panics")
        ));
        assert!(after.await.expect("joins").is_ok());
        for (body, stored) in [
            ("held", true),
            ("kept", true),
            ("failed", false),
            ("panicked", false),
            ("after", true),
        ] {
            assert_eq!(has_note(&database, body).await, stored, "{body}");
        }
        // The held write alone, then the four waiting behind it together.
        assert_eq!(stats(&database), (5, 2));
    }

    #[tokio::test]
    async fn with_a_write_group_of_one_every_write_commits_on_its_own() {
        let (dir, url) = temp_url();
        let settings = DbSettings {
            url,
            durability: Durability::Normal,
            write_group: 1,
        };
        let database = connect_with(&settings, MIGRATIONS).await.expect("opens");
        let (held, open) = hold_writer(&database).await;
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let database = database.clone();
                tokio::spawn(async move { database.write(|tx| add_note(tx, "alone")).await })
            })
            .collect();
        wait_queued(&database, 3).await;
        open.send(()).expect("releases the held write");
        assert!(held.await.expect("joins").is_ok());
        for write in waiting {
            assert!(write.await.expect("joins").is_ok());
        }
        assert_eq!(stats(&database), (4, 4));
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_group_whose_commit_fails_tells_every_write_in_it_and_stores_none_of_them() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let (held, open) = hold_writer(&database).await;
        let innocent = {
            let database = database.clone();
            tokio::spawn(async move { database.write(|tx| add_note(tx, "innocent")).await })
        };
        wait_queued(&database, 1).await;
        // A deferred foreign key is checked at COMMIT: this write succeeds and its group's
        // COMMIT fails.
        let dangling = {
            let database = database.clone();
            tokio::spawn(async move {
                database
                    .write(|tx| tx.execute("INSERT INTO late_tags (note_id) VALUES (42)", []))
                    .await
            })
        };
        wait_queued(&database, 2).await;
        open.send(()).expect("releases the held write");

        assert!(held.await.expect("joins").is_ok());
        for outcome in [
            innocent.await.expect("joins").map(drop),
            dangling.await.expect("joins").map(drop),
        ] {
            assert!(
                matches!(&outcome, Err(WriteError::Database(e)) if e.to_string().contains("FOREIGN KEY")),
                "{outcome:?}"
            );
        }
        assert!(!has_note(&database, "innocent").await);
        insert_note(&database, "next").await;
        assert!(has_note(&database, "next").await);
    }

    /// One decoding for rows of both drivers, as the stores use [`Columns`].
    fn decode_note(row: &impl Columns) -> Result<(i64, String, Option<String>), DatabaseError> {
        Ok((row.value("id")?, row.value("body")?, row.value("missing")?))
    }

    #[tokio::test]
    async fn a_row_decodes_the_same_from_either_driver_and_a_wrong_type_is_not_transient() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        insert_note(&database, "both").await;
        const SELECT: &str = "SELECT id, body, NULL AS missing FROM notes";

        let by_sqlx = decode_note(
            &sqlx::query(SELECT)
                .fetch_one(database.pool())
                .await
                .expect("reads"),
        )
        .expect("decodes");
        let by_rusqlite = database
            .write(|tx| tx.query_row(SELECT, [], |row| Ok(decode_note(row))))
            .await
            .expect("reads")
            .expect("decodes");
        let wrong = database
            .write(|tx| tx.query_row(SELECT, [], |row| Ok(row.value::<i64>("body"))))
            .await
            .expect("reads");

        assert_eq!(by_sqlx, (1, "both".to_owned(), None));
        assert_eq!(by_rusqlite, by_sqlx);
        let error = wrong.expect_err("text is not an integer");
        assert!(!error.is_transient(), "{error}");
        let wrong = sqlx::query(SELECT)
            .fetch_one(database.pool())
            .await
            .expect("reads")
            .value::<i64>("body");
        assert!(!wrong.expect_err("text is not an integer").is_transient());
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
    fn durability_and_write_group_are_read_from_the_environment() {
        let env = Env::from_pairs([("SQLITE_SYNCHRONOUS", "full"), ("SQLITE_WRITE_GROUP", "1")]);
        let settings = DbSettings::from_env(&env, "order").expect("valid");
        assert_eq!(settings.durability, Durability::Full);
        assert_eq!(settings.write_group, 1);
        assert_eq!(settings.url, "sqlite://data/order.db");
        let bad = Env::from_pairs([("SQLITE_SYNCHRONOUS", "sometimes")]);
        assert!(DbSettings::from_env(&bad, "order").is_err());
        for (value, reason) in [
            ("0", "between 1 and 256"),
            ("257", "between 1 and 256"),
            ("many", ""),
        ] {
            let bad = Env::from_pairs([("SQLITE_WRITE_GROUP", value)]);
            let error = DbSettings::from_env(&bad, "order").expect_err(value);
            assert_eq!(error.key, "SQLITE_WRITE_GROUP");
            assert!(error.reason.contains(reason), "{error}");
        }
        let default = DbSettings::from_env(&Env::from_pairs::<[(&str, &str); 0], _, _>([]), "o");
        assert_eq!(default.expect("valid").write_group, WRITE_GROUP);
    }

    // The writer thread (`Database::write`).

    fn add_note(tx: &rusqlite::Transaction<'_>, body: &str) -> rusqlite::Result<()> {
        tx.prepare_cached("INSERT INTO notes (body) VALUES (?)")?
            .execute([body])?;
        Ok(())
    }

    /// A file database of its own (removed by the caller with the returned directory).
    async fn file_database(durability: Durability) -> (std::path::PathBuf, Database) {
        let (dir, url) = temp_url();
        let settings = DbSettings {
            url,
            durability,
            write_group: WRITE_GROUP,
        };
        (
            dir,
            connect_with(&settings, MIGRATIONS).await.expect("opens"),
        )
    }

    #[tokio::test]
    async fn a_write_that_returns_ok_is_committed_and_its_value_returned() {
        let (dir, database) = file_database(Durability::Normal).await;

        let id = database
            .write(|tx| {
                add_note(tx, "first")?;
                add_note(tx, "second")?;
                Ok::<_, rusqlite::Error>(tx.last_insert_rowid())
            })
            .await
            .expect("commits");

        assert_eq!(id, 2);
        assert!(has_note(&database, "first").await);
        assert!(has_note(&database, "second").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_write_that_returns_err_is_rolled_back_and_its_error_returned() {
        let (dir, database) = file_database(Durability::Normal).await;

        let outcome = database
            .write(|tx| {
                add_note(tx, "rolled back")?;
                Err::<(), DatabaseError>(DatabaseError::new("the order is short", false))
            })
            .await;

        match outcome {
            Err(WriteError::Aborted(error)) => assert_eq!(error.to_string(), "the order is short"),
            other => panic!("expected the closure's error, got {other:?}"),
        }
        assert!(!has_note(&database, "rolled back").await);
        assert_eq!(count(&database).await, 0);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_write_that_panics_is_rolled_back_with_an_error_and_the_next_write_works() {
        let (dir, database) = file_database(Durability::Normal).await;

        let outcome = database
            .write(|tx| -> rusqlite::Result<()> {
                add_note(tx, "half done")?;
                panic!("a bug in the closure");
            })
            .await;
        database
            .write(|tx| add_note(tx, "after the panic"))
            .await
            .expect("the writer thread lives on");

        let error = DatabaseError::from(outcome.expect_err("a panic is an error"));
        assert!(!error.is_transient(), "the same closure would panic again");
        assert!(
            error.to_string().contains("a bug in the closure"),
            "{error}"
        );
        assert!(!has_note(&database, "half done").await);
        assert!(has_note(&database, "after the panic").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_write_whose_caller_is_dropped_mid_transaction_commits_whole_and_the_next_write_works()
     {
        let (dir, database) = file_database(Durability::Normal).await;
        let (started, has_started) = tokio::sync::oneshot::channel();
        let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
        let writer = database.clone();
        let caller = tokio::spawn(async move {
            writer
                .write(move |tx| {
                    add_note(tx, "one")?;
                    let _ = started.send(());
                    // The caller is dropped here, in the middle of the transaction.
                    let _ = wait_for_go.recv();
                    for body in ["two", "three", "four", "five"] {
                        add_note(tx, body)?;
                    }
                    Ok::<_, rusqlite::Error>(())
                })
                .await
        });
        has_started.await.expect("the transaction starts");

        caller.abort();
        assert!(caller.await.expect_err("aborted").is_cancelled());
        go.send(()).expect("the closure waits");
        database
            .write(|tx| add_note(tx, "next"))
            .await
            .expect("the next write works");

        // All of the abandoned transaction or none of it; once started it runs to COMMIT.
        assert_eq!(count(&database).await, 6);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_write_whose_caller_is_dropped_before_it_starts_is_not_run() {
        let (dir, database) = file_database(Durability::Normal).await;
        let (first, go) = hold_writer(&database).await;

        // Queued behind the first, polled once and dropped, as a request whose deadline passes.
        assert!(
            database
                .write(|tx| add_note(tx, "abandoned"))
                .now_or_never()
                .is_none()
        );
        go.send(()).expect("the held write waits");
        first.await.expect("joins").expect("commits");
        database
            .write(|tx| add_note(tx, "next"))
            .await
            .expect("the next write works");

        assert!(has_note(&database, "held").await);
        assert!(!has_note(&database, "abandoned").await);
        assert!(has_note(&database, "next").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_from_many_tasks_are_serialised_and_all_applied() {
        let (dir, database) = file_database(Durability::Normal).await;
        database
            .write(|tx| tx.execute("INSERT INTO notes (id, body) VALUES (1, '0')", []))
            .await
            .expect("seeds");
        // Each reads the counter and writes it back plus one: two transactions interleaving would
        // lose increments.
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let database = database.clone();
                tokio::spawn(async move {
                    database
                        .write(|tx| {
                            let n: String =
                                tx.query_row("SELECT body FROM notes WHERE id = 1", [], |row| {
                                    row.get(0)
                                })?;
                            let next = n.parse::<i64>().unwrap_or(-1_000) + 1;
                            tx.execute(
                                "UPDATE notes SET body = ? WHERE id = 1",
                                [next.to_string()],
                            )?;
                            add_note(tx, "one more")
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("joins").expect("commits");
        }

        let body: String = sqlx::query_scalar("SELECT body FROM notes WHERE id = 1")
            .fetch_one(database.pool())
            .await
            .expect("reads");
        assert_eq!(body, "64");
        assert_eq!(count(&database).await, 65);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn readers_on_the_pool_see_committed_rows_while_the_writer_is_inside_a_transaction() {
        let (dir, database) = file_database(Durability::Normal).await;
        database
            .write(|tx| add_note(tx, "committed"))
            .await
            .expect("commits");
        let (started, has_started) = tokio::sync::oneshot::channel();
        let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
        let writer = database.clone();
        let open = tokio::spawn(async move {
            writer
                .write(move |tx| {
                    add_note(tx, "pending")?;
                    let _ = started.send(());
                    let _ = wait_for_go.recv();
                    Ok::<_, rusqlite::Error>(())
                })
                .await
        });
        has_started.await.expect("the transaction starts");

        // The writer holds the write lock; in WAL mode a read neither waits nor sees its rows.
        let (committed, pending) = tokio::time::timeout(Duration::from_secs(2), async {
            (
                has_note(&database, "committed").await,
                has_note(&database, "pending").await,
            )
        })
        .await
        .expect("reads do not wait for the writer");
        go.send(()).expect("the writer waits");
        open.await.expect("joins").expect("commits");

        assert!(committed);
        assert!(!pending, "an uncommitted row is not visible");
        assert!(has_note(&database, "pending").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn writer_pragma(database: &Database, name: &'static str) -> i64 {
        database
            .write(move |tx| tx.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0)))
            .await
            .expect("reads the pragma")
    }

    #[tokio::test]
    async fn the_writer_connection_has_the_settings_of_the_pool_and_the_chosen_durability() {
        for (durability, synchronous) in [(Durability::Normal, 1), (Durability::Full, 2)] {
            let (dir, database) = file_database(durability).await;

            assert_eq!(writer_pragma(&database, "synchronous").await, synchronous);
            assert_eq!(writer_pragma(&database, "foreign_keys").await, 1);
            assert_eq!(
                writer_pragma(&database, "busy_timeout").await,
                i64::try_from(BUSY_TIMEOUT.as_millis()).expect("fits")
            );
            let mode: String = database
                .write(|tx| tx.query_row("PRAGMA journal_mode", [], |row| row.get(0)))
                .await
                .expect("reads");
            assert_eq!(mode, "wal");
            database.close().await;
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[tokio::test]
    async fn foreign_keys_are_enforced_on_the_writer_thread() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let orphan = database
            .write(|tx| tx.execute("INSERT INTO tags (note_id) VALUES (42)", []))
            .await;
        let error = DatabaseError::from(orphan.expect_err("an orphan row must be refused"));
        assert!(!error.is_transient(), "a constraint violation is a bug");
    }

    #[tokio::test]
    async fn a_write_lock_held_past_the_busy_timeout_is_a_transient_error_and_the_next_write_works()
    {
        let (dir, database) = file_database(Durability::Normal).await;
        // The test's own short wait instead of BUSY_TIMEOUT, on this database's writer only.
        database
            .write(|tx| tx.busy_timeout(Duration::from_millis(100)))
            .await
            .expect("sets the busy timeout");
        // Another process's connection to the same file holds the write lock.
        let other = rusqlite::Connection::open(dir.join("nested/test.db")).expect("opens");
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO notes (body) VALUES ('by another');")
            .expect("takes the write lock");

        let busy = database.write(|tx| add_note(tx, "refused")).await;
        other.execute_batch("COMMIT").expect("commits");
        database
            .write(|tx| add_note(tx, "after the lock"))
            .await
            .expect("the lock is free again");

        let error = DatabaseError::from(busy.expect_err("the lock is held"));
        assert!(error.is_transient(), "{error}");
        assert!(!has_note(&database, "refused").await);
        assert!(has_note(&database, "by another").await);
        assert!(has_note(&database, "after the lock").await);
        database.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_closed_database_refuses_writes_with_a_transient_error() {
        let (dir, database) = file_database(Durability::Normal).await;
        database
            .write(|tx| add_note(tx, "before"))
            .await
            .expect("commits");
        database.close().await;

        let refused = database.write(|tx| add_note(tx, "after")).await;

        let error = DatabaseError::from(refused.expect_err("closed"));
        assert!(error.is_transient(), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_in_memory_database_is_a_private_file_deleted_with_the_last_clone() {
        let database = connect("sqlite::memory:", MIGRATIONS).await.expect("opens");
        let temporary = database
            .shared
            ._temporary
            .as_ref()
            .expect("a temporary file");
        let paths = temporary.paths();
        assert!(paths[0].starts_with(std::env::temp_dir()));
        database
            .write(|tx| add_note(tx, "in a file"))
            .await
            .expect("commits");
        assert!(has_note(&database, "in a file").await);
        assert!(paths[0].exists() && paths[1].exists(), "WAL mode");
        let clone = database.clone();

        drop(database);
        assert!(paths[0].exists(), "a clone still uses it");
        assert!(has_note(&clone, "in a file").await);
        drop(clone);

        for path in &paths {
            assert!(!path.exists(), "{} is left behind", path.display());
        }
    }

    #[test]
    fn sqlites_busy_and_locked_are_transient_and_other_failures_are_not() {
        let failure = |code: i32| {
            DatabaseError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert!(failure(rusqlite::ffi::SQLITE_BUSY).is_transient());
        assert!(failure(rusqlite::ffi::SQLITE_BUSY_SNAPSHOT).is_transient());
        assert!(failure(rusqlite::ffi::SQLITE_LOCKED).is_transient());
        assert!(!failure(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE).is_transient());
        assert!(!DatabaseError::from(rusqlite::Error::QueryReturnedNoRows).is_transient());
    }
}
