//! The broker connection and its supervisor: connect with backoff, declare the topology, run the
//! publisher channel and the consumers, and on any error or timeout drop everything and rebuild.
//!
//! lapin has an automatic recovery of its own, but it was seen to hang after a broker restart, so
//! this supervisor owns the whole life cycle instead: a connection is either fully working
//! (topology declared, confirms on, consumers running) or thrown away and built again. Every
//! broker await is bounded by [`MessagingSettings::operation_timeout`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use rand::Rng;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::consumer::{self, ConsumerTask};
use super::metrics::{DEAD_LETTER_POLL, MessagingMetrics};
use super::topology::{QueueTopology, Topology, TopologyError};
use super::{ConsumerSpec, MessagingSettings, PublishError, Publisher};
use crate::health::CheckStatus;

/// First reconnect delay bound: a broker that dropped one connection usually takes the next at
/// once, so the first retry comes within 100 ms.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts: a restarting broker is not hammered (every service
/// instance retries), and readiness comes back within seconds of the broker.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often the supervisor double-checks that lapin still calls the connection connected, in
/// case a failure was not reported as an event.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// The process's broker connection, owned by a supervisor task.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("service", &self.shared.service)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// State shared by the supervisor, the publishers and the consumers of one [`Broker`].
pub(super) struct Shared {
    pub(super) service: &'static str,
    pub(super) settings: MessagingSettings,
    pub(super) topology: Topology,
    /// The working session, `None` while disconnected.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Publishes in flight (awaiting their confirm), across sessions.
    pub(super) window: Arc<Semaphore>,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Publish, delivery and connection metrics ([`Broker::register_metrics`] exposes them).
    pub(super) metrics: MessagingMetrics,
    /// Stops the supervisor (the caller's shutdown, or [`Broker::delete_topology`]).
    stop: CancellationToken,
    /// Cancelled once the supervisor has closed the connection for good.
    finished: CancellationToken,
}

/// One connection's worth of working parts that publishers use.
pub(super) struct Session {
    /// The publisher channel (confirms on), also used for retries.
    pub(super) channel: Channel,
    failed: CancellationToken,
    failure: Mutex<Option<String>>,
}

impl Session {
    /// Reports that this session is broken; the supervisor rebuilds everything.
    pub(super) fn fail(&self, reason: impl Into<String>) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert_with(|| reason.into());
        self.failed.cancel();
    }

    fn is_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    fn reason(&self) -> String {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "unknown failure".to_owned())
    }
}

