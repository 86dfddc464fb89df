//! pricing-service: prices, and how many units of each product have sold.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`config::Settings`], read from the environment |
//! | [`startup`] | [`startup::Application`]: wiring, serving, the outbox relay |
//! | [`routes`] | `GET /prices`, `GET/PUT /prices/{sku}` |
//! | [`domain`] | the price record and its validation |
//! | [`store`] | the repository trait, on SQLite or PostgreSQL (migrations in `migrations/<backend>/`) |
//! | [`messaging`] | the `order.placed` consumer (units sold) |
//! | [`state`], [`error`] | request state and the problem+json error type |
//!
//! A price change is stored together with a `price.changed` outbox row in one transaction; the
//! [`shared::outbox::OutboxRelay`] publishes it with confirms, so no change is lost or invented.
//! With a `postgres://` `DATABASE_URL` several replicas share one database: each change of a
//! SKU's price takes the next version, each `order.placed` counts once, and one replica at a
//! time relays the outbox.

pub mod config;
pub mod domain;
pub mod error;
pub mod messaging;
pub mod routes;
pub mod startup;
pub mod state;
pub mod store;

/// The service's name in logs, metrics and queue names.
pub const SERVICE: &str = "pricing";
