//! The writer thread of a SQLite database: one rusqlite connection that runs whole write
//! transactions handed to it as closures, so a transaction costs one hand-off to the thread and
//! one back, however many statements it runs.
//!
//! ```text
//!  caller task ──(job: closure + oneshot)──▶ bounded queue ──▶ writer thread
//!                                                              BEGIN IMMEDIATE
//!                                                              closure(&tx)   (caller's span and
//!                                                              COMMIT | ROLLBACK correlation ID)
//!  caller task ◀──────────── oneshot: Result<T, WriteError<E>> ◀┘
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::{BUSY_TIMEOUT, DatabaseError, Durability, WriteError};
use crate::correlation;
use crate::messaging::metrics;

/// Jobs that may wait for the writer thread before callers of [`super::Database::write`] wait in
/// turn to hand theirs over. Waiting outside the queue costs nothing and ends with the caller
/// (a request past its deadline simply stops waiting), while a job inside the queue is taken by
/// the thread; the bound keeps the closures held in memory few. 256 transactions of a fraction
/// of a millisecond each are tens of milliseconds of work, well inside any request's budget, so
/// the bound only ever holds callers back under an overload that admission control already
/// meets at the edge. Callers wait in line (tokio's bounded channel is first come first served).
pub const WRITE_QUEUE: usize = 256;

/// Statements each connection keeps prepared (`prepare_cached`): every store's write statements
/// together are a few dozen, so none is parsed again once the service is warm; a prepared
/// statement is a few kilobytes.
const STATEMENT_CACHE: usize = 64;

/// One job: runs a transaction on the thread's connection and sends its outcome back.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Command {
    Write(Job),
    /// Stop after the jobs queued before this one; answered once the connection is closed.
    Close(oneshot::Sender<()>),
}

/// The handle to a database's writer thread; the thread ends when the last handle is dropped
/// or on [`WriterThread::close`].
pub(super) struct WriterThread {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for WriterThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterThread")
            .field("closed", &self.commands.is_closed())
            .finish()
    }
}

/// The writer thread is gone (closed, or the process is ending).
#[derive(Debug, thiserror::Error)]
#[error("the database's writer is closed")]
struct WriterClosed;

/// The closure of a write transaction panicked.
#[derive(Debug, thiserror::Error)]
#[error("a write transaction panicked and was rolled back: {0}")]
struct WritePanicked(String);

fn closed() -> DatabaseError {
    // Transient, as a closed sqlx pool is: it happens while the service shuts down, when a 503
    // (or a consumer's retry elsewhere) is the right answer.
    DatabaseError::new(WriterClosed, true)
}

impl WriterThread {
    /// Opens a connection to the database file at `path` (which must exist: the read pool
    /// created and migrated it) on a new thread, and starts serving jobs.
    pub(super) async fn start(path: &Path, durability: Durability) -> Result<Self, DatabaseError> {
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE);
        let (opened, ready) = oneshot::channel();
        let path: PathBuf = path.to_owned();
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || match open(&path, durability) {
                Ok(connection) => {
                    let _ = opened.send(Ok(()));
                    serve(connection, receiver);
                }
                Err(error) => {
                    let _ = opened.send(Err(error));
                }
            })
            .map_err(|error| DatabaseError::new(error, false))?;
        ready.await.map_err(|_| closed())??;
        Ok(Self { commands })
    }

    /// Runs `work` in a write transaction on the thread; see [`super::Database::write`].
    pub(super) async fn write<F, T, E>(&self, work: F) -> Result<T, WriteError<E>>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        // The closure runs on another thread: it takes the caller's span (and the subscriber
        // that span belongs to, which a test may have set for its own thread only) and
        // correlation ID along, so what it logs, and the trace context an outbox row captures,
        // are the caller's. The duplicates the inbox recognises in it come back with the outcome,
        // for the caller's consumer to count.
        let span = tracing::Span::current();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let correlation_id = correlation::current();
        let (reply, outcome) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            // The caller is gone before its transaction started (its deadline passed while it
            // waited): nothing has happened yet, and nothing will.
            if reply.is_closed() {
                return;
            }
            let run =
                || span.in_scope(|| metrics::counting_duplicates(|| transaction(connection, work)));
            let result = tracing::dispatcher::with_default(&dispatch, || match correlation_id {
                Some(id) => correlation::sync_scope(id, run),
                None => run(),
            });
            // A caller dropped while its transaction ran is no longer listening; the transaction
            // committed or rolled back all the same.
            let _ = reply.send(result);
        });
        self.commands
            .send(Command::Write(job))
            .await
            .map_err(|_| closed())?;
        let (result, duplicates) = outcome.await.map_err(|_| closed())?;
        if duplicates > 0 {
            metrics::mark_duplicates(duplicates);
        }
        result
    }

    /// Stops the thread after the jobs already queued and closes its connection; later writes
    /// fail with a transient [`DatabaseError`].
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// The writer connection, with the same settings as the read pool's.
fn open(path: &Path, durability: Durability) -> Result<Connection, DatabaseError> {
    // No CREATE: the pool created the file; no mutex: only this thread uses the connection.
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "foreign_keys", true)?;
    connection.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        },
    )?;
    let mode: String =
        connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DatabaseError::new(
            format!("the writer connection runs in journal mode {mode}, not WAL"),
            false,
        ));
    }
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(connection)
}

/// The thread's loop: one job at a time, in order, until every handle is dropped or closed.
fn serve(mut connection: Connection, mut commands: mpsc::Receiver<Command>) {
    while let Some(command) = commands.blocking_recv() {
        match command {
            Command::Write(job) => {
                job(&mut connection);
                // Every job ends its transaction; one whose closure ended it itself and began
                // another must not hand an open transaction to the next.
                if !connection.is_autocommit()
                    && let Err(error) = connection.execute_batch("ROLLBACK")
                {
                    tracing::warn!(%error, "cannot end a transaction a writer left open");
                }
            }
            Command::Close(done) => {
                // Jobs queued after the close are dropped unrun: their callers see the writer
                // closed.
                drop(commands);
                if let Err((_, error)) = connection.close() {
                    tracing::warn!(%error, "cannot close the writer connection");
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

/// `BEGIN IMMEDIATE`, `work`, then `COMMIT` when it returns `Ok` and `ROLLBACK` when it returns
/// `Err` or panics.
fn transaction<F, T, E>(connection: &mut Connection, work: F) -> Result<T, WriteError<E>>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E>,
{
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(DatabaseError::from)?;
    // Unwind safety: whatever the closure left half done is inside `tx`, which is rolled back;
    // the connection itself stays consistent (SQLite keeps no state a Rust panic can tear).
    match catch_unwind(AssertUnwindSafe(|| work(&tx))) {
        Ok(Ok(value)) => {
            // A failed COMMIT drops `tx`, which rolls back.
            tx.commit().map_err(DatabaseError::from)?;
            Ok(value)
        }
        Ok(Err(error)) => {
            roll_back(tx);
            Err(WriteError::Aborted(error))
        }
        Err(panic) => {
            roll_back(tx);
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            // Not transient: the same closure would panic again.
            Err(WriteError::Database(DatabaseError::new(
                WritePanicked(message),
                false,
            )))
        }
    }
}

fn roll_back(tx: Transaction<'_>) {
    if let Err(error) = tx.rollback() {
        // The connection is checked for an open transaction after every job.
        tracing::warn!(%error, "cannot roll back a write transaction");
    }
}
