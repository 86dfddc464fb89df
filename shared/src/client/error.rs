//! Typed client errors, their classification (transient or not) and their mapping to problems.

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
        /// The service *behind* the dependency that failed, when the dependency says so
        /// ([`crate::problem::FAILED_DEPENDENCY`]): the dependency itself is healthy.
        downstream: Option<String>,
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
    #[error("cannot connect to {dependency}: {}", chain(.source.as_ref()))]
    Connect {
        /// Dependency name.
        dependency: &'static str,
        /// Cause (the HTTP client's error, whose sources say why: refused, timed out, ...).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Other transport failure (connection reset mid-response, ...).
    #[error("transport error talking to {dependency}: {}", chain(.source.as_ref()))]
    Transport {
        /// Dependency name.
        dependency: &'static str,
        /// Cause (the HTTP client's error, whose sources say what broke).
        source: Box<dyn std::error::Error + Send + Sync>,
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

/// How long our caller is told to wait when a dependency is unreachable and no better figure is
/// known: a restarting instance is usually back within seconds, and one second is the smallest
/// `Retry-After` HTTP can express.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl ClientError {
    /// The upstream status, for [`ClientError::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The dependency the error is about.
    pub fn dependency(&self) -> Option<&'static str> {
        match self {
            Self::Status { dependency, .. }
            | Self::Timeout { dependency }
            | Self::DeadlineExceeded { dependency }
            | Self::Connect { dependency, .. }
            | Self::Transport { dependency, .. }
            | Self::CircuitOpen { dependency, .. }
            | Self::Decode { dependency, .. } => Some(dependency),
            Self::Config(_) => None,
        }
    }

    /// Whether the dependency is temporarily unavailable or overloaded, so the same request may
    /// succeed later: connect and transport errors, timeouts, an open breaker, `429` and `5xx`
    /// except `501 Not Implemented` (which will not change by asking again).
    ///
    /// Not transient: other statuses (the request itself is wrong), a body that does not decode,
    /// a bad configuration, and [`ClientError::DeadlineExceeded`]: the caller's own time ran out,
    /// which says nothing about the dependency.
    pub fn is_transient(&self) -> bool {
        match self {
            // A failure behind the dependency was already retried there; retrying it here too
            // would multiply the load on the failing service (3 attempts × 3 attempts ...).
            Self::Status {
                downstream: Some(_),
                ..
            } => false,
            Self::Status { status, .. } => is_transient_status(*status),
            Self::Timeout { .. }
            | Self::Connect { .. }
            | Self::Transport { .. }
            | Self::CircuitOpen { .. } => true,
            Self::DeadlineExceeded { .. } | Self::Decode { .. } | Self::Config(_) => false,
        }
    }

    /// The problem to answer our own caller with when a dependency fails: `502` for a bad answer,
    /// `503` (with `Retry-After`) when it is unavailable or its breaker is open, `504` on timeouts.
    ///
    /// | error | status |
    /// |---|---|
    /// | `CircuitOpen` | 503, `Retry-After` = time until the breaker half-opens |
    /// | `Connect`, upstream `503`/`429` | 503, `Retry-After` = the dependency's, or 1 s |
    /// | `Timeout`, `DeadlineExceeded`, upstream `504` | 504 |
    /// | other upstream statuses, `Transport`, `Decode` | 502 |
    /// | `Config` | 500 |
    ///
    /// An upstream `4xx` that reaches this method is one the calling service did not handle (it
    /// maps the `404`s and `409`s it expects itself), so for our caller it is a bad answer from a
    /// dependency: `502`. The body carries `"dependency": name` and a short detail; the upstream
    /// body and transport errors stay in the logs, never in the answer.
    pub fn to_problem(&self) -> Problem {
        let problem = match self {
            Self::CircuitOpen { retry_after, .. } => unavailable()
                .detail(format!(
                    "{} is failing; calls to it are paused",
                    self.dependency_name()
                ))
                .retry_after(*retry_after),
            Self::Connect { .. } => unavailable()
                .detail(format!("cannot reach {}", self.dependency_name()))
                .retry_after(DEFAULT_RETRY_AFTER),
            Self::Status {
                status,
                retry_after,
                ..
            } if *status == StatusCode::SERVICE_UNAVAILABLE
                || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                unavailable()
                    .detail(format!(
                        "{} answered {}",
                        self.dependency_name(),
                        status.as_u16()
                    ))
                    .retry_after(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            Self::Status { status, .. } if *status == StatusCode::GATEWAY_TIMEOUT => {
                timed_out().detail(format!("{} ran out of time", self.dependency_name()))
            }
            Self::Timeout { .. } => {
                timed_out().detail(format!("{} did not answer in time", self.dependency_name()))
            }
            Self::DeadlineExceeded { .. } => timed_out().detail(format!(
                "the request's time budget ran out while calling {}",
                self.dependency_name()
            )),
            Self::Status { status, .. } => bad_gateway().detail(format!(
                "{} answered {}",
                self.dependency_name(),
                status.as_u16()
            )),
            Self::Transport { .. } => bad_gateway().detail(format!(
                "the connection to {} failed mid-request",
                self.dependency_name()
            )),
            Self::Decode { .. } => bad_gateway().detail(format!(
                "{} sent an unexpected response body",
                self.dependency_name()
            )),
            Self::Config(_) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
                .detail("an HTTP client is misconfigured"),
        };
        match self {
            // Name the service that actually failed, so the marker travels up every hop.
            Self::Status {
                dependency,
                status,
                downstream: Some(culprit),
                ..
            } => problem
                .detail(format!(
                    "{dependency} answered {} because {culprit} failed",
                    status.as_u16()
                ))
                .with("dependency", culprit),
            _ => match self.dependency() {
                Some(dependency) => problem.with("dependency", dependency),
                None => problem,
            },
        }
    }

    fn dependency_name(&self) -> &'static str {
        self.dependency().unwrap_or("a dependency")
    }
}

