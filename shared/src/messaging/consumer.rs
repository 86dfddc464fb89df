//! Consuming: manual acks, deliveries applied in order and in batches, delayed retries, dead
//! letters.
//!
//! The consumer waits for a delivery, then takes every further delivery that is already waiting,
//! up to the batch limit, without waiting for more: a lone delivery is handled at once, and under
//! load the deliveries that arrived while one batch was applied form the next. One batch is
//! applied at a time, so effects happen in queue order.
//!
//! Two or more decoded deliveries go to [`Handler::handle_batch`] together: one CONSUMER span
//! `process {queue}` linked to every message's producer, typically one write transaction, and on
//! `Ok` one `basic.ack` with `multiple` on the last delivery tag. A handler without a batch
//! method, a lone delivery, or a batch that failed (it changed nothing) is handled message by
//! message, each in the CONSUMER span `process {event type}`, a child of its producer's publish
//! span:
//! - `Ok` → ack;
//! - [`HandlerError::Transient`] with retries left → publish a copy (same ID, headers, body, with
//!   `x-attempt` + 1) to the consumer's retry queue, wait for its confirm, then ack the original;
//! - out of retries, or [`HandlerError::Permanent`] → nack without requeue → the DLQ, headers
//!   intact (the broker adds `x-death`).
//!
//! So a poison message in a batch is isolated: the batch fails, and handled alone it is
//! dead-lettered while every other message of the batch is applied once. An undecodable delivery
//! never reaches a handler and goes to the DLQ at once. Nothing is ever requeued in place: a
//! poisoned message cannot spin in a hot loop.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::broker::{Session, Shared};
use super::envelope::Received;
use super::metrics::{self, DeliveryOutcome};
use super::publisher::{Prepared, publish_all};
use super::topology::QueueTopology;
use super::{Handler, HandlerError, IncomingMessage, envelope};
use crate::{correlation, deadline, trace_context};

/// The most deliveries applied together. A batch holds SQLite's one write lock for all of its
/// messages (about 0.1 ms each for an order event), so 16 keep it under 2 ms, a small part of the
/// 15 ms p99 that a reservation waiting for the same lock may take; past 16 the saving per
/// message (its share of one `BEGIN`/`COMMIT` and one ack) is already below a sixteenth.
pub const MAX_BATCH: usize = 16;

/// The batch limit for a consumer with `prefetch` unacked deliveries: half of them, so that the
/// broker is already sending the next batch while one is being applied (it sends nothing past
/// `prefetch` unacked), and at most [`MAX_BATCH`].
fn batch_limit(prefetch: u16) -> usize {
    usize::from(prefetch).div_ceil(2).clamp(1, MAX_BATCH)
}

/// One consumer's running parts.
pub(super) struct ConsumerTask {
    pub(super) shared: Arc<Shared>,
    pub(super) session: Arc<Session>,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) queue: QueueTopology,
    pub(super) channel: Channel,
    pub(super) consumer: Consumer,
    pub(super) tag: String,
    pub(super) stop: CancellationToken,
}

/// What handling a batch needs.
struct Context {
    shared: Arc<Shared>,
    session: Arc<Session>,
    handler: Arc<dyn Handler>,
    queue: QueueTopology,
}

/// How the consumer may acknowledge a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acks {
    /// Every earlier delivery on the channel is settled: `multiple` on the last tag acks exactly
    /// the batch.
    Multiple,
    /// A delivery was left unacked on purpose (its retry could not be scheduled; the connection
    /// is being rebuilt so that the broker redelivers it): `multiple` would ack it too, so each
    /// delivery is acked on its own from then on.
    OneByOne,
}

