//! A customer is a name and a bearer token; only the token's hash is ever stored.

use serde::{Deserialize, Deserializer, Serialize};

use super::{CompanyId, CustomerId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name must be 1 to 200 characters without control characters")]
pub struct CustomerNameError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CustomerName(String);

impl CustomerName {
    pub fn parse(raw: &str) -> Result<Self, CustomerNameError> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        if chars == 0 || chars > 200 || trimmed.chars().any(char::is_control) {
            return Err(CustomerNameError);
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for CustomerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        CustomerName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Customer {
    pub id: CustomerId,
    pub name: String,
    /// The company this buyer orders for; `None` buys as a retail customer.
    pub company_id: Option<CompanyId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_trimmed_and_must_not_be_blank() {
        assert_eq!(
            CustomerName::parse("  Ada ").map(|n| n.0),
            Ok("Ada".to_owned())
        );
        for bad in ["", "   ", "a\u{0}b", "line\nbreak"] {
            assert_eq!(CustomerName::parse(bad), Err(CustomerNameError), "{bad:?}");
        }
        assert!(CustomerName::parse(&"é".repeat(200)).is_ok());
        assert!(CustomerName::parse(&"é".repeat(201)).is_err());
    }

    proptest::proptest! {
        /// Any text: accepted exactly when its trimmed form is 1–200 characters without control
        /// characters, and then kept trimmed.
        #[test]
        fn parsing_any_text_accepts_exactly_the_allowed_names(raw in "\\PC{0,220}|[\\x00-\\x1f ]{0,5}") {
            let trimmed = raw.trim();
            let n = trimmed.chars().count();
            let allowed = (1..=200).contains(&n) && !trimmed.chars().any(char::is_control);
            match CustomerName::parse(&raw) {
                Ok(name) => {
                    proptest::prop_assert!(allowed);
                    proptest::prop_assert_eq!(name.as_str(), trimmed);
                }
                Err(_) => proptest::prop_assert!(!allowed),
            }
        }
    }
}
