//! inventory-service: stock levels and reservations.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`config::Settings`], read from the environment |
//! | [`startup`] | [`startup::Application`]: wiring, serving, background workers |
//! | [`routes`] | `GET/PUT /stock/{sku}`, `POST /reserve`, `POST /release` |
//! | [`domain`] | stock levels, quantities, reservation states |
//! | [`store`] | the repository trait, its SQLite and PostgreSQL implementations (migrations in `migrations/sqlite/` and `migrations/postgres/`) |
//! | [`messaging`] | the `order.placed` / `order.cancelled` consumer |
//! | [`sweeper`] | expiry of reservations that were never committed |
//! | [`state`], [`error`] | request state and the problem+json error type |

pub mod config;
pub mod domain;
pub mod error;
pub mod messaging;
pub mod routes;
pub mod startup;
pub mod state;
pub mod store;
pub mod sweeper;

/// The service's name in logs, metrics and queue names.
pub const SERVICE: &str = "inventory";
