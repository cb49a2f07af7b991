//! A cart belongs to one customer. While a checkout of it is live it cannot change, so the
//! order always matches what was reserved.

use serde::{Deserialize, Serialize};

use super::{CartId, CustomerId, Quantity, Sku};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CartStatus {
    /// Lines may change and a checkout may start.
    Open,
    /// A live checkout holds reservations for these lines.
    CheckingOut,
    /// Paid: the cart is history.
    CheckedOut,
}

impl CartStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CartStatus::Open => "open",
            CartStatus::CheckingOut => "checking_out",
            CartStatus::CheckedOut => "checked_out",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "open" => Some(CartStatus::Open),
            "checking_out" => Some(CartStatus::CheckingOut),
            "checked_out" => Some(CartStatus::CheckedOut),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CartLine {
    pub sku: Sku,
    pub quantity: Quantity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cart {
    pub id: CartId,
    pub customer_id: CustomerId,
    pub status: CartStatus,
    pub lines: Vec<CartLine>,
}
