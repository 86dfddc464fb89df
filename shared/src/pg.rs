//! PostgreSQL storage: a connection pool per service, migrations embedded in the binary and
//! serialised across replicas, and a connection that is retried in the background until the
//! server answers.
//!
//! A service keeps its state in PostgreSQL when its `DATABASE_URL` starts with `postgres://` (see
//! [`Backend::of`]); several processes of one service may then share the database. What makes
//! them correct together lives in the statements of each store (conditional updates, unique
//! keys, `ON CONFLICT`, `RETURNING`), not here: this module only opens the pool.
//!
//! ```text
//!   start ──► lazy pool ──► migrate (advisory lock) ──► ready
//!                 ▲               │ server away
//!                 └── backoff ◄───┘   (/readyz says why)
//! ```
//!
//! sqlx's migrator takes a PostgreSQL advisory lock for the whole run, so replicas started at
//! once apply each migration exactly once: the second waits for the first and then finds
//! nothing to do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// Connections per process. Replicas share one server whose default `max_connections` is 100:
/// three services × two replicas × 10 stay well under it with room for the relays' leader
/// connections and an operator's `psql`; every statement here takes milliseconds, so 10 keep
/// 2 cores busy and more would only queue on the server instead of in the pool.
pub const MAX_CONNECTIONS: u32 = 10;

/// The longest one statement may run before the server cancels it. Every statement of the
/// stores takes milliseconds; one still running after 5 s waits on a lock that something stuck
/// holds, and it fails inside a request's budget instead of holding a connection indefinitely.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for a free pooled connection: longer than a burst of short
/// transactions needs, short enough that an exhausted pool answers `503` within a request's
/// budget instead of hanging it.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// First delay between failed attempts to reach the server and migrate at startup.
const RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest delay between attempts: a server that comes back is used within seconds.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// Which database a `DATABASE_URL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://…` or `sqlite::memory:`: one embedded file per process.
    Sqlite,
    /// `postgres://…` or `postgresql://…`: a server several replicas share.
    Postgres,
}

impl Backend {
    /// The backend `url`'s scheme names.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `DATABASE_URL` for any other scheme.
    pub fn of(url: &str) -> Result<Self, ConfigError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(ConfigError {
                key: "DATABASE_URL".to_owned(),
                // Only the scheme: the rest may hold a password.
                value: format!("{scheme}:…"),
                reason: "expected a sqlite:// or postgres:// URL".to_owned(),
            }),
        }
    }
}

/// A service's PostgreSQL database: a pool, and whether its migrations have been applied. Cheap
/// to clone.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    pool: PgPool,
    state: Arc<Mutex<Readiness>>,
}

#[derive(Debug, Clone)]
enum Readiness {
    /// Not migrated yet; the last attempt's error, if one failed.
    Starting(Option<String>),
    Ready,
}

fn options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let timeout = format!("{}ms", STATEMENT_TIMEOUT.as_millis());
    Ok(url
        .parse::<PgConnectOptions>()?
        .options([("statement_timeout", timeout.as_str())]))
}

fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

impl PgDatabase {
    /// Connects to `url` and applies `migrations` (`(version, description, sql)`, embedded with
    /// `include_str!`) before returning: for tests and tools, which want a usable database or
    /// an error at once.
    ///
    /// # Errors
    /// The URL is invalid, the server cannot be reached, or a migration fails.
    pub async fn connect(
        url: &str,
        migrations: &[(i64, &'static str, &'static str)],
    ) -> Result<Self, sqlx::Error> {
        let pool = pool_options().connect_with(options(url)?).await?;
        migrate(&pool, migrations).await?;
        Ok(Self {
            pool,
            state: Arc::new(Mutex::new(Readiness::Ready)),
        })
    }

    /// Opens a pool to `url` without waiting for the server, and applies `migrations` in a
    /// background task that retries with capped, jittered backoff until it succeeds or
    /// `shutdown` is cancelled. Until then [`PgDatabase::ping`] fails with the reason, so
    /// `/readyz` says why the service is not ready and the process keeps running.
    ///
    /// # Errors
    /// Only an invalid URL; an unreachable server is retried.
    pub fn start(
        url: &str,
        migrations: &'static [(i64, &'static str, &'static str)],
        shutdown: CancellationToken,
    ) -> Result<Self, sqlx::Error> {
        let pool = pool_options().connect_lazy_with(options(url)?);
        let database = Self {
            pool,
            state: Arc::new(Mutex::new(Readiness::Starting(None))),
        };
        let migrating = database.clone();
        tokio::spawn(async move {
            let mut attempt = 0_u32;
            loop {
                match migrate(&migrating.pool, migrations).await {
                    Ok(()) => {
                        migrating.set(Readiness::Ready);
                        tracing::info!("database migrated");
                        return;
                    }
                    Err(error) => {
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(%error, attempt, "cannot reach or migrate the database; will retry");
                        migrating.set(Readiness::Starting(Some(error.to_string())));
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        });
        Ok(database)
    }

    fn set(&self, readiness: Readiness) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = readiness;
    }

    /// The pool: `sqlx::query(...).fetch_one(db.pool())`, `db.pool().begin()`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool once the migrations have been applied; until then a transient
    /// [`DatabaseError`](crate::db::DatabaseError) saying why, so a request that arrives while
    /// the server is still away is a `503` with `Retry-After` rather than a `500` about a
    /// missing table. Stores take their connections through this.
    ///
    /// # Errors
    /// Not migrated yet (transient).
    pub fn ready_pool(&self) -> Result<&PgPool, crate::db::DatabaseError> {
        let readiness = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match readiness {
            Readiness::Ready => Ok(&self.pool),
            Readiness::Starting(why) => Err(crate::db::DatabaseError::new(
                format!(
                    "database not migrated yet: {}",
                    why.as_deref().unwrap_or("connecting")
                ),
                true,
            )),
        }
    }

    /// Checks the database is migrated and answers (readiness).
    ///
    /// # Errors
    /// [`sqlx::Error::Io`] (`NotConnected`) with the last connection or migration error while the
    /// migrations have not been applied yet; the server's error when it does not answer.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        let readiness = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Readiness::Starting(why) = readiness {
            let why = match why {
                Some(error) => format!("not migrated yet: {error}"),
                None => "not migrated yet: connecting".to_owned(),
            };
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                why,
            )));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn migrate(
    pool: &PgPool,
    migrations: &[(i64, &'static str, &'static str)],
) -> Result<(), sqlx::Error> {
    // `run` holds `pg_advisory_lock` for its whole duration: replicas migrate one at a time.
    crate::db::migrator(migrations).await?.run(pool).await?;
    Ok(())
}

