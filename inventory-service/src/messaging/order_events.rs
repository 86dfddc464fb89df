//! `order.placed` commits reservations; `order.cancelled` returns their units. Both are
//! deduplicated by message ID in the same transaction as their effect; the events waiting on the
//! queue together are applied in one transaction.

use std::sync::Arc;

use shared::events::{Event, OrderCancelled, OrderPlaced};
use shared::messaging::{ConsumerSpec, Handler, HandlerError, HandlerFuture, IncomingMessage};
use uuid::Uuid;

use crate::store::{Applied, InventoryStore, OrderEvent, StoreError};

/// The queue inventory's order events arrive on.
pub const QUEUE: &str = "inventory.order-events";

/// Handles `order.placed` and `order.cancelled`.
#[derive(Clone)]
pub struct OrderEventsHandler {
    store: Arc<dyn InventoryStore>,
}

impl OrderEventsHandler {
    /// A handler applying events to `store`.
    pub fn new(store: Arc<dyn InventoryStore>) -> Self {
        Self { store }
    }

    /// The consumer to hand to [`shared::messaging::Broker::start`].
    pub fn consumer(store: Arc<dyn InventoryStore>) -> ConsumerSpec {
        ConsumerSpec {
            queue: QUEUE.to_owned(),
            event_types: vec![OrderPlaced::TYPE, OrderCancelled::TYPE],
            handler: Arc::new(Self::new(store)),
        }
    }

    async fn apply(&self, message: IncomingMessage) -> Result<(), HandlerError> {
        let (order_id, event) = decode(&message)?;
        let applied = match event {
            OrderEvent::Placed(lines) => self.store.commit_order(message.message_id, lines).await,
            OrderEvent::Cancelled(lines) => {
                self.store.cancel_order(message.message_id, lines).await
            }
        }
        .map_err(to_handler_error)?;
        log_applied(&message, order_id, &applied);
        Ok(())
    }

    /// Applies `messages` in one store transaction. Any message that does not decode, or whose
    /// lines the store refuses, fails the whole batch (the consumer then handles each alone).
    async fn apply_all(&self, messages: &[IncomingMessage]) -> Result<(), HandlerError> {
        let mut order_ids = Vec::with_capacity(messages.len());
        let mut events = Vec::with_capacity(messages.len());
        for message in messages {
            let (order_id, event) = decode(message)?;
            order_ids.push(order_id);
            events.push((message.message_id, event));
        }
        let applied = self
            .store
            .apply_order_events(events)
            .await
            .map_err(to_handler_error)?;
        for ((message, order_id), applied) in messages.iter().zip(order_ids).zip(&applied) {
            message.in_scope(|| log_applied(message, order_id, applied));
        }
        Ok(())
    }
}

/// The order a message is about and what to do with its lines.
fn decode(message: &IncomingMessage) -> Result<(Uuid, OrderEvent), HandlerError> {
    match message.event_type.as_str() {
        OrderPlaced::TYPE => {
            let event: OrderPlaced = message.decode()?;
            Ok((event.order_id, OrderEvent::Placed(event.lines)))
        }
        OrderCancelled::TYPE => {
            let event: OrderCancelled = message.decode()?;
            Ok((event.order_id, OrderEvent::Cancelled(event.lines)))
        }
        other => Err(HandlerError::Permanent(format!(
            "{QUEUE} does not handle {other}"
        ))),
    }
}

fn log_applied(message: &IncomingMessage, order_id: Uuid, applied: &Applied) {
    if applied.duplicate {
        tracing::info!(
            message_id = %message.message_id,
            event = message.event_type,
            %order_id,
            "duplicate message skipped"
        );
    } else {
        tracing::info!(
            message_id = %message.message_id,
            event = message.event_type,
            %order_id,
            changed = applied.changed,
            retaken = applied.retaken,
            unchanged = applied.unchanged,
            "order event applied"
        );
    }
}

/// A busy or failing database may recover, so retry; an event that names reservations this
/// service does not have (or describes them wrongly) never will, so dead-letter it for a person.
fn to_handler_error(error: StoreError) -> HandlerError {
    match error {
        StoreError::Database(cause) => HandlerError::Transient(cause.to_string()),
        other => HandlerError::Permanent(other.to_string()),
    }
}

impl Handler for OrderEventsHandler {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(self.apply(message))
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        Some(Box::pin(self.apply_all(messages)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_failures_are_retried_and_bad_events_are_dead_lettered() {
        assert!(matches!(
            to_handler_error(StoreError::Database(sqlx::Error::PoolTimedOut.into())),
            HandlerError::Transient(_)
        ));
        assert!(matches!(
            to_handler_error(StoreError::UnknownReservation(Uuid::nil())),
            HandlerError::Permanent(_)
        ));
    }
}
