//! `order.placed` adds each line's units to its SKU's sales counter, once per message ID (the
//! inbox row and the counters are written in one transaction; the events waiting on the queue
//! together share one).

use std::sync::Arc;

use shared::events::{Event, OrderPlaced};
use shared::messaging::{ConsumerSpec, Handler, HandlerError, HandlerFuture, IncomingMessage};

use crate::store::{PriceStore, SalesRecorded, StoreError};

/// The queue pricing's order events arrive on.
pub const QUEUE: &str = "pricing.order-events";

/// Counts units sold from `order.placed`.
#[derive(Clone)]
pub struct OrderEventsHandler {
    store: Arc<dyn PriceStore>,
}

impl OrderEventsHandler {
    /// A handler recording sales in `store`.
    pub fn new(store: Arc<dyn PriceStore>) -> Self {
        Self { store }
    }

    /// The consumer to hand to [`shared::messaging::Broker::start`].
    pub fn consumer(store: Arc<dyn PriceStore>) -> ConsumerSpec {
        ConsumerSpec {
            queue: QUEUE.to_owned(),
            event_types: vec![OrderPlaced::TYPE],
            handler: Arc::new(Self::new(store)),
        }
    }

    async fn apply(&self, message: IncomingMessage) -> Result<(), HandlerError> {
        let event = decode(&message)?;
        let recorded = self
            .store
            .record_sales(message.message_id, event.lines.clone())
            .await
            .map_err(to_handler_error)?;
        log_recorded(&message, &event, &recorded);
        Ok(())
    }

    /// Records every order of `messages` in one store transaction; a message that does not
    /// decode fails the whole batch (the consumer then handles each alone).
    async fn apply_all(&self, messages: &[IncomingMessage]) -> Result<(), HandlerError> {
        let events = messages.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let orders = messages
            .iter()
            .zip(&events)
            .map(|(message, event)| (message.message_id, event.lines.clone()))
            .collect();
        let recorded = self
            .store
            .record_sales_batch(orders)
            .await
            .map_err(to_handler_error)?;
        for ((message, event), recorded) in messages.iter().zip(&events).zip(&recorded) {
            message.in_scope(|| log_recorded(message, event, recorded));
        }
        Ok(())
    }
}

fn decode(message: &IncomingMessage) -> Result<OrderPlaced, HandlerError> {
    if message.event_type != OrderPlaced::TYPE {
        return Err(HandlerError::Permanent(format!(
            "{QUEUE} does not handle {}",
            message.event_type
        )));
    }
    message.decode()
}

fn log_recorded(message: &IncomingMessage, event: &OrderPlaced, recorded: &SalesRecorded) {
    if recorded.duplicate {
        tracing::info!(message_id = %message.message_id, order_id = %event.order_id, "duplicate message skipped");
        return;
    }
    if !recorded.unknown_skus.is_empty() {
        // Priced from order-service's cache for a SKU this service no longer has: the sale
        // happened, but there is no counter to add it to. Worth a look, not worth a DLQ.
        tracing::warn!(order_id = %event.order_id, skus = ?recorded.unknown_skus, "units sold of unknown SKUs not counted");
    }
    tracing::info!(message_id = %message.message_id, order_id = %event.order_id, units = recorded.units, "units sold recorded");
}

/// Every store failure here is the database's (busy, or a PostgreSQL server away), which may
/// recover: retry, and dead-letter only once the retries run out. Nothing was written, since
/// every recording is one transaction.
fn to_handler_error(error: StoreError) -> HandlerError {
    HandlerError::Transient(error.to_string())
}

impl Handler for OrderEventsHandler {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(self.apply(message))
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        Some(Box::pin(self.apply_all(messages)))
    }
}
