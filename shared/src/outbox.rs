//! Transactional outbox. API SKELETON — see the messaging/storage task.

use std::sync::Arc;

use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::messaging::Publisher;

/// The SQL that creates the outbox table; include it in the service's migrations.
pub const MIGRATION: &str = "";

/// Writes `event` to the outbox inside the caller's transaction.
///
/// # Errors
/// Database or serialisation failure.
pub async fn enqueue<E: Event>(tx: &mut SqliteConnection, event: &E) -> Result<(), sqlx::Error> {
    todo!()
}

/// Publishes pending outbox rows in order, marking them sent after the confirm.
#[derive(Debug, Clone)]
pub struct OutboxRelay {}

impl OutboxRelay {
    /// A relay over `pool` publishing through `publisher`.
    pub fn new(pool: SqlitePool, publisher: Publisher) -> Self {
        todo!()
    }
    /// Wakes the relay at once (call after committing a transaction that enqueued).
    pub fn notify(&self) {
        todo!()
    }
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        todo!()
    }
}

#[allow(dead_code)]
fn _unused(_: Arc<Notify>) {}