impl Shared {
    /// The working session, waiting up to `timeout` for one while disconnected.
    pub(super) async fn session(&self, timeout: Duration) -> Option<Arc<Session>> {
        if self.finished.is_cancelled() {
            return None;
        }
        let mut receiver = self.session.subscribe();
        let usable = |s: &Option<Arc<Session>>| s.as_ref().is_some_and(|s| !s.is_failed());
        let wait = async {
            tokio::select! {
                result = receiver.wait_for(usable) => result.ok().and_then(|s| s.clone()),
                () = self.finished.cancelled() => None,
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

impl Broker {
    /// Starts the supervisor: connects (retrying), declares topology, runs `consumers`, rebuilds
    /// everything on failure, stops on `shutdown`.
    ///
    /// Startup does not wait for the broker: the service comes up not ready, and becomes ready
    /// when the supervisor has connected. Must be called inside a tokio runtime.
    pub fn start(
        service: &'static str,
        settings: MessagingSettings,
        consumers: Vec<ConsumerSpec>,
        shutdown: CancellationToken,
    ) -> Self {
        let topology = Topology::new(&settings, &consumers);
        let shared = Arc::new(Shared {
            service,
            window: Arc::new(Semaphore::new(settings.publish_window)),
            settings,
            topology,
            session: watch::Sender::new(None),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            metrics: MessagingMetrics::default(),
            stop: shutdown.child_token(),
            finished: CancellationToken::new(),
        });
        let span = tracing::info_span!("broker", service);
        tokio::spawn(supervise(shared.clone(), consumers).instrument(span));
        Self { shared }
    }

    /// Registers this connection's messaging metrics (publishes and confirms, connection state,
    /// deliveries, handler latency, dead-letter depth; see [`super::metrics`]) in `metrics`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        self.shared.metrics.register(metrics);
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.shared.clone())
    }

    /// Stops the supervisor, then deletes every exchange and queue this broker's topology
    /// declared, with everything in them (tests clean up with it). Stopping first keeps the
    /// supervisor from declaring again what is being deleted, so call it last.
    ///
    /// # Errors
    /// [`PublishError::Broker`] if the broker cannot be reached.
    pub async fn delete_topology(&self) -> Result<(), PublishError> {
        self.shared.stop.cancel();
        self.stopped().await;
        let timeout = self.shared.settings.operation_timeout;
        let broker_error = |e: String| PublishError::Broker(e);
        let connection = connect(&self.shared.settings.amqp_url, self.shared.service, timeout)
            .await
            .map_err(broker_error)?;
        let channel = bounded(timeout, connection.create_channel())
            .await
            .map_err(broker_error)?;
        let deleted = self.shared.topology.delete(&channel, timeout).await;
        let _ = tokio::time::timeout(timeout, connection.close(200, "OK".into())).await;
        deleted.map_err(|e| PublishError::Broker(e.to_string()))
    }

    /// Completes when the supervisor has stopped (after `shutdown`) and closed the connection,
    /// having let in-flight handlers and confirms finish (each bounded by the operation timeout).
    pub async fn stopped(&self) {
        self.shared.finished.cancelled().await;
    }

    /// Whether connected and topology declared.
    pub fn is_connected(&self) -> bool {
        self.shared
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| !s.is_failed())
    }

    /// How many times the connection was lost and rebuilt.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Critical readiness check: failing while disconnected. The detail shows `connected`,
    /// `reconnects` and the `lastError` seen.
    pub fn health_check(&self) -> CheckStatus {
        let last_error = self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connected = self.is_connected();
        let detail = json!({
            "connected": connected,
            "reconnects": self.reconnects(),
            "lastError": last_error,
        });
        if connected {
            CheckStatus::ok(detail)
        } else {
            CheckStatus::failing(detail)
        }
    }
}

/// The supervisor loop: one iteration per connection.
async fn supervise(shared: Arc<Shared>, consumers: Vec<ConsumerSpec>) {
    let mut failed_attempts = 0_u32;
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        match open_session(&shared, &consumers).await {
            Ok(mut running) => {
                failed_attempts = 0;
                shared.metrics.connection(true, false);
                tracing::info!(
                    reconnects = shared.reconnects.load(Ordering::Relaxed),
                    "connected to the broker"
                );
                let lost = running.watch(&shared).await;
                running.close(&shared, lost.is_none()).await;
                shared.metrics.connection(false, lost.is_some());
                let Some(reason) = lost else { break };
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %reason, "lost the broker connection; reconnecting");
                record_error(&shared, reason);
            }
            Err(OpenError::Topology(
                ref refused @ TopologyError::Inequivalent {
                    ref queue,
                    variable,
                    ..
                },
            )) => {
                failed_attempts = failed_attempts.saturating_add(1);
                // Not ready, and retrying (with backoff) only so that deleting the old queue is
                // enough to recover: a restart would meet the same queue.
                tracing::error!(
                    queue,
                    variable,
                    error = %refused,
                    attempt = failed_attempts,
                    "the broker refuses to redeclare an existing queue; not ready until it is \
                     deleted or the setting matches it (see the README's messaging section)"
                );
                record_error(&shared, refused.to_string());
            }
            Err(reason) => {
                failed_attempts = failed_attempts.saturating_add(1);
                let reason = reason.to_string();
                tracing::warn!(
                    error = %reason,
                    attempt = failed_attempts,
                    "cannot connect to the broker; retrying"
                );
                record_error(&shared, reason);
            }
        }
        tokio::select! {
            () = shared.stop.cancelled() => break,
            () = tokio::time::sleep(backoff(failed_attempts)) => {}
        }
    }
    shared.session.send_replace(None);
    shared.finished.cancel();
    tracing::info!("broker connection closed");
}

fn record_error(shared: &Shared, reason: String) {
    *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
}

/// Capped exponential backoff with full jitter: a random delay up to `base × 2^attempt`, so
/// many instances reconnecting at once spread out instead of arriving together.
pub(super) fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(2_u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// Runs `operation` with `timeout`, turning both failures into text.
pub(super) async fn bounded<T>(
    timeout: Duration,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer from the broker within {timeout:?}")),
    }
}

/// Opens a connection named after `service` (visible in the management UI).
pub(super) async fn connect(
    url: &str,
    service: &str,
    timeout: Duration,
) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(service.into());
    bounded(timeout, Connection::connect(url, properties)).await
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// The broker refused (or did not answer) a declaration.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Connecting, opening a channel or starting a consumer failed.
    #[error("{0}")]
    Broker(String),
}

impl From<String> for OpenError {
    fn from(reason: String) -> Self {
        Self::Broker(reason)
    }
}

/// A connection with everything running on it.
struct Running {
    connection: Connection,
    session: Arc<Session>,
    consumers: JoinSet<String>,
    stop_consumers: CancellationToken,
}