/// Runs the consumer until its stream ends (returns why, so the supervisor rebuilds) or `stop`
/// (cancels the consumer and lets the batch in flight finish, bounded).
pub(super) async fn run(mut task: ConsumerTask) -> String {
    let limit = batch_limit(task.shared.settings.prefetch);
    let context = Context {
        shared: task.shared.clone(),
        session: task.session.clone(),
        handler: task.handler.clone(),
        queue: task.queue.clone(),
    };
    let mut acks = Acks::Multiple;
    loop {
        let next = tokio::select! {
            () = task.stop.cancelled() => {
                cancel(&task).await;
                return "stopped".to_owned();
            }
            next = task.consumer.next() => next,
        };
        let first = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return format!("consumer of {} failed: {error}", task.queue.queue),
            None => return format!("consumer of {} was cancelled", task.queue.queue),
        };
        let (batch, ended) = take_waiting(&mut task, first, limit);
        let work = apply(&context, batch, &mut acks);
        tokio::pin!(work);
        tokio::select! {
            () = &mut work => {}
            () = task.stop.cancelled() => {
                cancel(&task).await;
                let timeout = task.shared.settings.operation_timeout;
                if tokio::time::timeout(timeout, work).await.is_err() {
                    tracing::warn!(
                        "handlers still running at shutdown; their messages will be redelivered"
                    );
                }
                return "stopped".to_owned();
            }
        }
        if let Some(reason) = ended {
            return reason;
        }
    }
}

/// `first` and every delivery already waiting behind it, up to `limit`, without waiting for
/// more; and why the stream ended, if it did meanwhile.
fn take_waiting(
    task: &mut ConsumerTask,
    first: Delivery,
    limit: usize,
) -> (Vec<Delivery>, Option<String>) {
    let mut batch = vec![first];
    while batch.len() < limit {
        match task.consumer.next().now_or_never() {
            // Nothing else has arrived: go with what is here rather than linger.
            None => break,
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(error))) => {
                let reason = format!("consumer of {} failed: {error}", task.queue.queue);
                return (batch, Some(reason));
            }
            Some(None) => {
                let reason = format!("consumer of {} was cancelled", task.queue.queue);
                return (batch, Some(reason));
            }
        }
    }
    (batch, None)
}

/// Stops new deliveries (bounded; the broker redelivers whatever it had sent but is not acked).
async fn cancel(task: &ConsumerTask) {
    let timeout = task.shared.settings.operation_timeout;
    let _ = tokio::time::timeout(
        timeout,
        task.channel
            .basic_cancel(task.tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
}

/// Applies `deliveries` in order: as one batch when the handler takes batches and two or more
/// decode, else (or when the batch fails) one by one.
async fn apply(context: &Context, deliveries: Vec<Delivery>, acks: &mut Acks) {
    let queue = &context.queue.queue;
    context.shared.metrics.batch(queue, deliveries.len());
    let timeout = context.shared.settings.operation_timeout;
    let mut decoded = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match envelope::decode(&delivery.properties, &delivery.data) {
            Ok(received) => decoded.push((delivery, received)),
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
                    "undecodable message; dead-lettering it"
                );
                // Dead-lettered before the rest are acked: it never reaches a handler, so no
                // effect changes order, and the batch's `multiple` ack cannot cover it.
                dead_letter(&delivery, timeout).await;
                context
                    .shared
                    .metrics
                    .delivered(queue, DeliveryOutcome::DeadLettered, None);
            }
        }
    }
    if decoded.len() >= 2 && apply_batch(context, &decoded, *acks).await {
        return;
    }
    for (delivery, received) in decoded {
        if handle(context, &delivery, received).await == DeliveryOutcome::Unsettled {
            *acks = Acks::OneByOne;
        }
    }
}

