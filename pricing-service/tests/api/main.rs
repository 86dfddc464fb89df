//! pricing-service's API tests: the real service on a free port, a real broker.

mod helpers;
mod order_events;
mod postgres;
mod prices;
