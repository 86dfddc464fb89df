//! Cross-cutting building blocks shared by every service in the workspace.
//!
//! Services contain only their own domain; everything about *how services talk* lives here once:
//!
//! | module | what it holds |
//! |---|---|
//! | [`admission`] | overload: adaptive concurrency limit, listener timeouts and connection limit |
//! | [`client`] | the resilient HTTP client: timeouts, retries, retry budget, circuit breaker |
//! | [`correlation`] | correlation IDs: adopt or mint at the edge, task-local, echoed on responses |
//! | [`deadline`] | request budgets forwarded hop to hop, enforced at every service |
//! | [`telemetry`] | JSON-lines logging with `service`, `correlationId`, `traceId` and `msg`; OTLP trace export when asked |
//! | [`trace_context`] | W3C trace context: extracted by the chassis, injected per client attempt and per AMQP message |
//! | [`problem`] | RFC 9457 problem+json errors and a JSON extractor that answers with them |
//! | [`server`] | the middleware stack every service runs, serving with a bounded drain |
//! | [`health`] / [`metrics`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`messaging`] / [`events`] | RabbitMQ: supervisor, topology, confirmed publishing, consumers, DLQ |
//! | [`db`] / [`outbox`] / [`inbox`] | SQLite per service, transactional outbox and relay, consumer inbox |
//! | [`pg`] | PostgreSQL per service (several replicas): pool, migrations, backend choice |
//! | [`money`] | amounts in cents |
//! | [`config`] | reading the environment in one place |
//! | [`shutdown`] | SIGINT/SIGTERM and bounded draining |
//! | `testing` (feature `testing`) | what every test harness shares: `assert_eventually`, the test broker, a PostgreSQL database per test, quiet logs |

pub mod admission;
pub mod client;
pub mod config;
pub mod correlation;
pub mod db;
pub mod deadline;
pub mod events;
pub mod health;
pub mod inbox;
pub mod messaging;
pub mod metrics;
pub mod money;
pub mod outbox;
pub mod pg;
pub mod problem;
pub mod server;
pub mod shutdown;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace_context;
