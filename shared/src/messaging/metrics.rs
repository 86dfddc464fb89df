//! Messaging metrics: publishes and their confirms, the broker link, deliveries by outcome,
//! handler latency and dead-letter queue depth.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `messaging_publishes_total` | `routing_key`, `outcome` (`acked`, `nacked`, `unroutable`, `timeout`, `disconnected`, `broker_error`) | one per message published, when its confirm (or failure) is known |
//! | `messaging_confirm_duration_seconds` | `routing_key` | from sending a message to the broker's confirm |
//! | `messaging_broker_connected` | – | 1 while a session is up, else 0 |
//! | `messaging_broker_reconnects_total` | – | sessions lost and rebuilt |
//! | `messaging_deliveries_total` | `queue`, `outcome` (`applied`, `duplicate`, `retried`, `dead_lettered`, `unsettled`) | one per delivery handled |
//! | `messaging_handler_duration_seconds` | `queue` | time in the handler per delivery (a batch's time shared equally among its deliveries) |
//! | `messaging_batch_size` | `queue` | deliveries taken from the queue together, one observation per batch (1 when only one was waiting) |
//! | `messaging_dead_letter_messages` | `queue` (the dead-letter queue) | messages parked there, read from the broker every [`DEAD_LETTER_POLL`] |
//!
//! The metrics live in the broker's shared state from the start and are registered in a
//! service's registry by [`Broker::register_metrics`](super::Broker::register_metrics).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::metrics::Metrics;

/// How often the dead-letter queues' depths are read: Prometheus scrapes every 15 s by default,
/// so reading more often would show nothing new; one passive declare per queue is cheap.
pub const DEAD_LETTER_POLL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    routing_key: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoutingKeyLabel {
    routing_key: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    queue: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// How a delivery ended, as counted by `messaging_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The handler applied it and it was acked.
    Applied,
    /// The handler found it already handled (the inbox knew its ID) and it was acked.
    Duplicate,
    /// A transient failure: a copy went to the retry queue.
    Retried,
    /// Undecodable, failed for good or out of retries: nacked into the dead-letter queue.
    DeadLettered,
    /// The retry could not be scheduled: left unacked for the broker to redeliver.
    Unsettled,
}

impl DeliveryOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::Unsettled => "unsettled",
        }
    }
}

/// The messaging metric families of one broker connection.
#[derive(Debug, Clone)]
pub(super) struct MessagingMetrics {
    publishes: Family<PublishLabels, Counter>,
    confirm_latency: Family<RoutingKeyLabel, Histogram>,
    connected: Gauge,
    reconnects: Counter<u64, AtomicU64>,
    deliveries: Family<DeliveryLabels, Counter>,
    handler_latency: Family<QueueLabel, Histogram>,
    batch_size: Family<QueueLabel, Histogram>,
    dead_letters: Family<QueueLabel, Gauge>,
}

/// Buckets from 0.1 ms to ~3 s for confirms and handlers alike: a confirm of a persistent message
/// waits for the broker's disk write, a handler is one SQLite transaction and sometimes an HTTP
/// call; both are milliseconds when healthy and seconds when not.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Buckets 1, 2, 4 … 64: a batch holds at most [`MAX_BATCH`](super::MAX_BATCH) deliveries.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 7))
}

impl Default for MessagingMetrics {
    fn default() -> Self {
        Self {
            publishes: Family::default(),
            confirm_latency: Family::new_with_constructor(latency_histogram),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            deliveries: Family::default(),
            handler_latency: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(batch_histogram),
            dead_letters: Family::default(),
        }
    }
}

