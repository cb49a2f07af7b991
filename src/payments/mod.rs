//! The payment gateway as the checkout saga sees it: one trait, two implementations (the
//! Stripe HTTP API in `stripe.rs`, the in-process test-mode simulator in `simulator.rs`), and
//! one error enum that says what a failure means for the money rather than which library
//! failed.
//!
//! Promise 3 (at most one charge per checkout) rests on two things defined here: every call
//! that can move money carries the caller's idempotency key, and `GatewayError::Unknown`
//! means "money may have moved", so the saga retries with the same key instead of treating a
//! timeout as a decline. Promise 4 (no lost payments) rests on `retrieve` and
//! `intents_for_checkout`, which let the reconciler and the audit ask the gateway what really
//! happened. See DESIGN §2, §3 and §6.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{CaptureMethod, CheckoutId, CustomerId, Money, OrderId};

pub mod events;
pub mod signature;
pub mod simulator;
pub mod stripe;

pub use events::{EventError, EventObject, WebhookEvent};
pub use signature::SignatureError;
pub use simulator::{Ledger, SimulatedEvent, StripeSimulator};
pub use stripe::{StripeConfigError, StripeGateway, Timeouts};

/// The metadata keys every PaymentIntent carries, so a webhook or the audit can find the
/// checkout and order a payment belongs to (DESIGN §8, contract details).
pub const METADATA_CHECKOUT_ID: &str = "checkout_id";
pub const METADATA_ORDER_ID: &str = "order_id";
pub const METADATA_CUSTOMER_ID: &str = "customer_id";

/// One charge attempt of a checkout: create a PaymentIntent and confirm it in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub amount: Money,
    pub payment_method: String,
    pub checkout_id: CheckoutId,
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    /// `checkout-{id}-charge-{attempt}`: the same attempt always sends the same key.
    pub idempotency_key: String,
    /// `manual`: authorize only (`capture_method=manual`, multicapture asked for when the card
    /// offers it); the shipments capture.
    pub capture_method: CaptureMethod,
}

/// Capture part of an authorized PaymentIntent
/// (<https://docs.stripe.com/api/payment_intents/capture>): `amount_to_capture` at most what is
/// still capturable. A capture with `final_capture: false` leaves the rest capturable
/// (multicapture, <https://docs.stripe.com/payments/multicapture>); a final one releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    pub payment_intent_id: String,
    pub amount_to_capture: i64,
    pub final_capture: bool,
    pub idempotency_key: String,
}

impl ChargeRequest {
    /// The metadata the PaymentIntent is created with.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                METADATA_CHECKOUT_ID.to_owned(),
                self.checkout_id.to_string(),
            ),
            (METADATA_ORDER_ID.to_owned(), self.order_id.to_string()),
            (
                METADATA_CUSTOMER_ID.to_owned(),
                self.customer_id.to_string(),
            ),
        ])
    }
}

/// A PaymentIntent's status, spelled as Stripe spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    RequiresCapture,
    Canceled,
    Succeeded,
}

impl IntentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequiresPaymentMethod => "requires_payment_method",
            Self::RequiresConfirmation => "requires_confirmation",
            Self::RequiresAction => "requires_action",
            Self::Processing => "processing",
            Self::RequiresCapture => "requires_capture",
            Self::Canceled => "canceled",
            Self::Succeeded => "succeeded",
        }
    }
}

/// Why a card was refused, as Stripe reports it in `error` or `last_payment_error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decline {
    /// e.g. `card_declined`, `payment_intent_authentication_failure`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub code: String,
    /// e.g. `generic_decline`, `insufficient_funds`; only card declines carry one.
    #[serde(default)]
    pub decline_code: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub message: String,
}

/// Reads a field Stripe may send as `null` (or leave out) as its default value.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The fields of a Stripe PaymentIntent that the checkout needs. Stripe sends many more; they
/// are ignored on purpose, so a new field on Stripe's side never breaks parsing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    pub status: IntentStatus,
    pub amount: i64,
    pub currency: String,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub last_payment_error: Option<Decline>,
    pub created: i64,
    /// What may still be captured (manual capture); 0 otherwise.
    #[serde(default, deserialize_with = "null_as_default")]
    pub amount_capturable: i64,
    /// What was captured so far.
    #[serde(default, deserialize_with = "null_as_default")]
    pub amount_received: i64,
}

impl PaymentIntent {
    /// The checkout this intent was created for, if its metadata names one.
    pub fn checkout_id(&self) -> Option<CheckoutId> {
        self.metadata
            .get(METADATA_CHECKOUT_ID)
            .and_then(|raw| CheckoutId::parse(raw).ok())
    }

    /// The order this intent pays for, if its metadata names one.
    pub fn order_id(&self) -> Option<OrderId> {
        self.metadata
            .get(METADATA_ORDER_ID)
            .and_then(|raw| OrderId::parse(raw).ok())
    }
}

