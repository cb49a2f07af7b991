//! An order is created with its checkout's reservation, with prices frozen from the catalogue
//! at that moment (promise 6), and follows the payment to `paid` and beyond.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CheckoutId, CustomerId, Money, OrderId, Quantity, Sku};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    PaymentProcessing,
    Paid,
    PaymentFailed,
    Cancelled,
    Fulfilled,
    Refunded,
    /// Placed on account: the units are sold and an invoice is open.
    AwaitingPaymentOnTerms,
    /// Manual capture: the card is authorized for the total, stock is committed, nothing is
    /// captured yet; shipments capture what they ship.
    Authorized,
    /// Manual capture: some lines shipped (and their amount captured), others still to ship.
    PartiallyFulfilled,
    /// The card holder disputed the payment: fulfilment is on hold until the dispute closes.
    Disputed,
    /// The dispute was lost: the money went back through the card network.
    RefundedByDispute,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 12] = [
        OrderStatus::PendingPayment,
        OrderStatus::PaymentProcessing,
        OrderStatus::Paid,
        OrderStatus::PaymentFailed,
        OrderStatus::Cancelled,
        OrderStatus::Fulfilled,
        OrderStatus::Refunded,
        OrderStatus::AwaitingPaymentOnTerms,
        OrderStatus::Authorized,
        OrderStatus::PartiallyFulfilled,
        OrderStatus::Disputed,
        OrderStatus::RefundedByDispute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::PaymentProcessing => "payment_processing",
            OrderStatus::Paid => "paid",
            OrderStatus::PaymentFailed => "payment_failed",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Fulfilled => "fulfilled",
            OrderStatus::Refunded => "refunded",
            OrderStatus::AwaitingPaymentOnTerms => "awaiting_payment_on_terms",
            OrderStatus::Authorized => "authorized",
            OrderStatus::PartiallyFulfilled => "partially_fulfilled",
            OrderStatus::Disputed => "disputed",
            OrderStatus::RefundedByDispute => "refunded_by_dispute",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// When the card is charged: `automatic` (at checkout, the default) or `manual` (authorized at
/// checkout, captured by the shipments). Decided once per checkout when it starts and stored
/// with it, so a charge resumed after a crash or a shop-wide change never switches mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMethod {
    #[default]
    Automatic,
    Manual,
}

impl CaptureMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMethod::Automatic => "automatic",
            CaptureMethod::Manual => "manual",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [CaptureMethod::Automatic, CaptureMethod::Manual]
            .into_iter()
            .find(|m| m.as_str() == raw)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub customer_id: CustomerId,
    pub checkout_id: CheckoutId,
    pub status: OrderStatus,
    pub total: Money,
    pub lines: Vec<OrderLine>,
    pub payment_intent_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// `pending`, `failed` or `succeeded` once a refund was asked for (see
    /// `Store::record_refund_pending`); `None` before.
    pub refund_status: Option<String>,
    /// The buyer's purchase-order number, as given on the checkout.
    pub po_number: Option<String>,
    /// The invoice of an order placed on account.
    pub invoice_id: Option<super::InvoiceId>,
    /// Manual capture: the amount the card is authorized for (`None`: captured at checkout).
    pub authorized_amount: Option<i64>,
    /// Manual capture: what the shipments captured so far.
    pub captured_amount: i64,
    /// What went back by partial refunds, in minor units.
    pub refunded_amount: i64,
}

/// An order's money as the admin sees it, in minor units of its currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentAmounts {
    pub authorized: i64,
    pub captured: i64,
    pub refunded: i64,
}

impl Order {
    /// Authorized, captured and refunded amounts. An order charged at checkout was authorized
    /// and captured in full once paid; its refunds are whole.
    pub fn amounts(&self) -> PaymentAmounts {
        if let Some(authorized) = self.authorized_amount {
            return PaymentAmounts {
                authorized,
                captured: self.captured_amount,
                refunded: self.refunded_amount,
            };
        }
        let paid = matches!(
            self.status,
            OrderStatus::Paid | OrderStatus::Fulfilled | OrderStatus::Refunded
        );
        let total = if paid { self.total.amount() } else { 0 };
        let refunded = if self.status == OrderStatus::Refunded {
            total
        } else {
            self.refunded_amount
        };
        PaymentAmounts {
            authorized: total,
            captured: total,
            refunded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_text() {
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(OrderStatus::parse("shipped"), None);
    }
}
