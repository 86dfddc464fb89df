//! Measures how fast a consumer drains a backlog of events into SQLite, one message per
//! transaction and ack versus batches (`docs/decisions/0400-consumer-batches.md`).
//!
//! ```sh
//! cargo run --release -p shared --example consumer_drain -- [EVENTS]   # default 20000
//! ```
//!
//! For each mode it fills a fresh queue (in its own namespace, deleted afterwards) while the
//! consumer is held, then lets go and reports the wall time, the events per second and this
//! process's and the broker's CPU time per event over the drain. The broker's CPU is read from
//! `/proc` when a local `beam.smp` is found (`BROKER_PID` to name it), else left out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shared::db::{self, Database, DatabaseError};
use shared::events::PriceChanged;
use shared::messaging::{
    Broker, ConsumerSpec, Handler, HandlerError, HandlerFuture, IncomingMessage, MessagingSettings,
    OutgoingMessage,
};
use shared::money::Money;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "inbox", shared::inbox::MIGRATION),
    (
        2,
        "effects",
        "CREATE TABLE effects (message_id TEXT NOT NULL, sku TEXT NOT NULL);",
    ),
];

/// An inbox row and an effect row per message, as the services' consumers write.
struct Ledger {
    db: Database,
    batches: bool,
    gate: watch::Receiver<bool>,
    handled: AtomicUsize,
}

impl Ledger {
    /// Applies `messages` in one transaction on the writer thread: an inbox row and an effect
    /// row each (none for a message the inbox already had).
    async fn apply(&self, messages: &[IncomingMessage]) -> Result<(), HandlerError> {
        let effects = messages
            .iter()
            .map(|message| Ok((message.message_id, message.decode::<PriceChanged>()?.sku)))
            .collect::<Result<Vec<_>, HandlerError>>()?;
        self.db
            .write(move |tx| {
                for (message_id, sku) in &effects {
                    if shared::inbox::sqlite::record(tx, *message_id)? {
                        tx.prepare_cached("INSERT INTO effects (message_id, sku) VALUES (?, ?)")?
                            .execute([message_id.to_string(), sku.clone()])?;
                    }
                }
                Ok::<_, rusqlite::Error>(())
            })
            .await
            .map_err(|error| HandlerError::Transient(DatabaseError::from(error).to_string()))
    }

    async fn held(&self) {
        let _ = self.gate.clone().wait_for(|open| *open).await;
    }
}

impl Handler for Ledger {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(async move {
            self.held().await;
            self.apply(std::slice::from_ref(&message)).await?;
            self.handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        if !self.batches {
            return None;
        }
        Some(Box::pin(async move {
            self.held().await;
            self.apply(messages).await?;
            self.handled.fetch_add(messages.len(), Ordering::SeqCst);
            Ok(())
        }))
    }
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every common configuration.
    Some(Duration::from_millis(ticks * 10))
}

fn broker_pid() -> Option<String> {
    if let Ok(pid) = std::env::var("BROKER_PID") {
        return Some(pid);
    }
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid = entry.ok()?.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

async fn drain(events: usize, batches: bool, dir: &std::path::Path) -> anyhow::Result<()> {
    let url = format!("sqlite://{}/{}.db", dir.display(), uuid::Uuid::new_v4());
    let db = db::connect(&url, MIGRATIONS).await?;
    let (open, gate) = watch::channel(false);
    let ledger = Arc::new(Ledger {
        db,
        batches,
        gate,
        handled: AtomicUsize::new(0),
    });
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let settings = MessagingSettings::new(amqp, format!("drain-{}", uuid::Uuid::new_v4()));
    let shutdown = CancellationToken::new();
    let consumer = ConsumerSpec {
        queue: "drain.price-events".to_owned(),
        event_types: vec!["price.changed"],
        handler: ledger.clone(),
    };
    let broker = Broker::start("drain", settings, vec![consumer], shutdown.clone());
    while !broker.is_connected() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publisher = broker.publisher();
    let event = PriceChanged {
        sku: "BK-12".to_owned(),
        price: Money(1999),
        currency: "EUR".to_owned(),
        version: 1,
    };
    let published = futures::stream::iter(0..events)
        .map(|_| {
            let publisher = publisher.clone();
            let message = OutgoingMessage::new(&event);
            async move {
                publisher
                    .publish(message?)
                    .await
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(512)
        .filter(|result| std::future::ready(result.is_err()))
        .count()
        .await;
    anyhow::ensure!(published == 0, "{published} publishes failed");

    let broker_pid = broker_pid();
    let (own_before, broker_before) = (cpu_time("self"), broker_pid.as_deref().and_then(cpu_time));
    let started = Instant::now();
    open.send(true)?;
    while ledger.handled.load(Ordering::SeqCst) < events {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let per_event = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(before), Some(after)) => format!(
            "{:.1} µs",
            (after - before).as_secs_f64() * 1e6 / events as f64
        ),
        _ => "-".to_owned(),
    };
    println!(
        "{:<12} {events} events in {:.2} s: {:.0} events/s, consumer CPU {} per event, broker CPU {} per event",
        if batches { "batches" } else { "one by one" },
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        per_event(own_before, cpu_time("self")),
        per_event(broker_before, broker_pid.as_deref().and_then(cpu_time)),
    );
    broker.delete_topology().await?;
    shutdown.cancel();
    broker.stopped().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("consumer-drain-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        for batches in [false, true, false, true] {
            drain(events, batches, &dir).await?;
        }
        anyhow::Ok(())
    }
    .await;
    std::fs::remove_dir_all(&dir)?;
    result
}
