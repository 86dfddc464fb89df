//! Inventory's domain rules, free of HTTP and SQL: stock levels, quantities, reservation states.

pub mod reservation;
pub mod stock;

pub use reservation::{IdempotencyKey, Quantity, Reservation, ReservationStatus};
pub use stock::{Stock, validate_sku};