/// Offers `decoded` to the handler's batch method; `true` when it applied them all (and they
/// were acked and counted), `false` when the handler takes no batches or the batch failed.
async fn apply_batch(context: &Context, decoded: &[(Delivery, Received)], acks: Acks) -> bool {
    let messages: Vec<IncomingMessage> = decoded.iter().map(|(_, r)| r.message.clone()).collect();
    let Some(work) = context.handler.handle_batch(&messages) else {
        return false;
    };
    let size = decoded.len();
    let queue = &context.queue.queue;
    let span = tracing::info_span!(
        "messages",
        service = context.shared.service,
        queue = %queue,
        batch_size = size,
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %context.shared.topology.exchange,
        messaging.destination.subscription.name = %queue,
        messaging.batch.message_count = size,
        error.type = tracing::field::Empty,
    );
    trace_context::consumer_batch_span(
        &span,
        queue,
        decoded.iter().filter_map(|(_, r)| r.trace.as_ref()),
    );
    // No correlation ID or deadline is in scope: each message has its own. Budgets only bound
    // outbound calls, which a batch handler (one local transaction) does not make.
    let started = Instant::now();
    let (outcome, duplicates) = metrics::watching_duplicates(AssertUnwindSafe(work).catch_unwind())
        .instrument(span.clone())
        .await;
    let handled_in = started.elapsed();
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some("the batch handler panicked".to_owned()),
    };
    if let Some(error) = failure {
        trace_context::record_failure(&span, "batch_failed");
        span.in_scope(|| {
            tracing::warn!(
                error,
                size,
                "batch failed; handling its messages one at a time"
            );
        });
        return false;
    }
    ack_batch(decoded, acks, context.shared.settings.operation_timeout)
        .instrument(span.clone())
        .await;
    let share = handled_in / u32::try_from(size).unwrap_or(u32::MAX);
    let elapsed_us = u64::try_from(handled_in.as_micros()).unwrap_or(u64::MAX);
    for (index, (_, received)) in decoded.iter().enumerate() {
        let message = &received.message;
        span.in_scope(|| {
            message.in_scope(|| {
                tracing::info!(
                    message_id = %message.message_id,
                    event_type = %message.event_type,
                    attempt = message.attempt,
                    batch_size = size,
                    elapsed_us,
                    "handled message"
                );
            });
        });
        // The handler says how many were duplicates, not which: count that many as such.
        let outcome = if index < duplicates {
            DeliveryOutcome::Duplicate
        } else {
            DeliveryOutcome::Applied
        };
        context
            .shared
            .metrics
            .delivered(queue, outcome, Some(share));
    }
    true
}

/// Acks a whole applied batch: one `basic.ack` with `multiple` on its last tag while every
/// earlier delivery is settled, else one ack per delivery.
async fn ack_batch(decoded: &[(Delivery, Received)], acks: Acks, timeout: Duration) {
    match acks {
        Acks::Multiple => {
            if let Some((last, _)) = decoded.last() {
                let options = BasicAckOptions { multiple: true };
                match tokio::time::timeout(timeout, last.ack(options)).await {
                    Ok(Ok(_)) => {}
                    // The broker redelivers unacked messages; the inbox absorbs the duplicates.
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "ack failed; the batch will be redelivered")
                    }
                    Err(_) => tracing::warn!("ack timed out; the batch may be redelivered"),
                }
            }
        }
        Acks::OneByOne => {
            for (delivery, _) in decoded {
                ack(delivery, timeout).await;
            }
        }
    }
}

/// Handles one delivery in its own span, with its correlation ID and deadline in scope; says how
/// it was settled.
async fn handle(context: &Context, delivery: &Delivery, received: Received) -> DeliveryOutcome {
    let message = received.message;
    let attempt = message.attempt;
    let span = tracing::info_span!(
        "message",
        service = context.shared.service,
        queue = %context.queue.queue,
        event_type = %message.event_type,
        message_id = %message.message_id,
        attempt,
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %context.shared.topology.exchange,
        messaging.destination.subscription.name = %context.queue.queue,
        messaging.rabbitmq.destination.routing_key = %message.event_type,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = received.correlation_id.as_str(),
        error.type = tracing::field::Empty,
    );
    trace_context::consumer_span(&span, &message.event_type, received.trace);
    let started = Instant::now();
    let work = metrics::watching_duplicates(
        AssertUnwindSafe(context.handler.handle(message)).catch_unwind(),
    );
    let work = async {
        match envelope::deadline(received.budget) {
            Some(deadline) => deadline::scope(deadline, work).await,
            None => work.await,
        }
    };
    correlation::scope(received.correlation_id, async {
        // A panicking handler is a bug that retrying will not fix: dead-letter the message
        // instead of leaving it unacked (and the consumer's slot taken) forever.
        let (outcome, duplicates) = work.instrument(span.clone()).await;
        let outcome = outcome
            .unwrap_or_else(|_| Err(HandlerError::Permanent("the handler panicked".to_owned())));
        let handled_in = started.elapsed();
        let settled = settle(context, delivery, attempt, outcome, handled_in)
            .instrument(span)
            .await;
        let settled = match settled {
            DeliveryOutcome::Applied if duplicates > 0 => DeliveryOutcome::Duplicate,
            other => other,
        };
        let queue = &context.queue.queue;
        context
            .shared
            .metrics
            .delivered(queue, settled, Some(handled_in));
        settled
    })
    .await
}

