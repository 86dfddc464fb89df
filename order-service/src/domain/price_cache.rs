//! The price cache: the last known price of each SKU, used only when pricing cannot answer.
//!
//! It is a cache, not a copy of pricing's data: it lives in memory, starts empty, is lost on
//! restart, and is refilled by `price.changed` events and by every successful live lookup. Orders
//! priced from it are marked (`priceSource: "cache"`), because a cached price can be stale.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shared::money::Money;
use tokio::time::Instant;

/// A price as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPrice {
    /// Price per unit.
    pub price: Money,
    /// ISO 4217 currency.
    pub currency: String,
    /// When it was stored (to report how stale it may be).
    pub stored_at: Instant,
}

impl CachedPrice {
    /// How long ago the price was stored.
    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }
}

/// Last known prices by SKU. Cheap to clone; clones share the entries.
///
/// Reads vastly outnumber writes and both are a hash-map operation, so a plain `RwLock` held for
/// nanoseconds (never across an `.await`) is all the synchronisation it needs.
#[derive(Debug, Clone, Default)]
pub struct PriceCache {
    entries: Arc<RwLock<HashMap<String, CachedPrice>>>,
}

impl PriceCache {
    /// The last known price of `sku`.
    pub fn get(&self, sku: &str) -> Option<CachedPrice> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(sku)
            .cloned()
    }

    /// Remembers `price` as the latest price of `sku` (last writer wins: events and live lookups
    /// both carry the current price, and a briefly stale fallback is acceptable).
    pub fn put(&self, sku: &str, price: Money, currency: &str) {
        let entry = CachedPrice {
            price,
            currency: currency.to_owned(),
            stored_at: Instant::now(),
        };
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sku.to_owned(), entry);
    }

    /// Number of cached SKUs.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_latest_price_wins_and_its_age_is_known() {
        let cache = PriceCache::default();
        assert!(cache.get("BK-12").is_none());
        cache.put("BK-12", Money(3990), "EUR");
        tokio::time::advance(Duration::from_secs(5)).await;
        cache.clone().put("BK-12", Money(3500), "EUR");
        tokio::time::advance(Duration::from_secs(2)).await;
        let cached = cache.get("BK-12").expect("cached");
        assert_eq!(cached.price, Money(3500));
        assert_eq!(cached.age(), Duration::from_secs(2));
        assert_eq!(cache.len(), 1);
    }
}
