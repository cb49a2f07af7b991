//! Webhook bodies as Stripe sends them (<https://docs.stripe.com/api/events/object>), read
//! into the few shapes the checkout acts on.
//!
//! Promise 4 (no lost payments): a `payment_intent.*` event moves a checkout on and a
//! `charge.refunded` event confirms a refund; `refund.updated`, `refund.failed` and
//! `charge.refund.updated` carry a refund whose status settled. Stripe adds event types over time and an
//! endpoint may be subscribed to more than we handle, so an unknown type is `Other` (answered
//! 2xx and ignored), while a body that is not an event at all is an error.

use serde::Deserialize;

use super::{null_as_default, PaymentIntent, Refund};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the webhook body is not a Stripe event: {0}")]
    Malformed(String),
}

/// One Stripe event. `id` is what deliveries are deduplicated by: Stripe may send the same
/// event more than once and in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub id: String,
    /// e.g. `payment_intent.succeeded`, `charge.refunded`.
    pub event_type: String,
    pub created: i64,
    pub object: EventObject,
}

/// The object an event is about, told apart by its `object` field as Stripe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventObject {
    PaymentIntent(PaymentIntent),
    Charge {
        id: String,
        payment_intent: Option<String>,
        amount_refunded: i64,
        refunded: bool,
    },
    Refund(Refund),
    /// A dispute (`charge.dispute.*`): its id, the PaymentIntent disputed and its status
    /// (`needs_response`, ..., `won`, `lost`, `warning_closed`).
    Dispute {
        id: String,
        payment_intent: Option<String>,
        status: String,
    },
    Other,
}

impl WebhookEvent {
    /// Parses the raw body (the same bytes whose signature was verified).
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let raw: RawEvent =
            serde_json::from_slice(body).map_err(|e| EventError::Malformed(e.to_string()))?;
        if raw.object != "event" {
            return Err(EventError::Malformed(format!(
                "expected an event, got a {}",
                raw.object
            )));
        }
        let object = match raw.data.object.get("object").and_then(|o| o.as_str()) {
            Some("payment_intent") => EventObject::PaymentIntent(
                serde_json::from_value(raw.data.object).map_err(malformed("payment_intent"))?,
            ),
            Some("charge") => {
                let charge: RawCharge =
                    serde_json::from_value(raw.data.object).map_err(malformed("charge"))?;
                EventObject::Charge {
                    id: charge.id,
                    payment_intent: charge.payment_intent,
                    amount_refunded: charge.amount_refunded,
                    refunded: charge.refunded,
                }
            }
            Some("dispute") => {
                let dispute: RawDispute =
                    serde_json::from_value(raw.data.object).map_err(malformed("dispute"))?;
                EventObject::Dispute {
                    id: dispute.id,
                    payment_intent: dispute.payment_intent,
                    status: dispute.status,
                }
            }
            Some("refund") => EventObject::Refund(
                serde_json::from_value(raw.data.object).map_err(malformed("refund"))?,
            ),
            _ => EventObject::Other,
        };
        Ok(Self {
            id: raw.id,
            event_type: raw.event_type,
            created: raw.created,
            object,
        })
    }

    /// The PaymentIntent id the event concerns, whether it is about the intent or its charge.
    pub fn payment_intent_id(&self) -> Option<&str> {
        match &self.object {
            EventObject::PaymentIntent(intent) => Some(&intent.id),
            EventObject::Charge { payment_intent, .. } => payment_intent.as_deref(),
            EventObject::Refund(refund) => refund.payment_intent_id.as_deref(),
            EventObject::Dispute { payment_intent, .. } => payment_intent.as_deref(),
            EventObject::Other => None,
        }
    }
}

