//! The order aggregate: what a placed order is, and the rules an order request must satisfy.

use sha2::{Digest, Sha256};
use shared::money::Money;
use time::OffsetDateTime;
use uuid::Uuid;

/// Most lines one order may have: enough for any basket, and it bounds the fan-out of one request
/// (each line costs a pricing and an inventory call).
pub const MAX_LINES: usize = 100;

/// Longest accepted SKU. Catalogue codes are short (`BK-12`); the bound keeps junk out of URLs,
/// logs and the database.
pub const MAX_SKU_LEN: usize = 64;

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Accepted: stock reserved, `order.placed` published.
    Placed,
    /// Cancelled by the customer: `order.cancelled` published, stock returned by inventory.
    Cancelled,
}

impl OrderStatus {
    /// The status as stored and shown (`"placed"`, `"cancelled"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored status.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "placed" => Some(Self::Placed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// Where a line's unit price came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    /// Asked from pricing while placing the order.
    Live,
    /// Pricing was unavailable; taken from the local price cache (possibly stale).
    Cache,
}

impl PriceSource {
    /// The source as stored and shown (`"live"`, `"cache"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Cache => "cache",
        }
    }

    /// Parses a stored source.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "live" => Some(Self::Live),
            "cache" => Some(Self::Cache),
            _ => None,
        }
    }
}

/// One priced, reserved line of a placed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    /// Product.
    pub sku: String,
    /// Units.
    pub qty: u32,
    /// Price per unit at the time of ordering.
    pub unit_price: Money,
    /// Where the unit price came from.
    pub price_source: PriceSource,
    /// The inventory reservation holding the units.
    pub reservation_id: Uuid,
}

impl OrderLine {
    /// `unit_price × qty`, or `None` on overflow.
    pub fn line_total(&self) -> Option<Money> {
        self.unit_price.times(self.qty)
    }
}

/// A placed (possibly since cancelled) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Generated before any downstream call, so reservations can be keyed by it.
    pub id: Uuid,
    /// Current status.
    pub status: OrderStatus,
    /// Lines in the order the client listed them.
    pub lines: Vec<OrderLine>,
    /// Sum of the line totals.
    pub total: Money,
    /// ISO 4217 currency of every price in the order.
    pub currency: String,
    /// When the order was accepted.
    pub created_at: OffsetDateTime,
}

impl Order {
    /// A freshly placed order; the total is computed from the lines.
    ///
    /// # Errors
    /// [`InvalidOrder::TotalTooLarge`] if the total does not fit in the money type.
    pub fn placed(
        id: Uuid,
        lines: Vec<OrderLine>,
        currency: String,
        created_at: OffsetDateTime,
    ) -> Result<Self, InvalidOrder> {
        let total = lines
            .iter()
            .try_fold(Money(0), |sum, line| sum.plus(line.line_total()?))
            .ok_or(InvalidOrder::TotalTooLarge)?;
        // Whole microseconds, the finest time every backend stores (PostgreSQL's TIMESTAMPTZ):
        // the order read back later is then equal to the one answered when it was placed.
        let created_at = created_at
            .replace_nanosecond(created_at.nanosecond() / 1_000 * 1_000)
            .unwrap_or(created_at);
        Ok(Self {
            id,
            status: OrderStatus::Placed,
            lines,
            total,
            currency,
            created_at,
        })
    }

    /// Whether any line was priced from the cache rather than live.
    pub fn priced_from_cache(&self) -> bool {
        self.lines
            .iter()
            .any(|line| line.price_source == PriceSource::Cache)
    }
}

/// One line of an order request: a product and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedLine {
    /// Product.
    pub sku: String,
    /// Units, at least one.
    pub qty: u32,
}

/// A validated order request.
///
/// Lines naming the same SKU are merged (their quantities added) rather than rejected: "two mugs,
/// and another mug" is a reasonable thing to send, and one line per SKU keeps one reservation per
/// SKU, which is what the reservation idempotency key (`{orderId}:{sku}`) assumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    lines: Vec<RequestedLine>,
}

