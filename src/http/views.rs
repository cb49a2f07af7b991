//! What the API shows: private DTOs built from domain types, so the wire format is written
//! down in one place and never leaks a store detail (ids of rows, token hashes).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::{IntoParams, ToSchema};

use crate::domain::{
    Cart, Checkout, Money, Order, OrderLine, OrderingRules, PriceTiers, Product, Sku,
};

use super::openapi::{CartLineSchema, MoneySchema, OrderLineSchema};
use super::ApiError;

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T10:00:00.000Z`.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[derive(Clone, Serialize, ToSchema)]
pub struct ProductView {
    #[schema(value_type = String)]
    pub sku: Sku,
    pub name: String,
    #[schema(value_type = MoneySchema)]
    pub price: Money,
    /// Stock minus what live checkouts hold.
    pub available: i64,
    /// A cart line holds at least this many units (left out: 1).
    #[serde(skip_serializing_if = "is_one")]
    #[schema(minimum = 1)]
    pub min_quantity: u32,
    /// A cart line holds a multiple of this, the case pack (left out: 1).
    #[serde(skip_serializing_if = "is_one")]
    #[schema(minimum = 1)]
    pub increment: u32,
    /// A cart line holds at most this many units (left out: no maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_quantity: Option<u32>,
    /// Volume prices per unit from `min_quantity` units on, ascending (left out: none).
    #[serde(skip_serializing_if = "PriceTiers::is_empty")]
    #[schema(value_type = Vec<PriceTierSchema>)]
    pub price_tiers: PriceTiers,
}

impl ProductView {
    pub fn rules(&self) -> OrderingRules {
        OrderingRules {
            min_quantity: self.min_quantity,
            increment: self.increment,
            max_quantity: self.max_quantity,
        }
    }
}

impl From<&Product> for ProductView {
    fn from(p: &Product) -> Self {
        Self {
            sku: p.sku.clone(),
            name: p.name.clone(),
            price: p.price,
            available: p.available(),
            min_quantity: p.rules.min_quantity,
            increment: p.rules.increment,
            max_quantity: p.rules.max_quantity,
            price_tiers: p.price_tiers.clone(),
        }
    }
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// `{min_quantity, amount}`: from `min_quantity` units on, each costs `amount` minor units of
/// the product's currency.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct PriceTierSchema {
    min_quantity: u32,
    amount: i64,
}

#[derive(Serialize, ToSchema)]
pub struct AdminProductView {
    #[schema(value_type = String)]
    pub sku: Sku,
    pub name: String,
    #[schema(value_type = MoneySchema)]
    pub price: Money,
    pub stock: i64,
    pub reserved: i64,
    pub available: i64,
    pub version: i64,
    /// Ordering rules and volume tiers, left out at their retail defaults (see `ProductView`).
    #[serde(skip_serializing_if = "is_one")]
    pub min_quantity: u32,
    #[serde(skip_serializing_if = "is_one")]
    pub increment: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_quantity: Option<u32>,
    #[serde(skip_serializing_if = "PriceTiers::is_empty")]
    #[schema(value_type = Vec<PriceTierSchema>)]
    pub price_tiers: PriceTiers,
}

impl From<&Product> for AdminProductView {
    fn from(p: &Product) -> Self {
        Self {
            sku: p.sku.clone(),
            name: p.name.clone(),
            price: p.price,
            stock: p.stock,
            reserved: p.reserved,
            available: p.available(),
            version: p.version,
            min_quantity: p.rules.min_quantity,
            increment: p.rules.increment,
            max_quantity: p.rules.max_quantity,
            price_tiers: p.price_tiers.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CartView {
    pub id: String,
    /// `open`, `checking_out` (a live checkout holds it) or `checked_out`.
    #[schema(value_type = String)]
    pub status: &'static str,
    #[schema(value_type = Vec<CartLineSchema>)]
    pub lines: Vec<crate::domain::CartLine>,
}

impl From<Cart> for CartView {
    fn from(c: Cart) -> Self {
        Self {
            id: c.id.to_string(),
            status: c.status.as_str(),
            lines: c.lines,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CheckoutView {
    pub id: String,
    /// `reserved`, `charging`, `requires_action`, `completed`, `payment_failed`, `expired`,
    /// `cancelled` or `refunded`.
    #[schema(value_type = String)]
    pub state: &'static str,
    pub order_id: String,
    pub cart_id: String,
    #[schema(value_type = MoneySchema)]
    pub total: Money,
    /// When the reservation lapses unless a heartbeat pushes it.
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
}

impl From<Checkout> for CheckoutView {
    fn from(c: Checkout) -> Self {
        Self {
            id: c.id.to_string(),
            state: c.state.as_str(),
            order_id: c.order_id.to_string(),
            cart_id: c.cart_id.to_string(),
            total: c.total,
            expires_at: c.expires_at,
            created_at: c.created_at,
            payment_intent_id: c.payment_intent_id,
            client_secret: c.client_secret,
            decline_code: c.decline_code,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct OrderView {
    pub id: String,
    /// `pending_payment`, `payment_processing`, `paid`, `payment_failed`, `cancelled`,
    /// `fulfilled`, `refunded` or `awaiting_payment_on_terms` (placed on account, its invoice
    /// open); under manual capture also `authorized` (card held, nothing captured),
    /// `partially_fulfilled` (some lines shipped and captured), `disputed` and
    /// `refunded_by_dispute`.
    #[schema(value_type = String)]
    pub status: &'static str,
    pub checkout_id: String,
    #[schema(value_type = MoneySchema)]
    pub total: Money,
    #[schema(value_type = Vec<OrderLineSchema>)]
    pub lines: Vec<OrderLine>,
    pub payment_intent_id: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Once a refund was asked for: `pending` (the order stays `paid` until Stripe settles
    /// it), `failed` (Stripe kept the money: the order stays `paid`) or `succeeded`.
    pub refund_status: Option<String>,
    /// In the answer to a refund Stripe failed: Stripe's `failure_reason`
    /// (`lost_or_stolen_card`, `expired_or_canceled_card`, `unknown`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_failure_reason: Option<String>,
    /// The buyer's purchase-order number, if the checkout carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub po_number: Option<String>,
    /// The invoice of an order placed on account (`GET /v1/admin/invoices/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<String>,
    /// What the card is authorized for (the total once paid at checkout).
    #[schema(value_type = MoneySchema)]
    pub authorized: Money,
    /// What was captured: the total once paid at checkout, the shipments' amounts under
    /// manual capture.
    #[schema(value_type = MoneySchema)]
    pub captured: Money,
    /// What went back to the card.
    #[schema(value_type = MoneySchema)]
    pub refunded: Money,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        let amounts = o.amounts();
        let currency = o.total.currency();
        let money = |amount: i64| Money::new(amount, currency).unwrap_or(Money::zero(currency));
        Self {
            authorized: money(amounts.authorized),
            captured: money(amounts.captured),
            refunded: money(amounts.refunded),
            id: o.id.to_string(),
            status: o.status.as_str(),
            checkout_id: o.checkout_id.to_string(),
            total: o.total,
            lines: o.lines,
            payment_intent_id: o.payment_intent_id,
            created_at: o.created_at,
            refund_status: o.refund_status,
            refund_failure_reason: None,
            po_number: o.po_number,
            invoice_id: o.invoice_id.map(|i| i.to_string()),
        }
    }
}

/// `{"data": [...], "next_cursor": ...}` (DESIGN §8).
#[derive(Serialize, ToSchema)]
pub struct ListView<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `?limit=` (1..=500, default 50) and `?cursor=`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListParams {
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(50),
            Some(n @ 1..=500) => Ok(n),
            Some(_) => Err(ApiError::validation("limit must be between 1 and 500")),
        }
    }
}
