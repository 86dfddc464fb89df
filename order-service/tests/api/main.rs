//! order-service's API tests: the real service on a free port, pricing and inventory faked with
//! wiremock, events through the real RabbitMQ in a namespace of each test's own; state in SQLite
//! in memory, and in a PostgreSQL database of the test's own for the tests in `postgres`.

mod cancel;
mod deadlines;
mod health;
mod helpers;
mod idempotency;
mod orders;
mod postgres;
mod price_cache;