/// Capped exponential backoff with full jitter.
fn backoff(attempt: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(2_u32.saturating_pow(attempt.min(16)))
        .min(RETRY_CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::postgres::TestDatabase;

    const MIGRATIONS: &[(i64, &str, &str)] = &[(
        1,
        "notes",
        "CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL);",
    )];

    #[test]
    fn the_backend_is_chosen_by_the_url_scheme_and_anything_else_names_the_variable() {
        assert_eq!(Backend::of("sqlite::memory:").ok(), Some(Backend::Sqlite));
        assert_eq!(
            Backend::of("sqlite://data/x.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(Backend::of("postgres://h/db").ok(), Some(Backend::Postgres));
        assert_eq!(
            Backend::of("postgresql://h/db").ok(),
            Some(Backend::Postgres)
        );
        let error = Backend::of("mysql://root:secret@h/db").expect_err("refused");
        assert_eq!(error.key, "DATABASE_URL");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[tokio::test]
    async fn replicas_migrating_at_once_apply_each_migration_once() {
        let test = TestDatabase::create().await;
        let (a, b, c) = tokio::join!(
            PgDatabase::connect(test.url(), MIGRATIONS),
            PgDatabase::connect(test.url(), MIGRATIONS),
            PgDatabase::connect(test.url(), MIGRATIONS),
        );
        let a = a.expect("migrates");
        b.expect("migrates");
        c.expect("migrates");
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(a.pool())
            .await
            .expect("reads");
        assert_eq!(applied, 1);
    }

    #[tokio::test]
    async fn statements_run_under_the_statement_timeout() {
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), MIGRATIONS)
            .await
            .expect("opens");
        let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(database.pool())
            .await
            .expect("reads");
        assert_eq!(timeout, "5s");
    }

    #[tokio::test]
    async fn a_statement_timeout_is_transient_and_a_constraint_violation_is_not() {
        use crate::db::DatabaseError;
        let test = TestDatabase::create().await;
        let database = PgDatabase::connect(test.url(), MIGRATIONS)
            .await
            .expect("opens");
        let mut tx = database.pool().begin().await.expect("begins");
        sqlx::query("SET LOCAL statement_timeout = '20ms'")
            .execute(&mut *tx)
            .await
            .expect("sets");
        let timed_out = sqlx::query("SELECT pg_sleep(2)")
            .execute(&mut *tx)
            .await
            .expect_err("cancelled by the server");
        assert!(DatabaseError::from(timed_out).is_transient());
        drop(tx);

        let duplicate = sqlx::query("INSERT INTO notes (id, body) VALUES (1, 'a'), (1, 'b')")
            .execute(database.pool())
            .await
            .expect_err("a primary key violated");
        assert!(!DatabaseError::from(duplicate).is_transient());
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_is_transient() {
        let pool = pool_options()
            .acquire_timeout(Duration::from_millis(300))
            .connect_lazy_with(options("postgres://postgres@127.0.0.1:1/none").expect("valid"));
        let error = sqlx::query("SELECT 1")
            .execute(&pool)
            .await
            .expect_err("nothing listens on port 1");
        assert!(crate::db::DatabaseError::from(error).is_transient());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried_and_readiness_says_why() {
        let shutdown = CancellationToken::new();
        // Port 1 refuses connections on every machine.
        let database = PgDatabase::start(
            "postgres://postgres@127.0.0.1:1/none",
            MIGRATIONS,
            shutdown.clone(),
        )
        .expect("a valid URL");
        crate::testing::assert_eventually("readiness names the failed connection", || {
            let database = database.clone();
            async move {
                database.ping().await.is_err_and(|e| {
                    let why = e.to_string();
                    why.contains("not migrated yet: while executing migrations")
                })
            }
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn until_migrated_the_pool_is_refused_with_a_transient_error() {
        let shutdown = CancellationToken::new();
        let database = PgDatabase::start(
            "postgres://postgres@127.0.0.1:1/none",
            MIGRATIONS,
            shutdown.clone(),
        )
        .expect("a valid URL");
        let refused = database.ready_pool().expect_err("not migrated");
        assert!(refused.is_transient());
        assert!(
            refused.to_string().contains("not migrated yet"),
            "{refused}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_started_database_becomes_ready_once_migrated() {
        let test = TestDatabase::create().await;
        let shutdown = CancellationToken::new();
        let database =
            PgDatabase::start(test.url(), MIGRATIONS, shutdown.clone()).expect("a valid URL");
        crate::testing::assert_eventually("the database is ready", || {
            let database = database.clone();
            async move { database.ping().await.is_ok() }
        })
        .await;
        shutdown.cancel();
        database.close().await;
    }
}
