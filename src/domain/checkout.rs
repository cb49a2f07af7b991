//! The checkout saga's position (DESIGN §3). Every state change goes through
//! [`CheckoutState::can_move_to`], so a late or repeated event can never move a checkout
//! backwards (promise 4).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CartId, CheckoutId, CustomerId, Money, OrderId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckoutState {
    /// Every line is reserved; the reservation expires unless heartbeats push it.
    Reserved,
    /// A charge is in flight; the reservation cannot expire.
    Charging,
    /// The card needs the customer (3-D Secure); a webhook or a timeout resolves it.
    RequiresAction,
    /// Paid: stock confirmed, order paid, fulfilment event written.
    Completed,
    /// Declined: reservation released, order `payment_failed`.
    PaymentFailed,
    /// The reservation window passed before payment.
    Expired,
    /// Cancelled by the customer or after an authentication timeout.
    Cancelled,
    /// Money came back to the customer.
    Refunded,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a checkout cannot move from {from:?} to {to:?}")]
pub struct TransitionError {
    pub from: CheckoutState,
    pub to: CheckoutState,
}

impl CheckoutState {
    pub const ALL: [CheckoutState; 8] = [
        CheckoutState::Reserved,
        CheckoutState::Charging,
        CheckoutState::RequiresAction,
        CheckoutState::Completed,
        CheckoutState::PaymentFailed,
        CheckoutState::Expired,
        CheckoutState::Cancelled,
        CheckoutState::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutState::Reserved => "reserved",
            CheckoutState::Charging => "charging",
            CheckoutState::RequiresAction => "requires_action",
            CheckoutState::Completed => "completed",
            CheckoutState::PaymentFailed => "payment_failed",
            CheckoutState::Expired => "expired",
            CheckoutState::Cancelled => "cancelled",
            CheckoutState::Refunded => "refunded",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Terminal states need no lease and no worker: nothing will move them on by itself.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            CheckoutState::Reserved | CheckoutState::Charging | CheckoutState::RequiresAction
        )
    }

    /// Whether units of this checkout are still held as `reserved` on the products.
    pub fn holds_reservation(self) -> bool {
        matches!(
            self,
            CheckoutState::Reserved | CheckoutState::Charging | CheckoutState::RequiresAction
        )
    }

    /// The arrows of DESIGN §3. A success that arrives after the checkout gave its units back
    /// (expired, failed, cancelled) may still complete it (re-reserved) or refund it.
    pub fn can_move_to(self, to: CheckoutState) -> bool {
        use CheckoutState::*;
        matches!(
            (self, to),
            (Reserved, Charging | Expired | Cancelled)
                | (Charging, Completed | PaymentFailed | RequiresAction | Cancelled)
                // The gateway refused the request before any money could move.
                | (Charging, Reserved)
                | (RequiresAction, Completed | PaymentFailed | Cancelled)
                | (PaymentFailed | Expired | Cancelled, Completed | Refunded)
                | (Completed, Refunded)
        )
    }

    pub fn transition(self, to: CheckoutState) -> Result<CheckoutState, TransitionError> {
        if self.can_move_to(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self, to })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub id: CheckoutId,
    pub customer_id: CustomerId,
    pub cart_id: CartId,
    pub order_id: OrderId,
    pub state: CheckoutState,
    pub total: Money,
    pub expires_at: DateTime<Utc>,
    /// Heartbeats never push `expires_at` past this.
    pub max_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// Charge attempts so far; part of the gateway idempotency key.
    pub attempt: i32,
    pub payment_intent_id: Option<String>,
    pub client_secret: Option<String>,
    pub decline_code: Option<String>,
    /// A payment succeeded after the units were given back and could not be taken again: the
    /// money must go back to the customer.
    pub refund_due: bool,
    /// The flash sale whose admission this checkout holds, if any.
    pub flash_sale_id: Option<super::FlashSaleId>,
    /// Units of the sale's SKU this checkout holds (0 outside a sale): what the gate counts as
    /// held, sold when paid, and given back to the sale on a refund.
    pub flash_sale_units: u32,
}

#[cfg(test)]
mod tests {
    use super::CheckoutState::*;
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_text() {
        for s in CheckoutState::ALL {
            assert_eq!(CheckoutState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn a_completed_checkout_never_goes_back() {
        for to in [
            Reserved,
            Charging,
            RequiresAction,
            PaymentFailed,
            Expired,
            Cancelled,
        ] {
            assert!(Completed.transition(to).is_err(), "{to:?}");
        }
        assert_eq!(Completed.transition(Refunded), Ok(Refunded));
    }

    #[test]
    fn only_a_reserved_checkout_expires() {
        for from in CheckoutState::ALL {
            assert_eq!(from.can_move_to(Expired), from == Reserved, "{from:?}");
        }
    }

    #[test]
    fn a_late_success_may_complete_a_checkout_that_gave_its_units_back() {
        for from in [Expired, PaymentFailed, Cancelled] {
            assert!(from.can_move_to(Completed));
            assert!(from.can_move_to(Refunded));
            assert!(!from.holds_reservation());
        }
    }
}
