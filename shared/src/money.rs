//! Money as integer minor units (cents), shown as a decimal number on the wire.
//!
//! Floating point cannot represent most cent amounts exactly, so amounts are `i64` cents in memory,
//! in the databases and in events; JSON shows them as `12.5`-style numbers for people using curl.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of money in minor units (cents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(pub i64);

impl Money {
    /// The amount in cents.
    pub fn cents(self) -> i64 {
        self.0
    }

    /// `self × qty`, or `None` on overflow.
    pub fn times(self, qty: u32) -> Option<Self> {
        self.0.checked_mul(i64::from(qty)).map(Self)
    }

    /// `self + other`, or `None` on overflow.
    pub fn plus(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        write!(
            f,
            "{sign}{}.{:02}",
            self.0.unsigned_abs() / 100,
            self.0.unsigned_abs() % 100
        )
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Exact for every amount below 2^53 cents, far beyond any price here.
        serializer.serialize_f64(self.0 as f64 / 100.0)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        let cents = (value * 100.0).round();
        if !cents.is_finite()
            || !(0.0..=1e15).contains(&cents)
            || (value * 100.0 - cents).abs() > 1e-6
        {
            return Err(serde::de::Error::custom(
                "expected a non-negative amount with at most two decimals",
            ));
        }
        Ok(Self(cents as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_round_trip_through_json_exactly() {
        let m: Money = serde_json::from_str("12.99").expect("valid");
        assert_eq!(m, Money(1299));
        assert_eq!(serde_json::to_string(&m).expect("json"), "12.99");
        assert_eq!(Money(1250).to_string(), "12.50");
        assert!(serde_json::from_str::<Money>("1.234").is_err());
        assert!(serde_json::from_str::<Money>("-1").is_err());
    }
}
