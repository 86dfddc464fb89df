//! A product's price, its currency and how many units have sold.

use serde::Serialize;
use shared::money::Money;

/// The price record of one SKU, as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    /// Product.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Price per unit.
    pub price: Money,
    /// ISO 4217 currency code.
    pub currency: String,
    /// Units sold in placed orders.
    pub units_sold: i64,
    /// How many times the price was set: 1 for a new SKU (and the seeded catalogue), one more
    /// for every change. `price.changed` carries it, so a consumer can tell a late event from the
    /// latest one.
    pub version: u64,
}

/// The currency of prices created without one: the catalogue is priced in euros.
pub const DEFAULT_CURRENCY: &str = "EUR";

/// Checks an ISO 4217-shaped currency code: three upper-case ASCII letters.
///
/// # Errors
/// A sentence for a `422` problem's detail.
pub fn validate_currency(code: &str) -> Result<(), String> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "currency must be three upper-case letters (ISO 4217), got {code:?}"
        ))
    }
}

/// Longest accepted SKU; real catalogues use well under 64 characters.
const MAX_SKU_LEN: usize = 64;

/// Checks that `sku` can name a product: 1–64 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// A sentence for a `422` problem's detail.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_serialises_as_a_decimal_with_camel_case_fields() {
        let price = Price {
            sku: "BK-12".to_owned(),
            name: "The Rust Book".to_owned(),
            price: Money(3990),
            currency: "EUR".to_owned(),
            units_sold: 2,
            version: 3,
        };
        assert_eq!(
            serde_json::to_value(&price).expect("serialise"),
            serde_json::json!({
                "sku": "BK-12", "name": "The Rust Book", "price": 39.9,
                "currency": "EUR", "unitsSold": 2, "version": 3
            })
        );
    }

    #[test]
    fn currencies_are_three_upper_case_letters() {
        assert!(validate_currency("EUR").is_ok());
        assert!(validate_currency("eur").is_err());
        assert!(validate_currency("EURO").is_err());
        assert!(validate_currency("").is_err());
    }

    #[test]
    fn skus_are_short_and_made_of_safe_characters() {
        assert!(validate_sku("MG-07").is_ok());
        assert!(validate_sku("").is_err());
        assert!(validate_sku("a/b").is_err());
    }
}