impl OrderRequest {
    /// Validates and normalises `items` (`(sku, qty)` pairs in the client's order).
    ///
    /// # Errors
    /// [`InvalidOrder`] naming the first rule broken.
    pub fn parse(items: impl IntoIterator<Item = (String, u32)>) -> Result<Self, InvalidOrder> {
        let mut lines: Vec<RequestedLine> = Vec::new();
        for (sku, qty) in items {
            if !is_valid_sku(&sku) {
                return Err(InvalidOrder::InvalidSku(sku));
            }
            if qty == 0 {
                return Err(InvalidOrder::ZeroQuantity(sku));
            }
            match lines.iter_mut().find(|line| line.sku == sku) {
                Some(line) => {
                    line.qty = line
                        .qty
                        .checked_add(qty)
                        .ok_or(InvalidOrder::QuantityTooLarge(sku))?;
                }
                None => lines.push(RequestedLine { sku, qty }),
            }
        }
        if lines.is_empty() {
            return Err(InvalidOrder::NoLines);
        }
        if lines.len() > MAX_LINES {
            return Err(InvalidOrder::TooManyLines(lines.len()));
        }
        Ok(Self { lines })
    }

    /// The lines, one per SKU, in the order the client first listed each SKU.
    pub fn lines(&self) -> &[RequestedLine] {
        &self.lines
    }

