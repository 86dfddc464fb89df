//! Shutdown: wait for SIGINT or SIGTERM, then drain in-flight work for a bounded time.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a stopping service keeps serving requests already in flight. Compose and Kubernetes
/// send SIGKILL 10 s (Docker) to 30 s (Kubernetes) after SIGTERM; 8 s stays inside both.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(8);

/// Completes when the process receives SIGINT (Ctrl-C) or SIGTERM (`docker stop`, Kubernetes).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT, shutting down"),
        () = terminate => tracing::info!("received SIGTERM, shutting down"),
    }
}

/// A token that is cancelled when the process receives SIGINT or SIGTERM (see [`signal`]).
///
/// Services serve until a token is cancelled: `run_until_stopped` passes this one, tests pass
/// their own, so both take the same shutdown path.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        signal().await;
        trigger.cancel();
    });
    token
}

/// Runs `work` until it finishes by itself, or until `drain` after `stop` completes.
///
/// `work` is expected to notice `stop` itself (for example through axum's graceful shutdown) and
/// finish early; the bound only stops a connection that refuses to close from holding the
/// process open.
///
/// Returns `None` when the drain period ran out first.
pub async fn bounded<T>(
    work: impl Future<Output = T>,
    stop: impl Future<Output = ()>,
    drain: Duration,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return Some(result),
        () = stop => {}
    }
    match tokio::time::timeout(drain, work).await {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::warn!(
                drain_ms = drain.as_millis() as u64,
                "drain period over; abandoning in-flight work"
            );
            None
        }
    }
}