/// What a confirmed charge ended as. A decline is an outcome, not an error: the card holder
/// said no, money did not move, and the checkout may try another payment method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded(PaymentIntent),
    /// Manual capture: the card holds the funds (`requires_capture`); nothing captured yet.
    Authorized(PaymentIntent),
    /// 3-D Secure or similar: the customer must act with `client_secret`; a webhook or a poll
    /// tells the saga how it ended.
    RequiresAction(PaymentIntent),
    Declined {
        payment_intent_id: Option<String>,
        decline: Decline,
    },
}

impl ChargeOutcome {
    /// Reads the outcome of a confirmed PaymentIntent from its status.
    ///
    /// `requires_capture` is an authorization (asked for by manual capture). `processing`
    /// means money may still move, hence `Unknown`: the saga keeps the checkout in `charging`
    /// and the reconciler asks again later. The states in which money has certainly
    /// not moved and cannot move without another confirmation (`requires_payment_method`,
    /// `requires_confirmation`, `canceled`) are declines; Stripe's own `last_payment_error`
    /// is used when there is one.
    pub fn from_confirmed_intent(intent: PaymentIntent) -> Result<Self, GatewayError> {
        match intent.status {
            IntentStatus::Succeeded => Ok(Self::Succeeded(intent)),
            IntentStatus::RequiresAction => Ok(Self::RequiresAction(intent)),
            IntentStatus::RequiresCapture => Ok(Self::Authorized(intent)),
            IntentStatus::Processing => Err(GatewayError::Unknown(format!(
                "payment intent {} is {}",
                intent.id,
                intent.status.as_str()
            ))),
            IntentStatus::RequiresPaymentMethod
            | IntentStatus::RequiresConfirmation
            | IntentStatus::Canceled => {
                let decline = intent
                    .last_payment_error
                    .clone()
                    .unwrap_or_else(|| Decline {
                        code: format!("payment_intent_{}", intent.status.as_str()),
                        decline_code: None,
                        message: format!("the payment intent is {}", intent.status.as_str()),
                    });
                Ok(Self::Declined {
                    payment_intent_id: Some(intent.id),
                    decline,
                })
            }
        }
    }

    /// The PaymentIntent id, whatever the outcome (a decline of an unknown card may have none).
    pub fn payment_intent_id(&self) -> Option<&str> {
        match self {
            Self::Succeeded(intent) | Self::Authorized(intent) | Self::RequiresAction(intent) => {
                Some(&intent.id)
            }
            Self::Declined {
                payment_intent_id, ..
            } => payment_intent_id.as_deref(),
        }
    }
}

/// Stripe's minimum charge in minor units, for the currencies its documentation lists
/// (<https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts>); `None` for any
/// other currency, whose minimum is an exchange-rate-dependent equivalent of USD 0.50 that only
/// Stripe can judge.
pub fn minimum_charge(currency: &str) -> Option<i64> {
    let minimum = match currency.to_ascii_lowercase().as_str() {
        "usd" | "eur" | "aud" | "brl" | "cad" | "chf" | "inr" | "nzd" | "sgd" => 50,
        "gbp" => 30,
        "aed" | "myr" => 200,
        "bgn" => 100,
        "czk" => 1_500,
        "dkk" => 250,
        "hkd" => 400,
        "huf" => 17_500,
        "jpy" => 50,
        "mxn" => 1_000,
        "nok" | "sek" => 300,
        "pln" => 200,
        "ron" => 200,
        "thb" => 1_000,
        _ => return None,
    };
    Some(minimum)
}

/// Refund a PaymentIntent, fully (`amount: None`) or in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub payment_intent_id: String,
    pub amount: Option<i64>,
    pub idempotency_key: String,
}

/// A Stripe refund (<https://docs.stripe.com/api/refunds/object>), read tolerantly: Stripe's
/// spec has `status` and `payment_intent` nullable, and unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: String,
    #[serde(rename = "payment_intent", default)]
    pub payment_intent_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub amount: i64,
    /// `pending`, `requires_action`, `succeeded`, `failed` or `canceled` as Stripe reports it;
    /// `None` when Stripe sent `null`.
    #[serde(default)]
    pub status: Option<String>,
    /// Why Stripe failed it, when it did and says (`lost_or_stolen_card`,
    /// `expired_or_canceled_card`, `unknown`, ...).
    #[serde(default)]
    pub failure_reason: Option<String>,
}

/// Where a refund stands, as far as the order is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The money went back.
    Succeeded,
    /// The money did not go back (`failed`, `canceled`): the order stays paid.
    Failed,
    /// Not settled yet (`pending`, `requires_action`, `null` or a status we do not know):
    /// Stripe reports the end with `refund.updated` / `refund.failed`.
    Pending,
}

impl Refund {
    pub fn outcome(&self) -> RefundOutcome {
        match self.status.as_deref() {
            Some("succeeded") => RefundOutcome::Succeeded,
            Some("failed" | "canceled") => RefundOutcome::Failed,
            _ => RefundOutcome::Pending,
        }
    }
}

