//! Consumer inbox: deduplication by message ID, recorded in the same transaction as the effect.
//!
//! Delivery is at least once, so a consumer may see a message twice. Recording the ID and
//! applying the effect in one transaction makes the pair atomic: either both happened (and a
//! redelivery is skipped) or neither did (and the redelivery does the work).
//!
//! [`sqlite`] records inside a [`crate::db::Database::write`] transaction, [`postgres`] on
//! PostgreSQL; this module holds the SQLite table.

pub mod postgres;
pub mod sqlite;

/// The SQL that creates the inbox table; include it in the service's migrations. Rows are kept:
/// a message may be redriven from a DLQ days later and must still be recognised.
pub const MIGRATION: &str = "\
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY NOT NULL,
    handled_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";
