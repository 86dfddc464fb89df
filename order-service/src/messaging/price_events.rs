//! `price.changed` → the price cache; the events waiting on the queue together are applied in one
//! transaction of the store (inbox row and versioned price), then refresh the in-memory cache.

use std::sync::Arc;

use shared::events::PriceChanged;
use shared::messaging::{Handler, HandlerError, HandlerFuture, IncomingMessage};

use crate::domain::PriceCache;
use crate::store::{OrderRepository, PriceChange, PriceChangeOutcome, StoreError};

/// Refreshes the price cache from `price.changed`, deduplicating by message ID in the store's
/// inbox and ignoring a price older than the one cached.
#[derive(Clone)]
pub struct PriceChangedHandler {
    store: Arc<dyn OrderRepository>,
    prices: PriceCache,
}

impl std::fmt::Debug for PriceChangedHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PriceChangedHandler")
            .field("prices", &self.prices)
            .finish_non_exhaustive()
    }
}

impl PriceChangedHandler {
    /// A handler writing into `prices`, recording handled messages through `store`.
    pub fn new(store: Arc<dyn OrderRepository>, prices: PriceCache) -> Self {
        Self { store, prices }
    }

    /// Applies `messages` in one store transaction, then refreshes the cache in queue order with
    /// the changes the store applied (so the newest version of a SKU wins); a message that does
    /// not decode fails the whole batch (the consumer then handles each alone).
    async fn apply_all(&self, messages: &[IncomingMessage]) -> Result<(), HandlerError> {
        let changes = messages
            .iter()
            .map(|message| {
                let event: PriceChanged = message.decode()?;
                Ok(PriceChange {
                    message_id: message.message_id,
                    sku: event.sku,
                    price: event.price,
                    currency: event.currency,
                    version: event.version,
                })
            })
            .collect::<Result<Vec<_>, HandlerError>>()?;
        let outcomes = self
            .store
            .apply_price_changes(&changes)
            .await
            .map_err(handler_error)?;
        // After the commit: if it failed, the messages are redelivered and applied then. The
        // cache is memory, so a crash right here loses it anyway.
        for ((message, change), outcome) in messages.iter().zip(&changes).zip(outcomes) {
            message.in_scope(|| match outcome {
                PriceChangeOutcome::Applied => self.refresh(change),
                PriceChangeOutcome::Duplicate => {
                    tracing::debug!(message_id = %message.message_id, "duplicate price.changed ignored");
                }
                PriceChangeOutcome::Superseded => {
                    tracing::info!(sku = %change.sku, version = change.version, "price.changed older than the cached price ignored");
                }
            });
        }
        Ok(())
    }

    fn refresh(&self, change: &PriceChange) {
        self.prices.put(&change.sku, change.price, &change.currency);
        tracing::info!(sku = %change.sku, price = %change.price, currency = %change.currency, version = change.version, "price cache refreshed");
    }
}

impl Handler for PriceChangedHandler {
    fn handle(&self, message: IncomingMessage) -> HandlerFuture<'_> {
        Box::pin(async move { self.apply_all(std::slice::from_ref(&message)).await })
    }

    fn handle_batch<'a>(&'a self, messages: &'a [IncomingMessage]) -> Option<HandlerFuture<'a>> {
        Some(Box::pin(self.apply_all(messages)))
    }
}

/// A database failure is retried (the server may be back by the next delivery); a row that
/// makes no sense will not fix itself.
fn handler_error(error: StoreError) -> HandlerError {
    match error {
        StoreError::Database(_) => HandlerError::Transient(error.to_string()),
        StoreError::Corrupt(_) => HandlerError::Permanent(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use shared::correlation::CorrelationId;
    use shared::pg::PgDatabase;
    use tokio_util::sync::CancellationToken;

    use shared::events::Event;
    use shared::money::Money;

    use super::*;
    use crate::store::{MIGRATIONS, PG_MIGRATIONS, PgOrderRepository, SqliteOrderRepository};

    fn delivery(sku: &str, cents: i64, version: u64) -> IncomingMessage {
        let event = PriceChanged {
            sku: sku.to_owned(),
            price: Money(cents),
            currency: "EUR".to_owned(),
            version,
        };
        IncomingMessage {
            message_id: uuid::Uuid::new_v4(),
            event_type: PriceChanged::TYPE.to_owned(),
            version: PriceChanged::VERSION,
            data: serde_json::to_vec(&event).expect("serialises").into(),
            attempt: 1,
            correlation_id: CorrelationId::new(),
        }
    }

    async fn sqlite_handler() -> PriceChangedHandler {
        let database = shared::db::connect("sqlite::memory:", MIGRATIONS)
            .await
            .expect("the database opens");
        PriceChangedHandler::new(
            Arc::new(SqliteOrderRepository::new(database)),
            PriceCache::default(),
        )
    }

    #[tokio::test]
    async fn a_redelivered_price_change_does_not_refresh_the_cache_again() {
        let handler = sqlite_handler().await;
        let change = delivery("BK-12", 3500, 1);
        handler.handle(change.clone()).await.expect("handles");
        // A live lookup since then knows better.
        handler.prices.put("BK-12", Money(3600), "EUR");

        handler.handle(change).await.expect("handles");

        assert_eq!(
            handler.prices.get("BK-12").map(|p| p.price),
            Some(Money(3600))
        );
    }

    #[tokio::test]
    async fn of_a_batch_the_cache_keeps_the_newest_version_of_each_sku() {
        let handler = sqlite_handler().await;
        let batch = [
            delivery("BK-12", 3000, 2),
            delivery("BK-12", 2000, 1),
            delivery("MG-07", 900, 1),
        ];

        handler
            .handle_batch(&batch)
            .expect("batches")
            .await
            .expect("handles");

        assert_eq!(
            handler.prices.get("BK-12").map(|p| p.price),
            Some(Money(3000))
        );
        assert_eq!(
            handler.prices.get("MG-07").map(|p| p.price),
            Some(Money(900))
        );
    }

    #[tokio::test]
    async fn with_the_database_away_a_price_change_is_retried_not_dead_lettered() {
        let shutdown = CancellationToken::new();
        // Port 1 refuses connections on every machine.
        let database = PgDatabase::start(
            "postgres://postgres@127.0.0.1:1/x",
            PG_MIGRATIONS,
            shutdown.clone(),
        )
        .expect("a valid URL");
        let handler = PriceChangedHandler::new(
            Arc::new(PgOrderRepository::new(database)),
            PriceCache::default(),
        );

        let outcome = handler.handle(delivery("BK-12", 3500, 1)).await;

        assert!(
            matches!(outcome, Err(HandlerError::Transient(_))),
            "{outcome:?}"
        );
        assert!(handler.prices.is_empty());
        shutdown.cancel();
    }
}