/// `error` and its sources, `: `-separated. The HTTP client's own message is terse ("client error
/// (Connect)"); the reason a log reader needs ("Connection refused") is further down the chain.
fn chain(error: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// `429` and `5xx` except `501`: worth asking again.
pub(super) fn is_transient_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

fn unavailable() -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Dependency unavailable")
}

fn timed_out() -> Problem {
    Problem::new(StatusCode::GATEWAY_TIMEOUT, "Dependency timed out")
}

fn bad_gateway() -> Problem {
    Problem::new(StatusCode::BAD_GATEWAY, "Bad answer from a dependency")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<Duration>) -> ClientError {
        ClientError::Status {
            dependency: "pricing",
            status: StatusCode::from_u16(code).expect("status"),
            body: Bytes::from_static(br#"{"detail":"SELECT * FROM prices failed at db.rs:42"}"#),
            retry_after,
            downstream: None,
        }
    }

    #[test]
    fn a_failure_behind_the_dependency_is_named_and_not_retried() {
        let error = ClientError::Status {
            dependency: "order",
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Bytes::new(),
            retry_after: Some(Duration::from_secs(5)),
            downstream: Some("inventory".to_owned()),
        };
        assert!(!error.is_transient());
        let problem = error.to_problem();
        assert_eq!(problem.status, 503);
        assert_eq!(problem.extensions["dependency"], "inventory");
        assert_eq!(
            problem.detail.as_deref(),
            Some("order answered 503 because inventory failed")
        );
    }

    #[test]
    fn upstream_statuses_map_to_bad_gateway_unavailable_or_timeout() {
        let cases = [
            (status(500, None), 502, None),
            (status(502, None), 502, None),
            (status(404, None), 502, None),
            (status(501, None), 502, None),
            (status(503, None), 503, Some(DEFAULT_RETRY_AFTER)),
            (
                status(503, Some(Duration::from_secs(7))),
                503,
                Some(Duration::from_secs(7)),
            ),
            (
                status(429, Some(Duration::from_secs(2))),
                503,
                Some(Duration::from_secs(2)),
            ),
            (status(504, None), 504, None),
        ];
        for (error, expected, retry_after) in cases {
            let problem = error.to_problem();
            assert_eq!(problem.status, expected, "{error}");
            assert_eq!(problem.retry_after, retry_after, "{error}");
            assert_eq!(problem.extensions["dependency"], "pricing");
        }
    }

    #[test]
    fn local_failures_map_to_timeout_or_unavailable() {
        let timeout = ClientError::Timeout {
            dependency: "inventory",
        }
        .to_problem();
        assert_eq!(timeout.status, 504);
        let deadline = ClientError::DeadlineExceeded {
            dependency: "inventory",
        }
        .to_problem();
        assert_eq!(deadline.status, 504);
        let open = ClientError::CircuitOpen {
            dependency: "inventory",
            retry_after: Duration::from_millis(3200),
        }
        .to_problem();
        assert_eq!(open.status, 503);
        assert_eq!(open.retry_after, Some(Duration::from_millis(3200)));
        assert_eq!(open.extensions["dependency"], "inventory");
        let decode = ClientError::Decode {
            dependency: "inventory",
            source: serde_json::from_slice::<u8>(b"[").expect_err("bad json"),
        }
        .to_problem();
        assert_eq!(decode.status, 502);
        assert_eq!(ClientError::Config("x".into()).to_problem().status, 500);
    }

    #[test]
    fn the_problem_never_repeats_the_upstream_body() {
        let problem = status(500, None).to_problem();
        let text = serde_json::to_string(&problem).expect("serialise");
        assert!(!text.contains("SELECT"), "{text}");
        assert_eq!(problem.detail.as_deref(), Some("pricing answered 500"));
    }

    #[test]
    fn only_unavailability_is_transient() {
        for code in [500, 502, 503, 504, 429] {
            assert!(status(code, None).is_transient(), "{code}");
        }
        for code in [400, 404, 409, 422, 501] {
            assert!(!status(code, None).is_transient(), "{code}");
        }
        assert!(ClientError::Timeout { dependency: "x" }.is_transient());
        assert!(
            ClientError::CircuitOpen {
                dependency: "x",
                retry_after: Duration::ZERO
            }
            .is_transient()
        );
        assert!(!ClientError::DeadlineExceeded { dependency: "x" }.is_transient());
        assert_eq!(
            status(503, None).status(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(ClientError::Timeout { dependency: "x" }.status(), None);
    }
}
