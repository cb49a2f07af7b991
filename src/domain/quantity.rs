//! Quantities a customer may ask for (1..=10,000 per line) and stock levels an admin may set.
//! Bounding both keeps every product of a quantity and a price far inside `i64`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity must be between 1 and {max}")]
    OutOfRange { max: u32 },
}

/// How many units of one SKU a cart line holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u32 = 10_000;

    pub fn new(value: i64) -> Result<Self, QuantityError> {
        match u32::try_from(value) {
            Ok(v) if (1..=Self::MAX).contains(&v) => Ok(Self(v)),
            _ => Err(QuantityError::OutOfRange { max: Self::MAX }),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = i64::deserialize(d)?;
        Quantity::new(raw).map_err(serde::de::Error::custom)
    }
}

/// Units on hand for a product: 0..=1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StockLevel(i64);

impl StockLevel {
    pub const MAX: i64 = 1_000_000_000;

    pub fn new(value: i64) -> Result<Self, QuantityError> {
        if (0..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(QuantityError::OutOfRange {
                max: Self::MAX as u32,
            })
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for StockLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = i64::deserialize(d)?;
        StockLevel::new(raw).map_err(|_| {
            serde::de::Error::custom(format!("stock must be between 0 and {}", StockLevel::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantity_of_zero_negative_or_above_the_limit_is_rejected() {
        for bad in [0, -1, 10_001, i64::MAX, i64::MIN] {
            assert!(Quantity::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities_from_one_to_ten_thousand_are_accepted() {
        assert_eq!(Quantity::new(1).unwrap().get(), 1);
        assert_eq!(Quantity::new(10_000).unwrap().get(), 10_000);
    }

    #[test]
    fn stock_may_be_zero_but_not_negative() {
        assert!(StockLevel::new(0).is_ok());
        assert!(StockLevel::new(-1).is_err());
        assert!(StockLevel::new(StockLevel::MAX + 1).is_err());
    }

    proptest::proptest! {
        /// Any integer in a body: a quantity exactly when it is 1..=10,000.
        #[test]
        fn any_integer_deserialises_to_a_quantity_only_in_range(n in proptest::num::i128::ANY) {
            let parsed = serde_json::from_str::<Quantity>(&n.to_string());
            proptest::prop_assert_eq!(parsed.is_ok(), (1..=10_000).contains(&n));
            if let Ok(q) = parsed {
                proptest::prop_assert_eq!(i128::from(q.get()), n);
            }
        }

        /// Anything else a client may send (fractions, strings, exponents, garbage) is refused
        /// without a panic, unless it is a plain integer in range.
        #[test]
        fn any_text_deserialises_to_a_quantity_only_if_it_is_an_integer_in_range(
            raw in "(?s).{0,24}|[-+]?[0-9]{1,22}(\\.[0-9]{0,3})?([eE][-+]?[0-9]{1,3})?"
        ) {
            let parsed = serde_json::from_str::<Quantity>(&raw);
            // JSON's white space only: serde_json refuses any other.
            let trimmed = raw.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
            let plain = trimmed.parse::<i64>().ok().filter(|n| (1..=10_000).contains(n));
            let canonical = plain.is_some_and(|n| n.to_string() == trimmed);
            if canonical {
                proptest::prop_assert!(parsed.is_ok(), "{raw:?}");
            } else if let Ok(q) = parsed {
                proptest::prop_assert_eq!(Some(i64::from(q.get())), plain, "{:?}", raw);
            }
        }

        #[test]
        fn any_integer_deserialises_to_a_stock_level_only_in_range(n in proptest::num::i128::ANY) {
            let parsed = serde_json::from_str::<StockLevel>(&n.to_string());
            proptest::prop_assert_eq!(parsed.is_ok(), (0..=1_000_000_000).contains(&n));
        }
    }
}
