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
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 8] = [
        OrderStatus::PendingPayment,
        OrderStatus::PaymentProcessing,
        OrderStatus::Paid,
        OrderStatus::PaymentFailed,
        OrderStatus::Cancelled,
        OrderStatus::Fulfilled,
        OrderStatus::Refunded,
        OrderStatus::AwaitingPaymentOnTerms,
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
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
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
