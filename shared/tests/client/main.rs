//! The resilient client against real HTTP upstreams (wiremock, and small instances of our own
//! on 127.0.0.x behind a resolver the test controls): retries, breaker, deadlines, discovery,
//! balancing, ejection, hedging, the bound on attempts in flight, headers and metrics. Timing that needs a clock is driven by tokio's test clock.

mod balancing;
mod breaker;
mod concurrency;
mod deadlines;
mod hedging;
mod helpers;
mod instances;
mod metrics;
mod retries;