async fn open_session(shared: &Arc<Shared>, specs: &[ConsumerSpec]) -> Result<Running, OpenError> {
    let timeout = shared.settings.operation_timeout;
    let connection = connect(&shared.settings.amqp_url, shared.service, timeout).await?;
    let channel = bounded(timeout, connection.create_channel()).await?;
    shared.topology.declare(&channel, timeout).await?;
    bounded(
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let session = Arc::new(Session {
        channel,
        failed: CancellationToken::new(),
        failure: Mutex::new(None),
    });
    let stop_consumers = CancellationToken::new();
    let mut consumers = JoinSet::new();
    for (spec, queue) in specs.iter().zip(&shared.topology.queues) {
        let task = start_consumer(shared, &connection, &session, spec, queue, &stop_consumers)
            .await
            .inspect_err(|_| consumers.abort_all())?;
        let span = tracing::info_span!("consumer", service = shared.service, queue = %queue.queue);
        consumers.spawn(consumer::run(task).instrument(span));
    }
    let dead_letter_queues = shared.topology.queues.iter();
    let dead_letter_queues = dead_letter_queues
        .map(|q| q.dead_letter_queue.clone())
        .collect();
    let depth_channel = bounded(timeout, connection.create_channel()).await?;
    consumers.spawn(poll_dead_letters(
        shared.clone(),
        depth_channel,
        dead_letter_queues,
        stop_consumers.clone(),
    ));
    shared.session.send_replace(Some(session.clone()));
    Ok(Running {
        connection,
        session,
        consumers,
        stop_consumers,
    })
}

/// Reads the depth of every dead-letter queue every [`DEAD_LETTER_POLL`] into the metrics, on a
/// channel of its own (a failed passive declare closes its channel), until `stop`. Returns why it
/// ended, like a consumer, so a broken channel rebuilds the session.
async fn poll_dead_letters(
    shared: Arc<Shared>,
    channel: Channel,
    queues: Vec<String>,
    stop: CancellationToken,
) -> String {
    let timeout = shared.settings.operation_timeout;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut every = tokio::time::interval(DEAD_LETTER_POLL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return "stopped".to_owned(),
            _ = every.tick() => {}
        }
        for queue in &queues {
            let declared =
                channel.queue_declare(queue.as_str().into(), passive, FieldTable::default());
            match bounded(timeout, declared).await {
                Ok(state) => shared
                    .metrics
                    .dead_letter_depth(queue, state.message_count()),
                Err(error) => return format!("cannot read the depth of {queue}: {error}"),
            }
        }
    }
}

async fn start_consumer(
    shared: &Arc<Shared>,
    connection: &Connection,
    session: &Arc<Session>,
    spec: &ConsumerSpec,
    queue: &QueueTopology,
    stop: &CancellationToken,
) -> Result<ConsumerTask, String> {
    let timeout = shared.settings.operation_timeout;
    let channel = bounded(timeout, connection.create_channel()).await?;
    bounded(
        timeout,
        channel.basic_qos(shared.settings.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let tag = format!("{}.{}", shared.service, uuid::Uuid::new_v4());
    let consumer = bounded(
        timeout,
        channel.basic_consume(
            queue.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(ConsumerTask {
        shared: shared.clone(),
        session: session.clone(),
        handler: spec.handler.clone(),
        queue: queue.clone(),
        channel,
        consumer,
        tag,
        stop: stop.clone(),
    })
}

impl Running {
    /// Waits until the session breaks (`Some(reason)`) or the broker is told to stop (`None`).
    async fn watch(&mut self, shared: &Shared) -> Option<String> {
        let mut events = self.connection.events_listener();
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        loop {
            tokio::select! {
                () = shared.stop.cancelled() => return None,
                () = self.session.failed.cancelled() => return Some(self.session.reason()),
                event = events.next() => match event {
                    Some(lapin::Event::Error(error)) => return Some(error.to_string()),
                    Some(other) => tracing::debug!(event = ?other, "broker connection event"),
                    None => return Some("the connection's event stream ended".to_owned()),
                },
                Some(ended) = self.consumers.join_next() => {
                    return Some(ended.unwrap_or_else(|e| format!("consumer task failed: {e}")));
                }
                _ = liveness.tick() => {
                    if !self.connection.status().connected() {
                        return Some("the connection is no longer connected".to_owned());
                    }
                }
            }
        }
    }

    /// Takes the session down. `graceful`: let handlers and confirms in flight finish first
    /// (each wait bounded); otherwise everything is dropped at once, since the connection is gone
    /// and unacked deliveries come back from the broker anyway.
    async fn close(mut self, shared: &Shared, graceful: bool) {
        let timeout = shared.settings.operation_timeout;
        if graceful {
            self.stop_consumers.cancel();
            let drained = tokio::time::timeout(timeout.saturating_mul(2), async {
                while self.consumers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!("consumers did not drain in time");
            }
            let window = u32::try_from(shared.settings.publish_window).unwrap_or(u32::MAX);
            if tokio::time::timeout(timeout, shared.window.acquire_many(window))
                .await
                .is_err()
            {
                tracing::warn!("publishes still awaiting confirms at shutdown");
            }
        }
        self.session.fail("closing");
        shared.session.send_replace(None);
        self.consumers.abort_all();
        if self.connection.status().connected() {
            let _ = tokio::time::timeout(timeout, self.connection.close(200, "OK".into())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_attempts_and_stays_under_the_cap() {
        for attempt in 0..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(2_u32.saturating_pow(attempt.min(16)))
                .min(BACKOFF_CAP);
            let delay = backoff(attempt);
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
        }
        assert!(backoff(0) <= BACKOFF_BASE);
    }
}
