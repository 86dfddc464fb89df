//! `order.placed` commits reservations; `order.cancelled` returns their units. Both are
//! deduplicated by message ID in the same transaction as their effect.

use std::sync::Arc;

use futures::future::BoxFuture;
use shared::events::{Event, OrderCancelled, OrderPlaced};
use shared::messaging::{ConsumerSpec, Handler, HandlerError, IncomingMessage};

use crate::store::{Applied, InventoryStore, StoreError};

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
        let (applied, order_id) = match message.event_type.as_str() {
            OrderPlaced::TYPE => {
                let event: OrderPlaced = message.decode()?;
                let applied = self
                    .store
                    .commit_order(message.message_id, event.lines)
                    .await
                    .map_err(to_handler_error)?;
                (applied, event.order_id)
            }
            OrderCancelled::TYPE => {
                let event: OrderCancelled = message.decode()?;
                let applied = self
                    .store
                    .cancel_order(message.message_id, event.lines)
                    .await
                    .map_err(to_handler_error)?;
                (applied, event.order_id)
            }
            other => {
                return Err(HandlerError::Permanent(format!(
                    "{QUEUE} does not handle {other}"
                )));
            }
        };
        log_applied(&message, order_id, &applied);
        Ok(())
    }
}

fn log_applied(message: &IncomingMessage, order_id: uuid::Uuid, applied: &Applied) {
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
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.apply(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_failures_are_retried_and_bad_events_are_dead_lettered() {
        assert!(matches!(
            to_handler_error(StoreError::Database(sqlx::Error::PoolTimedOut)),
            HandlerError::Transient(_)
        ));
        assert!(matches!(
            to_handler_error(StoreError::UnknownReservation(uuid::Uuid::nil())),
            HandlerError::Permanent(_)
        ));
    }
}
