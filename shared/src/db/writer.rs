//! The writer thread of a SQLite database: one rusqlite connection that runs whole write
//! transactions handed to it as closures, so a transaction costs one hand-off to the thread and
//! one back, however many statements it runs. Transactions that are already waiting when the
//! thread takes the next one share one `COMMIT` (group commit): each runs in a savepoint of its
//! own, so one that fails is undone alone, and each caller hears back only after the `COMMIT`.
//!
//! ```text
//!  caller tasks ──(job: closure + oneshot)──▶ bounded queue ──▶ writer thread
//!                                                              BEGIN IMMEDIATE
//!                                                              for each job waiting (≤ 16,
//!                                                              SQLITE_WRITE_GROUP):
//!                                                                SAVEPOINT write
//!                                                                closure(&tx)  (caller's span,
//!                                                                RELEASE | ROLLBACK TO  corr. ID)
//!                                                              COMMIT
//!  caller tasks ◀──────────── oneshot: Result<T, WriteError<E>> ◀┘ (after the COMMIT)
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
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

/// The most transactions one group commit takes by default (see [`serve`];
/// `SQLITE_WRITE_GROUP` sets it). Each transaction of this
/// system is tens of microseconds of statements, so a full group delays its first caller's answer
/// by about a millisecond while saving up to fifteen commits; the bound keeps that delay small
/// when a burst has queued hundreds.
pub const WRITE_GROUP: usize = 16;

/// One job: runs its closure inside the group's transaction, in a savepoint of its own, and
/// returns how to answer its caller once the group's `COMMIT` has succeeded or failed (`None`
/// when the caller was already gone and nothing ran).
type Job = Box<dyn GroupJob>;

/// Sends a job's outcome, given how its group's `COMMIT` went.
type Answer = Box<dyn FnOnce(Result<(), &DatabaseError>) + Send>;

enum Command {
    Write(Job),
    /// Stop after the jobs queued before this one; answered once the connection is closed.
    Close(oneshot::Sender<()>),
}

/// The handle to a database's writer thread; the thread ends when the last handle is dropped
/// or on [`WriterThread::close`].
pub(super) struct WriterThread {
    commands: mpsc::Sender<Command>,
    stats: WriteStats,
}

