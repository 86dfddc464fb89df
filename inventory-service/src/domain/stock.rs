//! Stock levels: what is on hand, what is held by reservations, and what is left to sell.

use serde::Serialize;

/// The stock of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stock {
    /// Product.
    pub sku: String,
    /// Units physically in the warehouse (committed orders have been taken off).
    pub on_hand: i64,
    /// Units held by reservations that are neither committed nor released yet.
    pub reserved: i64,
    /// `on_hand − reserved`: what a new reservation can take.
    pub available: i64,
}

impl Stock {
    /// A stock level, computing `available`.
    pub fn new(sku: impl Into<String>, on_hand: i64, reserved: i64) -> Self {
        Self {
            sku: sku.into(),
            on_hand,
            reserved,
            available: on_hand - reserved,
        }
    }
}

/// Longest accepted SKU; real catalogues use well under 64 characters.
const MAX_SKU_LEN: usize = 64;

/// Checks that `sku` can name a product: 1–64 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// A sentence saying what is wrong, for a `422` problem's detail.
pub fn validate_sku(sku: &str) -> Result<(), String> {
    if sku.is_empty() || sku.len() > MAX_SKU_LEN {
        return Err(format!("sku must be 1 to {MAX_SKU_LEN} characters"));
    }
    if !sku
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("sku may only contain letters, digits, '.', '_' and '-'".to_owned());
    }
    Ok(())
}

/// Logs a `warn` "low stock" line when `available` has dropped below `threshold`, so whoever
/// restocks hears about it before customers see `409`s. Returns whether it warned.
pub fn warn_if_low(sku: &str, available: i64, threshold: i64) -> bool {
    let low = available < threshold;
    if low {
        tracing::warn!(sku, available, threshold, "low stock");
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::telemetry::{CapturedLogs, LogFormat, TelemetrySettings, get_subscriber};

    #[test]
    fn available_is_on_hand_minus_reserved() {
        let stock = Stock::new("BK-12", 100, 7);
        assert_eq!(stock.available, 93);
        let json = serde_json::to_value(&stock).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({"sku": "BK-12", "onHand": 100, "reserved": 7, "available": 93})
        );
    }

    #[test]
    fn skus_are_short_and_made_of_safe_characters() {
        assert!(validate_sku("BK-12").is_ok());
        assert!(validate_sku("a.b_c-9").is_ok());
        assert!(validate_sku("").is_err());
        assert!(validate_sku("with space").is_err());
        assert!(validate_sku(&"x".repeat(65)).is_err());
    }

    #[test]
    fn dropping_below_the_threshold_logs_a_low_stock_warning_with_sku_and_available() {
        let logs = CapturedLogs::default();
        let settings = TelemetrySettings {
            format: LogFormat::Json,
            filter: "info".to_owned(),
            otlp_endpoint: None,
        };
        let subscriber = get_subscriber("inventory", &settings, logs.clone());
        tracing::subscriber::with_default(subscriber, || {
            assert!(!warn_if_low("BK-12", 5, 5));
            assert!(warn_if_low("HD-44", 2, 5));
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), 1, "only the low one warns: {lines:?}");
        assert_eq!(lines[0]["level"], "warn");
        assert_eq!(lines[0]["msg"], "low stock");
        assert_eq!(lines[0]["sku"], "HD-44");
        assert_eq!(lines[0]["available"], 2);
    }
}
