//! `price.changed` → the price cache.

use futures::future::BoxFuture;
use shared::db::Database;
use shared::events::PriceChanged;
use shared::inbox;
use shared::messaging::{Handler, HandlerError, IncomingMessage};

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
        self.prices.put(&event.sku, event.price, &event.currency);
        tracing::info!(sku = %event.sku, price = %event.price, currency = %event.currency, "price cache refreshed");
        Ok(())
    }
}

impl Handler for PriceChangedHandler {
    fn handle(&self, message: IncomingMessage) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.apply(message))
    }
}

fn transient(error: sqlx::Error) -> HandlerError {
    HandlerError::Transient(error.to_string())
}