/// What a writer thread has done: `writes / commits` is the mean group size.
#[derive(Debug, Clone, Default)]
pub(super) struct WriteStats {
    /// Write transactions run (a caller gone before its turn is not counted).
    pub(super) writes: Counter,
    /// Groups run, one `BEGIN … COMMIT` (or its rollback) each.
    pub(super) commits: Counter,
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
    pub(super) async fn start(
        path: &Path,
        durability: Durability,
        max_group: usize,
    ) -> Result<Self, DatabaseError> {
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE);
        let (opened, ready) = oneshot::channel();
        let path: PathBuf = path.to_owned();
        let stats = WriteStats::default();
        let counted = stats.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || match open(&path, durability) {
                Ok(connection) => {
                    let _ = opened.send(Ok(()));
                    serve(connection, receiver, max_group, &counted);
                }
                Err(error) => {
                    let _ = opened.send(Err(error));
                }
            })
            .map_err(|error| DatabaseError::new(error, false))?;
        ready.await.map_err(|_| closed())??;
        Ok(Self { commands, stats })
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
        let job: Job = Box::new(Write {
            work,
            reply,
            span,
            dispatch,
            correlation_id,
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

    /// The thread's counters (shared: they go on counting).
    pub(super) fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Writes handed to the thread and not yet taken by it.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.commands.max_capacity() - self.commands.capacity()
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

/// The thread's loop: takes the next job and every job already waiting behind it (at most
/// `max_group`; never waiting for more to arrive, so a lone write is not delayed), commits them
/// as one group, answers them, and goes on until every handle is dropped or closed. Jobs run in
/// the order they were queued.
fn serve(
    mut connection: Connection,
    mut commands: mpsc::Receiver<Command>,
    max_group: usize,
    stats: &WriteStats,
) {
    let mut group: Vec<Job> = Vec::with_capacity(max_group);
    while let Some(command) = commands.blocking_recv() {
        let mut close = None;
        match command {
            Command::Write(job) => group.push(job),
            Command::Close(done) => close = Some(done),
        }
        while close.is_none() && group.len() < max_group {
            match commands.try_recv() {
                Ok(Command::Write(job)) => group.push(job),
                Ok(Command::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_group(&mut connection, group.drain(..), stats);
        }
        // Every group ends its transaction; a closure that ended it itself and began another
        // must not hand an open transaction to the next group.
        if !connection.is_autocommit()
            && let Err(error) = connection.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "cannot end a transaction a writer left open");
        }
        if let Some(done) = close {
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

/// Runs `jobs` in one `BEGIN IMMEDIATE … COMMIT`, then answers them with the outcome. If SQLite
/// ends the transaction itself (it rolls back on a full disk or an I/O error), the jobs run so
/// far are answered with that failure and the rest go on in a new transaction.
fn commit_group(connection: &mut Connection, jobs: impl Iterator<Item = Job>, stats: &WriteStats) {
    let mut jobs = jobs.peekable();
    while jobs.peek().is_some() {
        let tx = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(error) => {
                // The write lock was not granted (another process held it past the busy
                // timeout): nothing ran, every job of the group is told.
                let error = DatabaseError::from(error);
                for job in jobs {
                    job.refuse(shared_failure(&error));
                }
                return;
            }
        };
        let mut answers = Vec::new();
        let mut rolled_back = false;
        for job in jobs.by_ref() {
            answers.extend(job.run(&tx));
            if tx.is_autocommit() {
                rolled_back = true;
                break;
            }
        }
        stats.writes.inc_by(answers.len() as u64);
        stats.commits.inc();
        let outcome = if rolled_back {
            Err(DatabaseError::new(
                "SQLite rolled the write transaction back after an error",
                false,
            ))
        } else {
            // A failed COMMIT drops `tx`, which rolls back.
            tx.commit().map_err(DatabaseError::from)
        };
        for answer in answers {
            answer(outcome.as_ref().map(|_| ()));
        }
    }
}

/// The same failure for each caller of a group (a [`DatabaseError`] has one owner).
fn shared_failure(error: &DatabaseError) -> DatabaseError {
    DatabaseError::new(error.to_string(), error.is_transient())
}

/// What the thread needs of a queued write, whatever its closure's types.
trait GroupJob: Send {
    /// Runs the write in a savepoint of `tx`; `None` when its caller was already gone (nothing
    /// ran).
    fn run(self: Box<Self>, tx: &Transaction<'_>) -> Option<Answer>;
    /// Answers the caller with `error` without running the write.
    fn refuse(self: Box<Self>, error: DatabaseError);
}

/// A queued write: the closure, where to answer, and the caller's context to run it in.
struct Write<F, T, E> {
    work: F,
    reply: oneshot::Sender<(Result<T, WriteError<E>>, usize)>,
    span: tracing::Span,
    dispatch: tracing::Dispatch,
    correlation_id: Option<correlation::CorrelationId>,
}

impl<F, T, E> GroupJob for Write<F, T, E>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    fn run(self: Box<Self>, tx: &Transaction<'_>) -> Option<Answer> {
        let Self {
            work,
            reply,
            span,
            dispatch,
            correlation_id,
        } = *self;
        // The caller is gone before its write started (its deadline passed while it waited):
        // nothing has happened yet, and nothing will.
        if reply.is_closed() {
            return None;
        }
        let run = || span.in_scope(|| metrics::counting_duplicates(|| in_savepoint(tx, work)));
        let (result, duplicates) =
            tracing::dispatcher::with_default(&dispatch, || match correlation_id {
                Some(id) => correlation::sync_scope(id, run),
                None => run(),
            });
        Some(Box::new(move |commit: Result<(), &DatabaseError>| {
            let answer = match (commit, result) {
                (Ok(()), result) => (result, duplicates),
                // The closure's work went down with its group: not in the database.
                (Err(error), Ok(_)) => (Err(WriteError::Database(shared_failure(error))), 0),
                // Undone already; its own error is the answer.
                (Err(_), Err(error)) => (Err(error), 0),
            };
            // A caller dropped while its write ran is no longer listening; the write committed
            // or rolled back all the same.
            let _ = reply.send(answer);
        }))
    }

    fn refuse(self: Box<Self>, error: DatabaseError) {
        let _ = self.reply.send((Err(WriteError::Database(error)), 0));
    }
}

/// `SAVEPOINT`, `work`, then `RELEASE` when it returns `Ok` and `ROLLBACK TO` when it returns
/// `Err` or panics: the group's other writes keep their effects either way.
fn in_savepoint<F, T, E>(tx: &Transaction<'_>, work: F) -> Result<T, WriteError<E>>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E>,
{
    run_cached(tx, "SAVEPOINT write").map_err(DatabaseError::from)?;
    // Unwind safety: whatever the closure left half done is inside the savepoint, which is
    // rolled back; the connection itself stays consistent (SQLite keeps no state a Rust panic
    // can tear).
    match catch_unwind(AssertUnwindSafe(|| work(tx))) {
        Ok(Ok(value)) => match run_cached(tx, "RELEASE write") {
            Ok(()) => Ok(value),
            Err(error) => {
                // Its effects cannot be told apart from the group's any more: none may commit.
                abandon_group(tx);
                Err(WriteError::Database(error.into()))
            }
        },
        Ok(Err(error)) => {
            undo(tx);
            Err(WriteError::Aborted(error))
        }
        Err(panic) => {
            undo(tx);
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

/// Rolls back to the write's savepoint and releases it. If that fails (or SQLite already ended
/// the transaction), the whole group is rolled back, so a failed write never commits half done.
fn undo(tx: &Transaction<'_>) {
    if tx.is_autocommit() {
        return;
    }
    let undone = run_cached(tx, "ROLLBACK TO write").and_then(|()| run_cached(tx, "RELEASE write"));
    if let Err(error) = undone {
        tracing::warn!(%error, "cannot roll back to a write's savepoint");
        abandon_group(tx);
    }
}

/// Rolls the group's whole transaction back; [`commit_group`] sees it ended and answers every
/// write run in it with a failure.
fn abandon_group(tx: &Transaction<'_>) {
    if let Err(error) = tx.execute_batch("ROLLBACK") {
        tracing::warn!(%error, "cannot roll back a write transaction");
    }
}

/// Runs a statement without parameters or rows from the connection's statement cache.
fn run_cached(tx: &Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute([]).map(drop)
}
