//! The event contract: every message type, its routing key and schema version, in one place that
//! publishers and consumers both use.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Money;

/// An event type carried over the broker.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event name, also its routing key (`order.placed`).
    const TYPE: &'static str;
    /// The payload's schema version; bump on incompatible changes.
    const VERSION: u32;
}

/// One line of an order as carried in events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// Product.
    pub sku: String,
    /// Units.
    pub qty: u32,
    /// The inventory reservation holding the units.
    pub reservation_id: Uuid,
    /// Price per unit.
    pub unit_price: Money,
}

/// An order was accepted: inventory commits its reservations, pricing counts units sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    /// Order.
    pub order_id: Uuid,
    /// Lines with their reservations.
    pub lines: Vec<EventLine>,
    /// Order total.
    pub total: Money,
    /// ISO 4217 currency.
    pub currency: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
    const VERSION: u32 = 1;
}

/// An order was cancelled: inventory releases its stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    /// Order.
    pub order_id: Uuid,
    /// Lines whose reservations are released.
    pub lines: Vec<EventLine>,
}

impl Event for OrderCancelled {
    const TYPE: &'static str = "order.cancelled";
    const VERSION: u32 = 1;
}

/// A price changed: order-service refreshes its price cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PriceChanged {
    /// Product.
    pub sku: String,
    /// New price per unit.
    pub price: Money,
    /// ISO 4217 currency.
    pub currency: String,
    /// The SKU's price version: each change of one SKU's price takes the next, also when several
    /// replicas of pricing change it at once, so of two events the higher version is the newer
    /// price. 0 in events from publishers that predate versions.
    #[serde(default)]
    pub version: u64,
}

impl Event for PriceChanged {
    const TYPE: &'static str = "price.changed";
    const VERSION: u32 = 1;
}
