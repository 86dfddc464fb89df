//! A PostgreSQL database per test: created with a random name on the development server, dropped
//! (`WITH (FORCE)`, closing whatever connections are left) when the handle is dropped, also when
//! the test panics. Tests therefore run in parallel and leave no database behind.

use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// The development server: trust authentication for `postgres` on 127.0.0.1. `PG_URL` overrides
/// it (a server elsewhere); the URL names the maintenance database the test databases are
/// created from.
pub const LOCAL_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server tests talk to: `PG_URL` if set, else [`LOCAL_PG_URL`].
pub fn server_url() -> String {
    std::env::var("PG_URL").unwrap_or_else(|_| LOCAL_PG_URL.to_owned())
}

/// A database of its own for one test, dropped with this handle.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    server: String,
}

impl TestDatabase {
    /// Creates an empty database named `test_<random>` on [`server_url`].
    ///
    /// # Panics
    /// When the server cannot be reached or refuses to create the database: the test cannot run.
    pub async fn create() -> Self {
        let server = server_url();
        let name = format!("test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server} is needed by this test: {e}"));
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("creates the test database");
        let _ = admin.close().await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => format!("{server}/{name}"),
        };
        Self { name, url, server }
    }

    /// The database's URL (`postgres://…/test_<random>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    /// Drops the database from a thread of its own (with a small runtime of its own), because
    /// `Drop` cannot await and the test's runtime may be a current-thread one that is busy
    /// dropping this very value.
    fn drop(&mut self) {
        let server = self.server.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server).await?;
                admin.execute(statement.as_str()).await?;
                admin.close().await
            })?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("cannot drop test database {}: {error}", self.name);
        }
    }
}
