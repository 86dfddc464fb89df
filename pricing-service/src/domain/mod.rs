//! Pricing's domain rules, free of HTTP and SQL.

pub mod price;

pub use price::{Price, validate_currency, validate_sku};