/// What went wrong talking to the gateway, in terms of what the caller may do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Timeout, lost connection, 429, 5xx or an answer we could not read: money MAY have
    /// moved. Retry with the same idempotency key or ask the gateway; never treat as declined.
    #[error("the outcome is unknown, money may have moved: {0}")]
    Unknown(String),
    /// Stripe 409: a request with the same idempotency key is still in flight. Retry later
    /// with the same key.
    #[error("a request with the same idempotency key is still in flight")]
    IdempotencyConflict,
    /// Stripe 400 `idempotency_error`: the key was first used with other parameters. A bug on
    /// our side (the key must be derived from the attempt), so never retried.
    #[error("the idempotency key was already used with different parameters: {0}")]
    IdempotencyKeyReused(String),
    /// The gateway refused the request itself, e.g. `resource_missing` for an unknown payment
    /// method. Nothing moved; retrying the same request gives the same answer.
    #[error("the gateway refused the request ({code}): {message}")]
    InvalidRequest { code: String, message: String },
    /// Stripe 401: the secret key is wrong or revoked.
    #[error("the gateway refused our credentials: {0}")]
    Authentication(String),
}

impl GatewayError {
    /// True when the same request, with the same idempotency key, may be sent again and may
    /// still end differently (the first try's outcome is not known, or is not finished yet).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unknown(_) | Self::IdempotencyConflict)
    }
}

/// A payment service that can charge, look up, cancel and refund PaymentIntents.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Creates and confirms a PaymentIntent for the request's amount and payment method.
    async fn create_and_confirm(&self, req: &ChargeRequest) -> Result<ChargeOutcome, GatewayError>;

    async fn retrieve(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError>;

    async fn cancel(
        &self,
        payment_intent_id: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, GatewayError>;

    async fn refund(&self, req: &RefundRequest) -> Result<Refund, GatewayError>;

    /// Captures part or all of an authorized PaymentIntent, under the request's key.
    async fn capture(&self, req: &CaptureRequest) -> Result<PaymentIntent, GatewayError>;

    /// A refund as the gateway holds it now (for the audit).
    async fn retrieve_refund(&self, refund_id: &str) -> Result<Refund, GatewayError>;

    /// Every PaymentIntent whose metadata.checkout_id is this checkout (for the audit: at most
    /// one succeeded).
    async fn intents_for_checkout(
        &self,
        checkout_id: CheckoutId,
    ) -> Result<Vec<PaymentIntent>, GatewayError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(status: IntentStatus, error: Option<Decline>) -> PaymentIntent {
        PaymentIntent {
            id: "pi_1".into(),
            status,
            amount: 100,
            currency: "eur".into(),
            client_secret: None,
            metadata: BTreeMap::new(),
            last_payment_error: error,
            created: 0,
            amount_capturable: 0,
            amount_received: 0,
        }
    }

    #[test]
    fn a_processing_intent_is_an_unknown_outcome_not_a_decline() {
        let outcome = ChargeOutcome::from_confirmed_intent(intent(IntentStatus::Processing, None));
        assert!(matches!(outcome, Err(GatewayError::Unknown(_))));
    }

    #[test]
    fn an_intent_awaiting_capture_is_an_authorization() {
        let outcome =
            ChargeOutcome::from_confirmed_intent(intent(IntentStatus::RequiresCapture, None));
        assert!(matches!(outcome, Ok(ChargeOutcome::Authorized(_))));
    }

    #[test]
    fn a_failed_intent_is_declined_with_stripes_own_reason() {
        let decline = Decline {
            code: "card_declined".into(),
            decline_code: Some("insufficient_funds".into()),
            message: "Your card has insufficient funds.".into(),
        };
        let outcome = ChargeOutcome::from_confirmed_intent(intent(
            IntentStatus::RequiresPaymentMethod,
            Some(decline.clone()),
        ))
        .unwrap();
        assert_eq!(
            outcome,
            ChargeOutcome::Declined {
                payment_intent_id: Some("pi_1".into()),
                decline
            }
        );
    }

    #[test]
    fn only_unknown_and_in_flight_errors_are_retryable() {
        assert!(GatewayError::Unknown("timeout".into()).is_retryable());
        assert!(GatewayError::IdempotencyConflict.is_retryable());
        assert!(!GatewayError::IdempotencyKeyReused("x".into()).is_retryable());
        assert!(!GatewayError::Authentication("x".into()).is_retryable());
        assert!(!GatewayError::InvalidRequest {
            code: "resource_missing".into(),
            message: "x".into()
        }
        .is_retryable());
    }

    #[test]
    fn a_status_reads_and_writes_as_stripe_spells_it() {
        let status: IntentStatus = serde_json::from_str("\"requires_action\"").unwrap();
        assert_eq!(status, IntentStatus::RequiresAction);
        assert_eq!(
            serde_json::to_string(&IntentStatus::RequiresPaymentMethod).unwrap(),
            "\"requires_payment_method\""
        );
    }
}