impl MessagingMetrics {
    /// Registers every family in `metrics`.
    pub(super) fn register(&self, metrics: &Metrics) {
        metrics.register(
            "messaging_publishes",
            "Messages published, by routing key and confirm outcome",
            self.publishes.clone(),
        );
        metrics.register(
            "messaging_confirm_duration_seconds",
            "Time from publishing a message to the broker's confirm, by routing key",
            self.confirm_latency.clone(),
        );
        metrics.register(
            "messaging_broker_connected",
            "Whether the broker connection is up (1) or being rebuilt (0)",
            self.connected.clone(),
        );
        metrics.register(
            "messaging_broker_reconnects",
            "Broker connections lost and rebuilt",
            self.reconnects.clone(),
        );
        metrics.register(
            "messaging_deliveries",
            "Deliveries handled, by queue and outcome",
            self.deliveries.clone(),
        );
        metrics.register(
            "messaging_handler_duration_seconds",
            "Time a consumer's handler took per delivery, by queue",
            self.handler_latency.clone(),
        );
        metrics.register(
            "messaging_batch_size",
            "Deliveries a consumer took from its queue together, by queue",
            self.batch_size.clone(),
        );
        metrics.register(
            "messaging_dead_letter_messages",
            "Messages waiting in a dead-letter queue, as last read from the broker",
            self.dead_letters.clone(),
        );
    }

    /// One publish ended with `outcome` after `elapsed` (confirm latency only for a confirm).
    pub(super) fn published(&self, routing_key: &str, outcome: &'static str, elapsed: Duration) {
        self.publishes
            .get_or_create(&PublishLabels {
                routing_key: routing_key.to_owned(),
                outcome,
            })
            .inc();
        if matches!(outcome, "acked" | "nacked" | "unroutable") {
            self.confirm_latency
                .get_or_create(&RoutingKeyLabel {
                    routing_key: routing_key.to_owned(),
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// The connection is up (`true`) or lost (`false`, counted as a reconnect when `lost`).
    pub(super) fn connection(&self, up: bool, lost: bool) {
        self.connected.set(i64::from(up));
        if lost {
            self.reconnects.inc();
        }
    }

    /// A delivery from `queue` ended with `outcome`; `handled_in` is the handler's time, if it ran.
    pub(super) fn delivered(
        &self,
        queue: &str,
        outcome: DeliveryOutcome,
        handled_in: Option<Duration>,
    ) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                queue: queue.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(elapsed) = handled_in {
            self.handler_latency
                .get_or_create(&QueueLabel {
                    queue: queue.to_owned(),
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// A consumer of `queue` took `size` deliveries together.
    pub(super) fn batch(&self, queue: &str, size: usize) {
        self.batch_size
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .observe(size as f64);
    }

    /// `queue` (a dead-letter queue) holds `messages`.
    pub(super) fn dead_letter_depth(&self, queue: &str, messages: u32) {
        self.dead_letters
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .set(i64::from(messages));
    }
}

tokio::task_local! {
    /// Set while a consumer's handler runs; the inbox counts the messages it recognises.
    static DUPLICATES: std::cell::Cell<usize>;
}

/// Runs a handler's `work`, reporting how many of its deliveries (one, or a batch's) the inbox
/// recognised as duplicates.
pub(crate) async fn watching_duplicates<T>(work: impl Future<Output = T>) -> (T, usize) {
    DUPLICATES
        .scope(std::cell::Cell::new(0), async {
            let result = work.await;
            (result, DUPLICATES.with(std::cell::Cell::get))
        })
        .await
}

/// Counts a delivery being handled as a duplicate (called by [`crate::inbox::sqlite::record`] and
/// [`crate::inbox::postgres::record`]); does nothing outside a consumer's handler or
/// [`counting_duplicates`].
pub(crate) fn mark_duplicate() {
    mark_duplicates(1);
}

/// Counts `n` deliveries being handled as duplicates, as [`mark_duplicate`].
pub(crate) fn mark_duplicates(n: usize) {
    let _ = DUPLICATES.try_with(|duplicates| duplicates.set(duplicates.get() + n));
}

/// Runs `work` (synchronous code on a thread that is not the handler's, such as the database's
/// writer thread) and returns with its result the duplicates it marked, for the handler's task to
/// add with [`mark_duplicates`].
pub(crate) fn counting_duplicates<T>(work: impl FnOnce() -> T) -> (T, usize) {
    DUPLICATES.sync_scope(std::cell::Cell::new(0), || {
        let result = work();
        (result, DUPLICATES.with(std::cell::Cell::get))
    })
}