    /// A fingerprint of what is being asked for, to tell a retry (same fingerprint) from a reuse
    /// of an idempotency key for a different order. Line order and how duplicates were split do
    /// not matter: the fingerprint is taken over the merged lines sorted by SKU.
    pub fn fingerprint(&self) -> String {
        let mut lines: Vec<&RequestedLine> = self.lines.iter().collect();
        lines.sort_by(|a, b| a.sku.cmp(&b.sku));
        let mut hasher = Sha256::new();
        // A version tag, so a future change to this encoding cannot match an old fingerprint.
        hasher.update(b"order-request/v1\n");
        for line in lines {
            // SKUs cannot contain '=' or '\n' (see `is_valid_sku`), so this encoding is unambiguous.
            hasher.update(format!("{}={}\n", line.sku, line.qty).as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

/// A SKU is a catalogue code: 1–64 characters of `[A-Za-z0-9._-]`. That keeps it safe to put in
/// a URL path, a log line and an idempotency key without escaping.
fn is_valid_sku(sku: &str) -> bool {
    !sku.is_empty()
        && sku.len() <= MAX_SKU_LEN
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why an order request is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOrder {
    /// No lines at all.
    #[error("an order needs at least one item")]
    NoLines,
    /// More lines than [`MAX_LINES`].
    #[error("an order may have at most {MAX_LINES} distinct items, this one has {0}")]
    TooManyLines(usize),
    /// A SKU that cannot be a catalogue code.
    #[error("sku {0:?} is not a valid catalogue code (1-64 characters of A-Z a-z 0-9 . _ -)")]
    InvalidSku(String),
    /// A line asks for zero units.
    #[error("qty for sku {0} must be a positive integer")]
    ZeroQuantity(String),
    /// Merged quantities of one SKU overflow.
    #[error("qty for sku {0} is too large")]
    QuantityTooLarge(String),
    /// The order total overflows.
    #[error("the order total is too large")]
    TotalTooLarge,
}

impl InvalidOrder {
    /// The SKU the problem is about, if it is about one.
    pub fn sku(&self) -> Option<&str> {
        match self {
            Self::InvalidSku(sku) | Self::ZeroQuantity(sku) | Self::QuantityTooLarge(sku) => {
                Some(sku)
            }
            Self::NoLines | Self::TooManyLines(_) | Self::TotalTooLarge => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// SKUs as clients send them: mostly valid codes from a small set (so lines repeat and
    /// merge), sometimes anything at all.
    fn any_sku() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[A-C]{1,2}",
            1 => any::<String>(),
            1 => "[A-Za-z0-9._-]{60,70}",
        ]
    }

    proptest! {
        #[test]
        fn an_order_request_is_accepted_exactly_when_every_rule_holds(
            items in proptest::collection::vec((any_sku(), prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>(), 1..5u32]), 0..120),
        ) {
            let mut merged: Vec<(String, u64)> = Vec::new();
            for (sku, qty) in &items {
                match merged.iter_mut().find(|(s, _)| s == sku) {
                    Some((_, total)) => *total += u64::from(*qty),
                    None => merged.push((sku.clone(), u64::from(*qty))),
                }
            }
            let valid = !items.is_empty()
                && items.iter().all(|(sku, qty)| is_valid_sku(sku) && *qty > 0)
                && merged.len() <= MAX_LINES
                && merged.iter().all(|(_, total)| *total <= u64::from(u32::MAX));
            match OrderRequest::parse(items.clone()) {
                Ok(request) => {
                    prop_assert!(valid, "accepted {:?}", items);
                    let lines: Vec<(String, u64)> = request
                        .lines()
                        .iter()
                        .map(|l| (l.sku.clone(), u64::from(l.qty)))
                        .collect();
                    prop_assert_eq!(lines, merged);
                }
                Err(_) => prop_assert!(!valid, "refused {:?}", items),
            }
        }
    }

    fn request(items: &[(&str, u32)]) -> Result<OrderRequest, InvalidOrder> {
        OrderRequest::parse(items.iter().map(|(s, q)| ((*s).to_owned(), *q)))
    }

    #[test]
    fn duplicate_skus_are_merged_into_one_line_in_first_seen_order() {
        let order = request(&[("MG-07", 1), ("BK-12", 2), ("MG-07", 3)]).expect("valid");
        assert_eq!(
            order.lines(),
            [
                RequestedLine {
                    sku: "MG-07".into(),
                    qty: 4
                },
                RequestedLine {
                    sku: "BK-12".into(),
                    qty: 2
                },
            ]
        );
    }

    #[test]
    fn empty_orders_zero_quantities_and_odd_skus_are_rejected() {
        assert_eq!(request(&[]), Err(InvalidOrder::NoLines));
        assert_eq!(
            request(&[("BK-12", 0)]),
            Err(InvalidOrder::ZeroQuantity("BK-12".into()))
        );
        assert_eq!(
            request(&[("", 1)]),
            Err(InvalidOrder::InvalidSku(String::new()))
        );
        assert_eq!(
            request(&[("../admin", 1)]),
            Err(InvalidOrder::InvalidSku("../admin".into()))
        );
        assert_eq!(
            request(&[("BK-12", u32::MAX), ("BK-12", 1)]),
            Err(InvalidOrder::QuantityTooLarge("BK-12".into()))
        );
    }

    #[test]
    fn more_than_the_maximum_number_of_lines_is_rejected() {
        let items: Vec<(String, u32)> = (0..=MAX_LINES).map(|i| (format!("SKU-{i}"), 1)).collect();
        assert_eq!(
            OrderRequest::parse(items),
            Err(InvalidOrder::TooManyLines(MAX_LINES + 1))
        );
    }

    #[test]
    fn the_fingerprint_ignores_line_order_and_splitting_but_not_quantities() {
        let a = request(&[("BK-12", 2), ("MG-07", 1)]).expect("valid");
        let b = request(&[("MG-07", 1), ("BK-12", 1), ("BK-12", 1)]).expect("valid");
        let c = request(&[("BK-12", 3), ("MG-07", 1)]).expect("valid");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
    }

    #[test]
    fn the_total_is_the_sum_of_the_line_totals() {
        let line = |sku: &str, qty, cents| OrderLine {
            sku: sku.into(),
            qty,
            unit_price: Money(cents),
            price_source: PriceSource::Live,
            reservation_id: Uuid::new_v4(),
        };
        let order = Order::placed(
            Uuid::new_v4(),
            vec![line("BK-12", 2, 3990), line("MG-07", 1, 1250)],
            "EUR".into(),
            OffsetDateTime::UNIX_EPOCH,
        )
        .expect("fits");
        assert_eq!(order.total, Money(9230));
        assert!(!order.priced_from_cache());
        let huge = Order::placed(
            Uuid::new_v4(),
            vec![line("BK-12", u32::MAX, i64::MAX / 2)],
            "EUR".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        assert_eq!(huge, Err(InvalidOrder::TotalTooLarge));
    }
}
