//! What order-service consumes from the broker.

mod price_events;

pub use price_events::PriceChangedHandler;

use std::sync::Arc;

use shared::events::{Event, PriceChanged};
use shared::messaging::ConsumerSpec;

use crate::domain::PriceCache;
use crate::store::OrderRepository;

/// The queue that feeds the price cache.
pub const PRICE_EVENTS_QUEUE: &str = "order.price-events";

/// Every consumer this service runs.
pub fn consumers(store: Arc<dyn OrderRepository>, prices: PriceCache) -> Vec<ConsumerSpec> {
    vec![ConsumerSpec {
        queue: PRICE_EVENTS_QUEUE.to_owned(),
        event_types: vec![PriceChanged::TYPE],
        handler: Arc::new(PriceChangedHandler::new(store, prices)),
    }]
}
