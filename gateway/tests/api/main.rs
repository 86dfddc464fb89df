//! The gateway's API tests: a real gateway on port 0 in front of faked upstreams.

mod edge;
mod helpers;
mod orders;
mod prices;
mod products;
mod resilience;
