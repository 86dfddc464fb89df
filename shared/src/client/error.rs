//! Typed client errors. API SKELETON — see the client task.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::problem::Problem;

/// Why a call through a [`super::ResilientClient`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The dependency answered with a non-2xx status (after any retries).
    #[error("{dependency} answered {status}")]
    Status {
        /// Dependency name.
        dependency: &'static str,
        /// The status.
        status: StatusCode,
        /// The body (often a problem document).
        body: Bytes,
        /// The dependency's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Attempts timed out.
    #[error("{dependency} did not answer in time")]
    Timeout {
        /// Dependency name.
        dependency: &'static str,
    },
    /// The request's deadline left no time to (re)try.
    #[error("deadline exceeded before {dependency} answered")]
    DeadlineExceeded {
        /// Dependency name.
        dependency: &'static str,
    },
    /// Could not connect.
    #[error("cannot connect to {dependency}: {source}")]
    Connect {
        /// Dependency name.
        dependency: &'static str,
        /// Cause.
        source: reqwest::Error,
    },
    /// Other transport failure (connection reset mid-response, ...).
    #[error("transport error talking to {dependency}: {source}")]
    Transport {
        /// Dependency name.
        dependency: &'static str,
        /// Cause.
        source: reqwest::Error,
    },
    /// The breaker is open: failing fast without calling.
    #[error("circuit breaker for {dependency} is open")]
    CircuitOpen {
        /// Dependency name.
        dependency: &'static str,
        /// When the breaker will let a probe through.
        retry_after: Duration,
    },
    /// A 2xx body was not the expected JSON.
    #[error("unexpected response body from {dependency}: {source}")]
    Decode {
        /// Dependency name.
        dependency: &'static str,
        /// Cause.
        source: serde_json::Error,
    },
    /// The client could not be built.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The upstream status, for [`ClientError::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        todo!()
    }

    /// The problem to answer our own caller with when a dependency fails: `502` for a bad answer,
    /// `503` (with `Retry-After`) when it is unavailable or its breaker is open, `504` on timeouts.
    pub fn to_problem(&self) -> Problem {
        todo!()
    }
}
