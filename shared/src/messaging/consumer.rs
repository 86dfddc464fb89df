//! Consuming: manual acks, prefetch-bounded concurrency, delayed retries, dead letters.
//!
//! For each delivery: decode the envelope (undecodable → DLQ at once), restore the correlation ID,
//! deadline and trace context, run the handler in a span naming the service (the CONSUMER span
//! `process {event type}`, a child of the producer's publish span), then
//! - `Ok` → ack;
//! - [`HandlerError::Transient`] with retries left → publish a copy (same ID, headers, body, with
//!   `x-attempt` + 1) to the consumer's retry queue, wait for its confirm, then ack the original;
//! - out of retries, or [`HandlerError::Permanent`] → nack without requeue → the DLQ, headers
//!   intact (the broker adds `x-death`).
//!
//! Nothing is ever requeued in place: a poisoned message cannot spin in a hot loop.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::broker::{Session, Shared};
use super::metrics::{self, DeliveryOutcome};
use super::publisher::{Prepared, publish_all};
use super::topology::QueueTopology;
use super::{Handler, HandlerError, envelope};
use crate::{correlation, deadline, trace_context};

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

/// What each handler task needs.
struct Context {
    shared: Arc<Shared>,
    session: Arc<Session>,
    handler: Arc<dyn Handler>,
    queue: QueueTopology,
}

/// Runs the consumer until its stream ends (returns why, so the supervisor rebuilds) or `stop`
/// (cancels the consumer and lets handlers in flight finish).
pub(super) async fn run(mut task: ConsumerTask) -> String {
    let prefetch = task.shared.settings.prefetch;
    // The broker sends at most `prefetch` unacked deliveries; the semaphore makes the same bound
    // explicit for the handler tasks, so a misbehaving broker cannot spawn unbounded work.
    let permits = Arc::new(Semaphore::new(usize::from(prefetch)));
    let context = Arc::new(Context {
        shared: task.shared.clone(),
        session: task.session.clone(),
        handler: task.handler.clone(),
        queue: task.queue.clone(),
    });
    loop {
        let next = tokio::select! {
            () = task.stop.cancelled() => {
                drain(&task, &permits).await;
                return "stopped".to_owned();
            }
            next = task.consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return format!("consumer of {} failed: {error}", task.queue.queue),
            None => return format!("consumer of {} was cancelled", task.queue.queue),
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return "consumer permits closed".to_owned();
        };
        tokio::spawn(handle(context.clone(), delivery, permit).in_current_span());
    }
}

/// Stops new deliveries and waits (bounded) for the handlers in flight.
async fn drain(task: &ConsumerTask, permits: &Semaphore) {
    let timeout = task.shared.settings.operation_timeout;
    let _ = tokio::time::timeout(
        timeout,
        task.channel
            .basic_cancel(task.tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    let all = u32::from(task.shared.settings.prefetch);
    if tokio::time::timeout(timeout, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("handlers still running at shutdown; their messages will be redelivered");
    }
}

async fn handle(context: Arc<Context>, delivery: Delivery, _permit: OwnedSemaphorePermit) {
    let timeout = context.shared.settings.operation_timeout;
    let received = match envelope::decode(&delivery.properties, &delivery.data) {
        Ok(received) => received,
        Err(error) => {
            tracing::warn!(
                error = %error,
                message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
                "undecodable message; dead-lettering it"
            );
            dead_letter(&delivery, timeout).await;
            let queue = &context.queue.queue;
            context
                .shared
                .metrics
                .delivered(queue, DeliveryOutcome::DeadLettered, None);
            return;
        }
    };
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
        let (outcome, duplicate) = work.instrument(span.clone()).await;
        let outcome = outcome
            .unwrap_or_else(|_| Err(HandlerError::Permanent("the handler panicked".to_owned())));
        let handled_in = started.elapsed();
        let settled = settle(&context, &delivery, attempt, outcome, handled_in)
            .instrument(span)
            .await;
        let settled = match settled {
            DeliveryOutcome::Applied if duplicate => DeliveryOutcome::Duplicate,
            other => other,
        };
        let queue = &context.queue.queue;
        context
            .shared
            .metrics
            .delivered(queue, settled, Some(handled_in));
    })
    .await;
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
