//! What pricing consumes from the broker.

pub mod order_events;

pub use order_events::OrderEventsHandler;
