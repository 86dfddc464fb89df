//! Measures what a SQLite write transaction costs through sqlx statement by statement (the write
//! path the services had before, rebuilt here on a connection of the example's own) and as one
//! closure on the writer thread ([`Database::write`]), with a `COMMIT` per write and with the
//! writes waiting together sharing one (group commit)
//! (`docs/decisions/0410-sqlite-writer-thread.md`, `docs/decisions/0430-sqlite-group-commit.md`).
//!
//! ```sh
//! cargo run --release -p shared --example write_handoffs -- [TRANSACTIONS]   # default 10000
//! ```
//!
//! Each transaction has the shape of an order being stored: `BEGIN IMMEDIATE`, the order row,
//! three order lines, the outbox row, `COMMIT`. For each path, from 1 and from 16 concurrent
//! tasks, it runs the transactions on a fresh database file and reports transactions per second
//! and this process's CPU time (user + system, all threads) and context switches per transaction;
//! the same statements on a connection of the caller's own (`Direct`) show SQLite's own share.
//! The paths are
//! interleaved and each is run twice, so a neighbour's load on a shared machine shows as a
//! difference between the runs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shared::db::{self, Database};
use shared::events::{EventLine, OrderPlaced};
use shared::messaging::OutgoingMessage;
use shared::money::Money;
use sqlx::ConnectOptions as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use tokio::sync::Mutex;
use uuid::Uuid;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "outbox", shared::outbox::MIGRATION),
    (
        2,
        "outbox trace context",
        shared::outbox::TRACE_CONTEXT_MIGRATION,
    ),
    (
        3,
        "orders",
        "CREATE TABLE orders (id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL, \
         total_cents INTEGER NOT NULL, currency TEXT NOT NULL, created_at TEXT NOT NULL);
         CREATE TABLE order_lines (order_id TEXT NOT NULL REFERENCES orders(id), \
         line_no INTEGER NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL, \
         unit_price_cents INTEGER NOT NULL, PRIMARY KEY (order_id, line_no));",
    ),
];

const INSERT_ORDER: &str = "INSERT INTO orders (id, status, total_cents, currency, created_at) \
     VALUES (?1, 'placed', ?2, 'EUR', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))";
const INSERT_LINE: &str = "INSERT INTO order_lines (order_id, line_no, sku, qty, unit_price_cents) \
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// The outbox row as `shared::outbox::sqlite::enqueue` writes it.
const INSERT_OUTBOX: &str = "INSERT INTO outbox \
     (message_id, event_type, version, correlation_id, data, traceparent, tracestate) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// The lines of every order: three, as a typical basket.
const SKUS: [&str; 3] = ["BK-12", "MG-07", "HD-44"];
const UNIT_PRICE: i64 = 1250;

fn order(id: Uuid) -> OrderPlaced {
    OrderPlaced {
        order_id: id,
        lines: SKUS
            .iter()
            .map(|sku| EventLine {
                sku: (*sku).to_owned(),
                qty: 2,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(UNIT_PRICE),
            })
            .collect(),
        total: Money(UNIT_PRICE * 2 * 3),
        currency: "EUR".to_owned(),
    }
}

/// Which write path a run takes.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// `BEGIN IMMEDIATE`, one sqlx statement after another, `COMMIT`, on one sqlx connection
    /// taken in turn ([`SqlxWriter`]).
    Sqlx,
    /// One closure on the writer thread; at most this many writes waiting together share one
    /// `COMMIT` (`SQLITE_WRITE_GROUP`; 1: a `COMMIT` per write).
    Writer(usize),
    /// The same statements on a rusqlite connection of the caller's own (on a blocking thread,
    /// one task only): SQLite's own cost, the floor under both paths.
    Direct,
}

/// The write path the writer thread replaced: one sqlx connection with the pool's settings, held
/// by one writer at a time, every statement a round trip to sqlx's worker thread.
struct SqlxWriter(Mutex<SqliteConnection>);

impl SqlxWriter {
    async fn open(file: &std::path::Path) -> anyhow::Result<Self> {
        let connection = SqliteConnectOptions::new()
            .filename(file)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(db::BUSY_TIMEOUT)
            .foreign_keys(true)
            .connect()
            .await?;
        Ok(Self(Mutex::new(connection)))
    }
}

async fn store_with_sqlx(writer: &SqlxWriter, placed: &OrderPlaced) -> anyhow::Result<()> {
    let id = placed.order_id.to_string();
    let mut connection = writer.0.lock().await;
    let tx = &mut *connection;
    // A failed statement ends the whole run, so no ROLLBACK path is needed here.
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await?;
    sqlx::query(INSERT_ORDER)
        .bind(&id)
        .bind(placed.total.cents())
        .execute(&mut *tx)
        .await?;
    for (line_no, line) in (0_i64..).zip(&placed.lines) {
        sqlx::query(INSERT_LINE)
            .bind(&id)
            .bind(line_no)
            .bind(&line.sku)
            .bind(line.qty)
            .bind(line.unit_price.cents())
            .execute(&mut *tx)
            .await?;
    }
    let message = OutgoingMessage::new(placed)?;
    let (traceparent, tracestate) = message
        .trace
        .as_ref()
        .map_or((None, None), shared::trace_context::to_text);
    sqlx::query(INSERT_OUTBOX)
        .bind(message.message_id.to_string())
        .bind(&message.event_type)
        .bind(i64::from(message.version))
        .bind(message.correlation_id.as_deref())
        .bind(std::str::from_utf8(&message.data)?)
        .bind(traceparent)
        .bind(tracestate)
        .execute(&mut *tx)
        .await?;
    sqlx::query("COMMIT").execute(&mut *tx).await?;
    Ok(())
}