fn malformed(what: &'static str) -> impl Fn(serde_json::Error) -> EventError {
    move |e| EventError::Malformed(format!("{what}: {e}"))
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    object: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct RawCharge {
    id: String,
    #[serde(default)]
    payment_intent: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    amount_refunded: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    refunded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payments::RefundOutcome;

    #[test]
    fn refund_events_carry_the_refund_read_tolerantly() {
        for (status, outcome) in [
            (r#""succeeded""#, RefundOutcome::Succeeded),
            (r#""failed""#, RefundOutcome::Failed),
            (r#""canceled""#, RefundOutcome::Failed),
            (r#""pending""#, RefundOutcome::Pending),
            (r#""requires_action""#, RefundOutcome::Pending),
            ("null", RefundOutcome::Pending),
            (r#""a_status_stripe_adds_later""#, RefundOutcome::Pending),
        ] {
            let body = format!(
                r#"{{"id": "evt_r", "object": "event", "created": 3, "type": "refund.updated",
                "data": {{"object": {{"id": "re_1", "object": "refund", "amount": 1999,
                "payment_intent": "pi_1", "status": {status}, "charge": null, "reason": null,
                "metadata": null, "destination_details": {{"type": "card"}}}}}}}}"#
            );
            let event = WebhookEvent::parse(body.as_bytes()).expect("parses");
            let EventObject::Refund(refund) = &event.object else {
                panic!("a refund: {event:?}")
            };
            assert_eq!(refund.outcome(), outcome, "{status}");
            assert_eq!(event.payment_intent_id(), Some("pi_1"));
        }
        // Stripe's spec has payment_intent nullable too.
        let body = br#"{"id": "evt_r", "object": "event", "created": 3, "type": "refund.failed",
            "data": {"object": {"id": "re_1", "object": "refund", "amount": 5,
            "payment_intent": null, "status": "failed"}}}"#;
        let event = WebhookEvent::parse(body).expect("parses");
        assert_eq!(event.payment_intent_id(), None);
    }
    use crate::payments::IntentStatus;

    #[test]
    fn a_payment_intent_event_carries_the_intent() {
        let body = br#"{
            "id": "evt_1", "object": "event", "api_version": "2024-06-20", "created": 1700000000,
            "livemode": false, "pending_webhooks": 1, "type": "payment_intent.succeeded",
            "data": {"object": {
                "id": "pi_1", "object": "payment_intent", "amount": 1999, "currency": "eur",
                "status": "succeeded", "client_secret": "pi_1_secret_x", "created": 1700000000,
                "metadata": {"checkout_id": "c"}, "last_payment_error": null, "latest_charge": "ch_1"
            }}
        }"#;
        let event = WebhookEvent::parse(body).unwrap();
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.event_type, "payment_intent.succeeded");
        assert_eq!(event.created, 1_700_000_000);
        let EventObject::PaymentIntent(intent) = &event.object else {
            panic!("expected a payment intent, got {:?}", event.object);
        };
        assert_eq!(intent.status, IntentStatus::Succeeded);
        assert_eq!(intent.amount, 1999);
        assert_eq!(intent.metadata["checkout_id"], "c");
        assert_eq!(event.payment_intent_id(), Some("pi_1"));
    }

    #[test]
    fn a_failed_payment_event_carries_the_decline() {
        let body = br#"{"id": "evt_2", "object": "event", "created": 1, "type": "payment_intent.payment_failed",
            "data": {"object": {"id": "pi_2", "object": "payment_intent", "amount": 5, "currency": "eur",
            "status": "requires_payment_method", "created": 1,
            "last_payment_error": {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds", "message": "no"}}}}"#;
        let event = WebhookEvent::parse(body).unwrap();
        let EventObject::PaymentIntent(intent) = event.object else {
            panic!("expected a payment intent");
        };
        let decline = intent.last_payment_error.unwrap();
        assert_eq!(decline.code, "card_declined");
        assert_eq!(decline.decline_code.as_deref(), Some("insufficient_funds"));
    }

    #[test]
    fn a_refund_event_carries_the_charge() {
        let body = br#"{"id": "evt_3", "object": "event", "created": 2, "type": "charge.refunded",
            "data": {"object": {"id": "ch_1", "object": "charge", "amount": 1999, "amount_refunded": 1999,
            "refunded": true, "payment_intent": "pi_1"}}}"#;
        let event = WebhookEvent::parse(body).unwrap();
        assert_eq!(
            event.object,
            EventObject::Charge {
                id: "ch_1".into(),
                payment_intent: Some("pi_1".into()),
                amount_refunded: 1999,
                refunded: true
            }
        );
        assert_eq!(event.payment_intent_id(), Some("pi_1"));
    }

    #[test]
    fn an_event_about_something_else_is_other() {
        let body = br#"{"id": "evt_4", "object": "event", "created": 3, "type": "customer.created",
            "data": {"object": {"id": "cus_1", "object": "customer"}}}"#;
        let event = WebhookEvent::parse(body).unwrap();
        assert_eq!(event.event_type, "customer.created");
        assert_eq!(event.object, EventObject::Other);
        assert_eq!(event.payment_intent_id(), None);
    }

    #[test]
    fn a_malformed_body_is_an_error() {
        for bad in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"id": "evt", "object": "event", "created": 1, "type": "x"}"#,
            br#"{"id": "pi_1", "object": "payment_intent", "created": 1, "type": "x", "data": {"object": {}}}"#,
            br#"{"id": "evt", "object": "event", "created": 1, "type": "payment_intent.succeeded",
                "data": {"object": {"id": "pi_1", "object": "payment_intent", "status": "exploded"}}}"#,
        ] {
            assert!(
                matches!(WebhookEvent::parse(bad), Err(EventError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// The fields of a Stripe dispute (<https://docs.stripe.com/api/disputes/object>) the shop reads.
#[derive(Deserialize)]
struct RawDispute {
    id: String,
    #[serde(default)]
    payment_intent: Option<String>,
    #[serde(default)]
    status: String,
}
