//! The order domain: orders and their rules, and the price cache. No I/O here.

mod order;
mod price_cache;

pub use order::{
    InvalidOrder, MAX_LINES, MAX_SKU_LEN, Order, OrderLine, OrderRequest, OrderStatus, PriceSource,
    RequestedLine,
};
pub use price_cache::{CachedPrice, PriceCache};
