//! The resilient client against real HTTP upstreams (wiremock): retries, breaker, deadlines,
//! load balancing, headers and metrics. Timing that needs a clock is driven by tokio's test clock.

mod balancing;
mod breaker;
mod deadlines;
mod helpers;
mod metrics;
mod retries;
