//! The API gateway: the system's only public entry point (`:8080`).
//!
//! It owns no data. For every request it adopts or mints the correlation ID and sets the request
//! budget (both done by the shared [`Chassis`](shared::server::Chassis)), then forwards to the
//! internal services through one [`ResilientClient`](shared::client::ResilientClient) per
//! dependency, so upstream failures come back as `502`/`503`/`504` problems instead of hangs.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`Settings`](config::Settings), read from the environment in one place |
//! | [`startup`] | [`Application`](startup::Application): build the clients and router, serve |
//! | [`state`] | [`AppState`](state::AppState): the three clients and the admin key |
//! | [`routes`] | one file per public resource: orders, products, prices |
//! | [`forward`] | the lean pass-through path: raw JSON bodies, path segments, relayed responses |
//! | [`rate_limit`] | per-client token buckets: `429` + `Retry-After` + `RateLimit` headers |
//! | [`openapi`] | the OpenAPI 3.1 document of the public API, served at `/openapi.json` |
//! | [`auth`] | the admin API-key check guarding price changes |
//! | [`error`] | [`ApiError`](error::ApiError) → problem+json, upstream 4xx passed through |

pub mod auth;
pub mod config;
pub mod error;
pub mod forward;
pub mod openapi;
pub mod rate_limit;
pub mod routes;
pub mod startup;
pub mod state;

/// The service name in logs, metrics and problem documents.
pub const SERVICE: &str = "gateway";
