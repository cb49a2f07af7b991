//! A product of the catalogue with its inventory counters. `reserved` counts units held by
//! live reservations; promise 1 says `0 <= reserved <= stock` at every moment.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Money, Sku, StockLevel};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name must be 1 to 200 characters without control characters")]
pub struct ProductNameError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProductName(String);

impl ProductName {
    pub fn parse(raw: &str) -> Result<Self, ProductNameError> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        if chars == 0 || chars > 200 || trimmed.chars().any(char::is_control) {
            return Err(ProductNameError);
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ProductName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ProductName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Internal id: the lock order of every multi-product transaction.
    pub id: i64,
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    pub stock: i64,
    pub reserved: i64,
    pub version: i64,
}

impl Product {
    pub fn available(&self) -> i64 {
        self.stock - self.reserved
    }
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub sku: Sku,
    pub name: ProductName,
    pub price: Money,
    pub stock: StockLevel,
}

/// An admin edit; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub name: Option<ProductName>,
    pub price: Option<Money>,
    pub stock: Option<StockLevel>,
}

impl ProductPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.price.is_none() && self.stock.is_none()
    }
}
