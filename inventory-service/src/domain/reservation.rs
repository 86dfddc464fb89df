//! Reservations: units held for an order until it is placed (committed), given back (released),
//! or forgotten (expired).

use std::fmt;

use serde_json::Number;
use time::OffsetDateTime;
use uuid::Uuid;

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Holding units (`stock.reserved` includes them).
    Reserved,
    /// The order was placed: the units left the warehouse (`on_hand` was reduced).
    Committed,
    /// Given back by `/release` or by a cancelled order.
    Released,
    /// Not committed within the TTL; the sweeper gave the units back.
    Expired,
}

impl ReservationStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "reserved" => Self::Reserved,
            "committed" => Self::Committed,
            "released" => Self::Released,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for ReservationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its ID, which the order carries and `order.placed` names.
    pub id: Uuid,
    /// Product.
    pub sku: String,
    /// Units held.
    pub qty: u32,
    /// The order it was made for, when the caller said.
    pub order_id: Option<Uuid>,
    /// Current state.
    pub status: ReservationStatus,
    /// `available` right after it was made (replays answer the same).
    pub remaining_after: i64,
    /// When the sweeper releases it if it is still only reserved.
    pub expires_at: OffsetDateTime,
}

/// A number of units to reserve: a positive integer that fits the event contract's `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u32);

impl Quantity {
    /// Validates a JSON number. Taking a [`Number`] rather than an integer type lets `0`, `-1`,
    /// `1.5` and a too-large value each get a sentence saying what is wrong.
    ///
    /// # Errors
    /// A sentence for a `422` problem's detail.
    pub fn parse(raw: &Number) -> Result<Self, String> {
        let Some(whole) = raw.as_i64() else {
            return Err(if raw.is_u64() {
                format!("qty must be at most {}, got {raw}", u32::MAX)
            } else {
                format!("qty must be a positive integer, got {raw}")
            });
        };
        if whole <= 0 {
            return Err(format!("qty must be a positive integer, got {whole}"));
        }
        u32::try_from(whole)
            .map(Self)
            .map_err(|_| format!("qty must be at most {}, got {whole}", u32::MAX))
    }

    /// The units.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// An `Idempotency-Key` header value: 1–255 visible ASCII characters (UUIDs, `order:sku`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

/// Long enough for any key a client builds from IDs, short enough to index cheaply.
const MAX_KEY_LEN: usize = 255;

impl IdempotencyKey {
    /// Validates a header value.
    ///
    /// # Errors
    /// A sentence for a `422` problem's detail.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        let valid =
            !raw.is_empty() && raw.len() <= MAX_KEY_LEN && raw.iter().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(String::from_utf8_lossy(raw).into_owned()))
        } else {
            Err(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
            ))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(json: &str) -> Number {
        serde_json::from_str(json).expect("a JSON number")
    }

    #[test]
    fn a_positive_integer_is_a_quantity() {
        assert_eq!(Quantity::parse(&number("3")).map(Quantity::get), Ok(3));
        assert_eq!(
            Quantity::parse(&number("4294967295")).map(Quantity::get),
            Ok(u32::MAX)
        );
    }

    #[test]
    fn zero_negative_fractional_and_huge_quantities_are_rejected_with_a_reason() {
        for (raw, needle) in [
            ("0", "positive integer, got 0"),
            ("-1", "positive integer, got -1"),
            ("1.5", "positive integer, got 1.5"),
            ("2.0", "positive integer"),
            ("4294967296", "at most"),
            ("18446744073709551615", "at most"),
        ] {
            let err = Quantity::parse(&number(raw)).expect_err(raw);
            assert!(err.contains(needle), "{raw}: {err}");
        }
    }

    #[test]
    fn statuses_round_trip_through_their_stored_names() {
        for status in [
            ReservationStatus::Reserved,
            ReservationStatus::Committed,
            ReservationStatus::Released,
            ReservationStatus::Expired,
        ] {
            assert_eq!(ReservationStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(ReservationStatus::parse("lost"), None);
    }

    #[test]
    fn idempotency_keys_are_bounded_visible_ascii() {
        assert!(IdempotencyKey::parse(b"order-1:BK-12").is_ok());
        assert!(IdempotencyKey::parse(b"").is_err());
        assert!(IdempotencyKey::parse(b"has space").is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_err());
    }
}