/// Acks, retries or dead-letters `delivery` according to the handler's `outcome`; says which.
async fn settle(
    context: &Context,
    delivery: &Delivery,
    attempt: u32,
    outcome: Result<(), HandlerError>,
    handled_in: Duration,
) -> DeliveryOutcome {
    let timeout = context.shared.settings.operation_timeout;
    let max_retries = context.shared.settings.max_retries;
    let elapsed_us = u64::try_from(handled_in.as_micros()).unwrap_or(u64::MAX);
    match outcome {
        Ok(()) => {
            tracing::info!(elapsed_us, "handled message");
            ack(delivery, timeout).await;
            DeliveryOutcome::Applied
        }
        Err(HandlerError::Transient(reason)) if attempt <= max_retries => {
            tracing::warn!(error = %reason, elapsed_us, "transient failure; retrying after a delay");
            let copy = Prepared {
                exchange: String::new(),
                routing_key: context.queue.retry_queue.clone(),
                body: delivery.data.clone(),
                properties: envelope::with_attempt(&delivery.properties, attempt + 1),
                // The copy keeps the original's `traceparent`: its next delivery is another
                // child of the same publish span, beside this one.
                span: tracing::Span::none(),
            };
            match publish_all(&context.shared, vec![Ok(copy)]).await.pop() {
                Some(Ok(())) => {
                    ack(delivery, timeout).await;
                    DeliveryOutcome::Retried
                }
                failed => {
                    // Leave it unacked: the rebuilt connection gets it redelivered, so a retry is
                    // never lost (and never requeued in a hot loop either).
                    let error = failed.map_or_else(|| "no result".to_owned(), |r| format!("{r:?}"));
                    tracing::warn!(
                        error,
                        "cannot schedule the retry; rebuilding the connection"
                    );
                    context
                        .session
                        .fail(format!("retry publish failed: {error}"));
                    DeliveryOutcome::Unsettled
                }
            }
        }
        Err(error) => {
            trace_context::record_failure(&tracing::Span::current(), "dead_lettered");
            tracing::warn!(error = %error, elapsed_us, "message failed; moving it to the dead-letter queue");
            dead_letter(delivery, timeout).await;
            DeliveryOutcome::DeadLettered
        }
    }
}

async fn ack(delivery: &Delivery, timeout: Duration) {
    match tokio::time::timeout(timeout, delivery.ack(BasicAckOptions::default())).await {
        Ok(Ok(_)) => {}
        // The broker redelivers unacked messages; the consumer's inbox absorbs the duplicate.
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "ack failed; the message will be redelivered")
        }
        Err(_) => tracing::warn!("ack timed out; the message may be redelivered"),
    }
}

async fn dead_letter(delivery: &Delivery, timeout: Duration) {
    let options = BasicNackOptions {
        requeue: false,
        ..BasicNackOptions::default()
    };
    match tokio::time::timeout(timeout, delivery.nack(options)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "nack failed; the message will be redelivered")
        }
        Err(_) => tracing::warn!("nack timed out; the message may be redelivered"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_at_most_half_the_prefetch_and_never_more_than_the_maximum() {
        assert_eq!(batch_limit(1), 1);
        assert_eq!(batch_limit(2), 1);
        assert_eq!(batch_limit(8), 4);
        assert_eq!(
            batch_limit(super::super::settings::DEFAULT_PREFETCH),
            MAX_BATCH
        );
        assert_eq!(batch_limit(u16::MAX), MAX_BATCH);
    }
}
