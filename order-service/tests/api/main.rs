//! order-service's API tests: the real service on a free port, pricing and inventory faked with
//! wiremock, events through the real RabbitMQ in a namespace of each test's own.

mod cancel;
mod deadlines;
mod health;
mod helpers;
mod idempotency;
mod orders;
mod price_cache;
