//! A SKU is the public name of a product: 1–64 characters of `[A-Za-z0-9._-]`, so it is safe
//! in a URL path, a log line and a Redis key without escaping.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkuError {
    #[error("sku must be 1 to 64 characters")]
    Length,
    #[error("sku may contain only letters, digits, '.', '_' and '-'")]
    Characters,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, SkuError> {
        if raw.is_empty() || raw.len() > 64 {
            return Err(SkuError::Length);
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(SkuError::Characters);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sku {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Sku::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_of_allowed_characters_is_accepted() {
        for ok in ["A", "tea-01", "X.y_z-9", &"a".repeat(64)] {
            assert_eq!(Sku::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn an_empty_long_or_odd_sku_is_rejected() {
        assert_eq!(Sku::parse(""), Err(SkuError::Length));
        assert_eq!(Sku::parse(&"a".repeat(65)), Err(SkuError::Length));
        for bad in ["a b", "a/b", "ä", "a%20", "../x", "a\n"] {
            assert_eq!(Sku::parse(bad), Err(SkuError::Characters), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any string at all: accepted exactly when it is 1–64 bytes of the allowed set, and
        /// then kept as given.
        #[test]
        fn parsing_any_string_accepts_exactly_the_allowed_ones(raw in ".{0,80}") {
            let allowed = !raw.is_empty()
                && raw.len() <= 64
                && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            match Sku::parse(&raw) {
                Ok(sku) => {
                    proptest::prop_assert!(allowed);
                    proptest::prop_assert_eq!(sku.as_str(), raw.as_str());
                }
                Err(_) => proptest::prop_assert!(!allowed),
            }
        }

        #[test]
        fn skus_of_the_allowed_set_round_trip_through_json(raw in "[A-Za-z0-9._-]{1,64}") {
            let sku = Sku::parse(&raw).expect("allowed characters");
            let json = serde_json::to_string(&sku).expect("serialises");
            proptest::prop_assert_eq!(serde_json::from_str::<Sku>(&json).expect("parses"), sku);
        }
    }
}
