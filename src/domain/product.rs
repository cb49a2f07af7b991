//! A product of the catalogue with its inventory counters. `reserved` counts units held by
//! live reservations; promise 1 says `0 <= reserved <= stock` at every moment.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Money, OrderingRules, PriceTiers, Sku, StockLevel};

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
    /// How much one cart line may hold.
    pub rules: OrderingRules,
    /// Volume prices; the base price applies below the first tier.
    pub price_tiers: PriceTiers,
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
    pub rules: OrderingRules,
    pub price_tiers: PriceTiers,
}

/// An admin edit; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub name: Option<ProductName>,
    pub price: Option<Money>,
    pub stock: Option<StockLevel>,
    pub min_quantity: Option<u32>,
    pub increment: Option<u32>,
    /// `Some(None)` removes the maximum.
    pub max_quantity: Option<Option<u32>>,
    pub price_tiers: Option<PriceTiers>,
}

impl ProductPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.price.is_none()
            && self.stock.is_none()
            && self.min_quantity.is_none()
            && self.increment.is_none()
            && self.max_quantity.is_none()
            && self.price_tiers.is_none()
    }

    /// The rules `current` has once this patch applies, checked as a whole.
    pub fn rules_over(
        &self,
        current: OrderingRules,
    ) -> Result<OrderingRules, super::WholesaleError> {
        OrderingRules::new(
            self.min_quantity.unwrap_or(current.min_quantity),
            self.increment.unwrap_or(current.increment),
            self.max_quantity.unwrap_or(current.max_quantity),
        )
    }
}
