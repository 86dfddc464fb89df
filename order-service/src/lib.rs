//! order-service: places and cancels orders (DESIGN §5 flows 1–3).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`Settings`](config::Settings), read from the environment in one place |
//! | [`startup`] | [`Application`](startup::Application): wiring, serving, background workers |
//! | [`routes`] | `POST /orders`, `GET /orders/{id}`, `POST /orders/{id}/cancel` |
//! | [`placement`] | the place-order flow: price + reserve concurrently, compensate, store |
//! | [`clients`] | typed calls to pricing and inventory over the shared resilient client |
//! | [`domain`] | orders and their rules; the in-memory price cache |
//! | [`store`] | [`OrderRepository`](store::OrderRepository) on SQLite (embedded) or PostgreSQL (replicas) |
//! | [`messaging`] | the `price.changed` consumer that feeds the price cache through the store's inbox |
//! | [`state`] / [`error`] | what handlers share; the HTTP error enum |
//!
//! Events go out through the transactional outbox: an order and its `order.placed` (or
//! `order.cancelled`) row are committed together, and a relay publishes the row with confirms.
//!
//! The price cache is only a cache: in memory, empty after a restart, refilled by `price.changed`
//! events and by every successful live lookup. It is read only when pricing cannot answer, and
//! lines priced from it say so (`priceSource: "cache"`, `pricedFromCache: true`).

pub mod clients;
pub mod config;
pub mod domain;
pub mod error;
pub mod messaging;
pub mod placement;
pub mod routes;
pub mod startup;
pub mod state;
pub mod store;

/// The service's name in logs, metrics and broker queues.
pub const SERVICE: &str = "order";