async fn store_on_writer(db: &Database, placed: OrderPlaced) -> anyhow::Result<()> {
    db.write(move |tx| {
        let id = placed.order_id.to_string();
        tx.prepare_cached(INSERT_ORDER)?
            .execute(rusqlite::params![id, placed.total.cents()])?;
        let mut insert_line = tx.prepare_cached(INSERT_LINE)?;
        for (line_no, line) in (0_i64..).zip(&placed.lines) {
            insert_line.execute(rusqlite::params![
                id,
                line_no,
                line.sku,
                line.qty,
                line.unit_price.cents()
            ])?;
        }
        shared::outbox::sqlite::enqueue(tx, &placed)
    })
    .await
    .map_err(db::DatabaseError::from)?;
    Ok(())
}

/// [`Path::Direct`]: `transactions` orders stored on a connection of this thread's own, with the
/// writer thread's settings.
fn store_directly(file: &std::path::Path, transactions: usize) -> anyhow::Result<()> {
    let mut connection = rusqlite::Connection::open(file)?;
    connection.busy_timeout(db::BUSY_TIMEOUT)?;
    connection.pragma_update(None, "foreign_keys", true)?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    for _ in 0..transactions {
        let placed = order(Uuid::new_v4());
        let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id = placed.order_id.to_string();
        tx.prepare_cached(INSERT_ORDER)?
            .execute(rusqlite::params![id, placed.total.cents()])?;
        for (line_no, line) in (0_i64..).zip(&placed.lines) {
            tx.prepare_cached(INSERT_LINE)?.execute(rusqlite::params![
                id,
                line_no,
                line.sku,
                line.qty,
                line.unit_price.cents()
            ])?;
        }
        shared::outbox::sqlite::enqueue(&tx, &placed)?;
        tx.commit()?;
    }
    Ok(())
}

/// Context switches (voluntary and involuntary) of each of this process's live threads so far,
/// by thread id: each hand-off to another thread that finds it asleep costs at least one.
fn context_switches() -> HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return HashMap::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let switches = status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            Some((task.file_name().to_string_lossy().into_owned(), switches))
        })
        .collect()
}

/// Context switches since `before`, of the threads alive now (a thread that ended in between is
/// left out, so this counts low, never high).
fn context_switches_since(before: &HashMap<String, u64>) -> u64 {
    context_switches()
        .iter()
        .map(|(tid, now)| now.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// CPU time (user + system, every thread, exited ones included) of this process so far: the
/// counters `getrusage(RUSAGE_SELF)` reports, read from `/proc` (the workspace has no `unsafe`).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every common configuration.
    Some(Duration::from_millis(ticks * 10))
}

async fn run(
    path: Path,
    tasks: usize,
    transactions: usize,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let file = dir.join(format!("{}.db", Uuid::new_v4()));
    let settings = db::DbSettings {
        url: format!("sqlite://{}", file.display()),
        durability: db::Durability::Normal,
        write_group: match path {
            Path::Writer(group) => group,
            Path::Sqlx | Path::Direct => 1,
        },
    };
    let db = db::connect_with(&settings, MIGRATIONS).await?;
    let sqlx_writer = match path {
        Path::Sqlx => Some(std::sync::Arc::new(SqlxWriter::open(&file).await?)),
        Path::Writer(_) | Path::Direct => None,
    };
    let each = transactions / tasks;
    let switches = context_switches();
    let before = cpu_time();
    let started = Instant::now();
    if let Path::Direct = path {
        tokio::task::spawn_blocking(move || store_directly(&file, transactions)).await??;
    } else {
        let workers: Vec<_> = (0..tasks)
            .map(|_| {
                let db = db.clone();
                let sqlx_writer = sqlx_writer.clone();
                tokio::spawn(async move {
                    for _ in 0..each {
                        let placed = order(Uuid::new_v4());
                        match &sqlx_writer {
                            Some(writer) => store_with_sqlx(writer, &placed).await?,
                            None => store_on_writer(&db, placed).await?,
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.await??;
        }
    }
    let elapsed = started.elapsed();
    let switches = context_switches_since(&switches);
    let done = each * tasks;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(db.pool())
        .await?;
    anyhow::ensure!(
        stored == i64::try_from(done)?,
        "{stored} orders stored of {done}"
    );
    let cpu = match (before, cpu_time()) {
        (Some(before), Some(after)) => format!(
            "{:.1} µs",
            (after - before).as_secs_f64() * 1e6 / done as f64
        ),
        _ => "-".to_owned(),
    };
    println!(
        "{:<22} {done} transactions in {:.2} s: {:>6.0} transactions/s, CPU {cpu}, {:.1} context switches per transaction",
        format!("{path:?} from {tasks}"),
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        switches as f64 / done as f64,
    );
    db.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let transactions: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 10_000,
    };
    let dir = std::env::temp_dir().join(format!("write-handoffs-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let mut outcome = Ok(());
    'runs: for round in 1..=2 {
        println!("round {round}");
        let runs = [
            (Path::Direct, 1),
            (Path::Sqlx, 1),
            (Path::Writer(1), 1),
            (Path::Sqlx, 16),
            (Path::Writer(1), 16),
            (Path::Writer(db::WRITE_GROUP), 16),
            (Path::Writer(1), 64),
            (Path::Writer(db::WRITE_GROUP), 64),
        ];
        for (path, tasks) in runs {
            outcome = run(path, tasks, transactions, &dir).await;
            if outcome.is_err() {
                break 'runs;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
