//! A customer is a name and a bearer token; only the token's hash is ever stored.

use serde::{Deserialize, Deserializer, Serialize};

use super::CustomerId;

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
}
