//! `price.changed` → the price cache; the events waiting on the queue together are recorded in
//! the inbox in one transaction.

use shared::db::Database;
use shared::events::PriceChanged;
use shared::inbox;
use shared::messaging::{Handler, HandlerError, HandlerFuture, IncomingMessage};

use crate::domain::PriceCache;

/// Refreshes the price cache from `price.changed`, deduplicating by message ID in the inbox.
#[derive(Debug, Clone)]
pub struct PriceChangedHandler {
    db: Database,
    prices: PriceCache,
}

impl PriceChangedHandler {
    /// A handler writing into `prices`, recording handled messages in `db`'s inbox.
    pub fn new(db: Database, prices: PriceCache) -> Self {
        Self { db, prices }
    }

    async fn apply(&self, message: IncomingMessage) -> Result<(), HandlerError> {
        let event: PriceChanged = message.decode()?;
        let mut tx = self.db.begin_write().await.map_err(transient)?;
        if !inbox::record(&mut tx, message.message_id)
            .await
            .map_err(transient)?
        {
            tracing::debug!(message_id = %message.message_id, "duplicate price.changed ignored");
            return Ok(());
        }
        tx.commit().await.map_err(transient)?;
        // After the commit: if recording failed, the message is redelivered and applied then.
        // The cache is memory, so a crash right here loses it anyway.
        self.refresh(&event);
        Ok(())
    }

    /// Records every message of `messages` in one transaction, then refreshes the cache in queue
    /// order (so the last change of a SKU wins); a message that does not decode fails the whole
    /// batch (the consumer then handles each alone).
    async fn apply_all(&self, messages: &[IncomingMessage]) -> Result<(), HandlerError> {
        let events = messages
            .iter()
            .map(IncomingMessage::decode::<PriceChanged>)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.db.begin_write().await.map_err(transient)?;
        let mut first = Vec::with_capacity(messages.len());
        for message in messages {
            first.push(
                inbox::record(&mut tx, message.message_id)
                    .await
                    .map_err(transient)?,
            );
        }
        tx.commit().await.map_err(transient)?;
        for ((message, event), first) in messages.iter().zip(&events).zip(first) {
            message.in_scope(|| {
                if first {
                    self.refresh(event);
                } else {
                    tracing::debug!(message_id = %message.message_id, "duplicate price.changed ignored");
                }
            });
        }
        Ok(())
    }

    fn refresh(&self, event: &PriceChanged) {
        self.prices.put(&event.sku, event.price, &event.currency);
        tracing::info!(sku = %event.sku, price = %event.price, currency = %event.currency, "price cache refreshed");
    }
}

impl Handler for PriceChangedHandler {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(self.apply(message))
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        Some(Box::pin(self.apply_all(messages)))
    }
}

fn transient(error: sqlx::Error) -> HandlerError {
    HandlerError::Transient(error.to_string())
}
