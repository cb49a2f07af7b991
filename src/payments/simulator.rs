//! An in-process stand-in for Stripe in test mode, the gateway of the embedded shape
//! (DESIGN §1, §6): `cargo run` on a bare machine takes payments with Stripe's test payment
//! methods without a network or an account.
//!
//! It keeps the rules the checkout relies on for promise 3 (at most one charge per checkout):
//! the same idempotency key with the same parameters replays the first answer, the same key
//! with other parameters is refused, and every PaymentIntent and refund lands in a ledger the
//! audit can read. Refunds never exceed what was charged (promise 4). Like Stripe, it tells the
//! shop about state changes through signed webhooks, so the webhook path is exercised in the
//! embedded shape too.
//!
//! Test payment methods, as in Stripe's test mode (<https://docs.stripe.com/testing>):
//! `pm_card_visa`, `pm_card_mastercard`, `pm_card_amex`, `pm_card_discover` and `pm_card_jcb`
//! succeed (the JCB card without multicapture), `pm_card_chargeDeclined` is declined
//! (`generic_decline`), `pm_card_chargeDeclinedInsufficientFunds` is declined
//! (`insufficient_funds`), `pm_card_authenticationRequired` needs 3-D Secure (finished with
//! [`StripeSimulator::authenticate`]); any other payment method is `resource_missing`.
//!
//! Manual capture as Stripe documents it (<https://docs.stripe.com/payments/place-a-hold-on-a-payment-method>,
//! <https://docs.stripe.com/payments/multicapture>): a confirmed intent with
//! `capture_method=manual` ends `requires_capture` holding the whole amount; a capture takes
//! `amount_to_capture` (at most what is capturable); `final_capture=false` keeps the rest
//! capturable (cards offer multicapture here), a final capture releases it and the intent is
//! `succeeded`; refunds never exceed what was captured; an authorization left uncaptured is
//! cancelled by Stripe after 7 days ([`StripeSimulator::lapse`] plays that).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::sync::mpsc;

use super::signature;
use super::stripe::STRIPE_VERSION;
use super::{
    CaptureRequest, ChargeOutcome, ChargeRequest, Decline, GatewayError, IntentStatus,
    PaymentGateway, PaymentIntent, Refund, RefundRequest,
};
use crate::domain::{CaptureMethod, CheckoutId};

/// Stripe captures one PaymentIntent at most this many times (multicapture).
const MAX_CAPTURES: u32 = 50;

/// A failed delivery is tried this many times in all, waiting twice as long after each try;
/// Stripe itself keeps trying for days, but an in-process simulator must not pile up work.
const WEBHOOK_ATTEMPTS: u32 = 5;
const WEBHOOK_FIRST_BACKOFF: Duration = Duration::from_millis(50);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Cheap to clone: clones share one simulated Stripe account.
#[derive(Clone, Default)]
pub struct StripeSimulator {
    // A std Mutex, not tokio's: every operation is a short in-memory step that never awaits
    // while holding it, so there is nothing to gain from an async lock and a plain one cannot
    // be held across an await by mistake (its guard is not Send).
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for StripeSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSimulator").finish_non_exhaustive()
    }
}

/// Every PaymentIntent and refund the simulator has made, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub intents: Vec<PaymentIntent>,
    pub refunds: Vec<Refund>,
}

impl Ledger {
    /// How many PaymentIntents of this checkout succeeded: promise 3 says at most one.
    pub fn succeeded_for(&self, checkout_id: CheckoutId) -> usize {
        self.intents
            .iter()
            .filter(|i| i.status == IntentStatus::Succeeded && i.checkout_id() == Some(checkout_id))
            .count()
    }

    /// The total refunded on one PaymentIntent.
    pub fn refunded(&self, payment_intent_id: &str) -> i64 {
        self.refunds
            .iter()
            .filter(|r| r.payment_intent_id.as_deref() == Some(payment_intent_id))
            .filter(|r| r.outcome() != super::RefundOutcome::Failed)
            .map(|r| r.amount)
            .sum()
    }
}

/// An event the simulator emitted, with the exact body it sends (or would send) to the
/// webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedEvent {
    pub id: String,
    pub event_type: String,
    pub payload: String,
}

#[derive(Default)]
struct State {
    intents: Vec<PaymentIntent>,
    by_id: HashMap<String, usize>,
    /// The charge a succeeded intent made, named in `charge.refunded` events.
    charges: HashMap<String, String>,
    /// Intents created with `capture_method=manual`, with the captures made so far.
    manual: HashMap<String, u32>,
    /// Manual intents whose card offers no multicapture: captured once, finally.
    single_capture: std::collections::HashSet<String>,
    refunds: Vec<Refund>,
    /// The status new refunds answer with: `None` means Stripe's `null`; by default
    /// `succeeded`.
    refund_status: Option<Option<String>>,
    idempotency: HashMap<String, Remembered>,
    events: Vec<SimulatedEvent>,
    webhook: Option<mpsc::UnboundedSender<SimulatedEvent>>,
}

/// The first answer given for an idempotency key, and what it was asked.
struct Remembered {
    fingerprint: String,
    answer: Answer,
}

#[derive(Clone)]
enum Answer {
    Charge(ChargeOutcome),
    Intent(PaymentIntent),
    Refund(Refund),
}

enum TestCard {
    Succeeds,
    Declines {
        decline_code: &'static str,
        message: &'static str,
    },
    NeedsAuthentication,
}

fn test_card(payment_method: &str) -> Option<TestCard> {
    Some(match payment_method {
        "pm_card_visa" | "pm_card_mastercard" | "pm_card_amex" | "pm_card_discover"
        | "pm_card_jcb" => TestCard::Succeeds,
        "pm_card_chargeDeclined" => TestCard::Declines {
            decline_code: "generic_decline",
            message: "Your card was declined.",
        },
        "pm_card_chargeDeclinedInsufficientFunds" => TestCard::Declines {
            decline_code: "insufficient_funds",
            message: "Your card has insufficient funds.",
        },
        "pm_card_authenticationRequired" => TestCard::NeedsAuthentication,
        _ => return None,
    })
}

impl StripeSimulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// New refunds answer with this status (`pending`, `failed`, `None` for `null`) instead
    /// of `succeeded`, as Stripe may; no `charge.refunded` event follows them.
    pub fn answer_refunds_with(&self, status: Option<&str>) {
        self.state().refund_status = Some(status.map(str::to_owned));
    }

    /// Stripe settles refund `refund_id` to `status` without telling anyone (a lost event).
    pub fn settle_refund(&self, refund_id: &str, status: &str) {
        for refund in &mut self.state().refunds {
            if refund.id == refund_id {
                refund.status = Some(status.to_owned());
                refund.failure_reason = failure_reason_of(Some(status));
            }
        }
    }

    /// A snapshot of every PaymentIntent and refund so far.
    pub fn ledger(&self) -> Ledger {
        let state = self.state();
        Ledger {
            intents: state.intents.clone(),
            refunds: state.refunds.clone(),
        }
    }

    /// Every event emitted so far, delivered or not.
    pub fn events(&self) -> Vec<SimulatedEvent> {
        self.state().events.clone()
    }

    /// From now on, POST every event to `url`, signed with `secret` as Stripe signs them.
    /// Deliveries run on one spawned task, one at a time, so they arrive in the order the
    /// events happened; a failed delivery is retried a few times with backoff, then dropped
    /// (the reconciler covers lost events, as it must with Stripe too). Must be called from
    /// within a Tokio runtime; outside one it logs an error and keeps only recording.
    pub fn set_webhook_target(&self, url: String, secret: SecretString) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("webhook target set outside a Tokio runtime; events are only recorded");
            return;
        };
        let http = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
            Ok(http) => http,
            Err(e) => {
                tracing::error!(error = %e, "no HTTP client for webhooks; events are only recorded");
                return;
            }
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        // Replacing the sender ends the previous worker once it has sent what it already had.
        self.state().webhook = Some(sender);
        runtime.spawn(deliver_events(receiver, http, url, secret));
    }

    /// What the customer's 3-D Secure step does to an intent in `requires_action`: it succeeds
    /// (`succeed`) or fails with `payment_intent_authentication_failure`.
    pub fn authenticate(
        &self,
        payment_intent_id: &str,
        succeed: bool,
    ) -> Result<PaymentIntent, GatewayError> {
        let mut state = self.state();
        let intent = state.intent(payment_intent_id)?;
        if intent.status != IntentStatus::RequiresAction {
            return Err(unexpected_state(&intent, "authenticate"));
        }
        let updated = if succeed {
            state.succeed(intent)
        } else {
            state.fail(
                intent,
                Decline {
                    code: "payment_intent_authentication_failure".into(),
                    decline_code: None,
                    message: "The provided PaymentMethod has failed authentication.".into(),
                },
            )
        };
        Ok(updated)
    }

    /// Stripe's own cancellation of an authorization nobody captured in time (7 days for most
    /// cards): the intent is `canceled` (`cancellation_reason: automatic`), what was still
    /// capturable is released, and `payment_intent.canceled` goes out.
    pub fn lapse(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError> {
        let mut state = self.state();
        let intent = state.intent(payment_intent_id)?;
        if intent.status != IntentStatus::RequiresCapture {
            return Err(unexpected_state(&intent, "lapse"));
        }
        let mut lapsed = intent;
        lapsed.amount_capturable = 0;
        let lapsed = state.update(lapsed, IntentStatus::Canceled);
        let mut object = intent_json(&lapsed, None);
        object["cancellation_reason"] = json!("automatic");
        state.emit("payment_intent.canceled", object);
        Ok(lapsed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, and every step leaves the state whole, so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Replays the answer remembered for `key`, refuses a key reused with other parameters,
    /// or runs `act` and remembers its answer. Refused requests (`InvalidRequest`) are not
    /// remembered, as Stripe does not save the result of a request that failed validation.
    fn idempotent(
        &mut self,
        key: &str,
        fingerprint: String,
        act: impl FnOnce(&mut State) -> Result<Answer, GatewayError>,
    ) -> Result<Answer, GatewayError> {
        if let Some(remembered) = self.idempotency.get(key) {
            if remembered.fingerprint != fingerprint {
                return Err(GatewayError::IdempotencyKeyReused(format!(
                    "Keys for idempotent requests can only be used with the same parameters they \
                     were first used with. Try using a key other than '{key}' if you meant to \
                     execute a different request."
                )));
            }
            return Ok(remembered.answer.clone());
        }
        let answer = act(self)?;
        self.idempotency.insert(
            key.to_owned(),
            Remembered {
                fingerprint,
                answer: answer.clone(),
            },
        );
        Ok(answer)
    }

    fn charge(&mut self, req: &ChargeRequest) -> Result<Answer, GatewayError> {
        let card = test_card(&req.payment_method).ok_or_else(|| GatewayError::InvalidRequest {
            code: "resource_missing".into(),
            message: format!("No such PaymentMethod: '{}'", req.payment_method),
        })?;
        let minimum = super::minimum_charge(req.amount.currency().as_str()).unwrap_or(1);
        if req.amount.amount() < minimum {
            // As Stripe answers it: 400 invalid_request_error, nothing created.
            return Err(GatewayError::InvalidRequest {
                code: "amount_too_small".into(),
                message: format!(
                    "Amount must be at least {minimum} {} minor units",
                    req.amount.currency().to_lowercase()
                ),
            });
        }
        let id = new_id("pi");
        let intent = PaymentIntent {
            client_secret: Some(format!("{id}_secret_{}", random_part())),
            id,
            status: IntentStatus::RequiresConfirmation,
            amount: req.amount.amount(),
            currency: req.amount.currency().to_lowercase(),
            metadata: req.metadata(),
            last_payment_error: None,
            created: chrono::Utc::now().timestamp(),
            amount_capturable: 0,
            amount_received: 0,
        };
        if req.capture_method == CaptureMethod::Manual {
            self.manual.insert(intent.id.clone(), 0);
            if !offers_multicapture(&req.payment_method) {
                self.single_capture.insert(intent.id.clone());
            }
        }
        self.by_id.insert(intent.id.clone(), self.intents.len());
        self.intents.push(intent.clone());
        let outcome = match card {
            TestCard::Succeeds => match self.succeed(intent) {
                done if done.status == IntentStatus::RequiresCapture => {
                    ChargeOutcome::Authorized(done)
                }
                done => ChargeOutcome::Succeeded(done),
            },
            TestCard::NeedsAuthentication => {
                ChargeOutcome::RequiresAction(self.update(intent, IntentStatus::RequiresAction))
            }
            TestCard::Declines {
                decline_code,
                message,
            } => {
                let decline = Decline {
                    code: "card_declined".into(),
                    decline_code: Some(decline_code.into()),
                    message: message.into(),
                };
                let failed = self.fail(intent, decline.clone());
                ChargeOutcome::Declined {
                    payment_intent_id: Some(failed.id),
                    decline,
                }
            }
        };
        Ok(Answer::Charge(outcome))
    }

    fn cancel(&mut self, payment_intent_id: &str) -> Result<Answer, GatewayError> {
        let intent = self.intent(payment_intent_id)?;
        if matches!(
            intent.status,
            IntentStatus::Succeeded | IntentStatus::Canceled
        ) {
            return Err(unexpected_state(&intent, "cancel"));
        }
        let canceled = self.update(intent, IntentStatus::Canceled);
        self.emit("payment_intent.canceled", intent_json(&canceled, None));
        Ok(Answer::Intent(canceled))
    }

    fn refund(&mut self, req: &RefundRequest) -> Result<Answer, GatewayError> {
        let intent = self.intent(&req.payment_intent_id)?;
        // A multicaptured intent may be refunded before its final capture.
        if intent.status != IntentStatus::Succeeded && intent.amount_received == 0 {
            return Err(unexpected_state(&intent, "refund"));
        }
        let already: i64 = self
            .refunds
            .iter()
            .filter(|r| r.payment_intent_id.as_deref() == Some(intent.id.as_str()))
            .filter(|r| r.outcome() != super::RefundOutcome::Failed)
            .map(|r| r.amount)
            .sum();
        let remaining = intent.amount_received - already;
        if remaining == 0 {
            return Err(invalid(
                "charge_already_refunded",
                format!("Charge for {} has already been refunded.", intent.id),
            ));
        }
        let amount = req.amount.unwrap_or(remaining);
        if amount < 1 {
            return Err(invalid(
                "amount_too_small",
                "Refund amount must be positive.".into(),
            ));
        }
        if amount > remaining {
            return Err(invalid(
                "amount_too_large",
                format!("Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})."),
            ));
        }
        let status = self
            .refund_status
            .clone()
            .unwrap_or_else(|| Some("succeeded".into()));
        let refund = Refund {
            id: new_id("re"),
            payment_intent_id: Some(intent.id.clone()),
            amount,
            failure_reason: failure_reason_of(status.as_deref()),
            status,
        };
        self.refunds.push(refund.clone());
        if refund.outcome() != super::RefundOutcome::Succeeded {
            return Ok(Answer::Refund(refund));
        }
        let charge_id = self.charges.get(&intent.id).cloned().unwrap_or_default();
        let refunded = already + amount;
        self.emit(
            "charge.refunded",
            json!({
                "id": charge_id,
                "object": "charge",
                "amount": intent.amount,
                "amount_refunded": refunded,
                "currency": intent.currency,
                "payment_intent": intent.id,
                "amount_captured": intent.amount_received,
                "refunded": refunded == intent.amount_received,
                "status": "succeeded",
            }),
        );
        Ok(Answer::Refund(refund))
    }

    fn intent(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError> {
        self.by_id
            .get(payment_intent_id)
            .map(|&at| self.intents[at].clone())
            .ok_or_else(|| {
                invalid(
                    "resource_missing",
                    format!("No such payment_intent: '{payment_intent_id}'"),
                )
            })
    }

    fn update(&mut self, mut intent: PaymentIntent, status: IntentStatus) -> PaymentIntent {
        intent.status = status;
        let at = self.by_id[&intent.id];
        self.intents[at] = intent.clone();
        intent
    }

    /// The card said yes: captured at once, or, under manual capture, authorized.
    fn succeed(&mut self, mut intent: PaymentIntent) -> PaymentIntent {
        if self.manual.contains_key(&intent.id) {
            let charge_id = new_id("ch");
            self.charges.insert(intent.id.clone(), charge_id.clone());
            intent.amount_capturable = intent.amount;
            let authorized = self.update(intent, IntentStatus::RequiresCapture);
            self.emit(
                "payment_intent.amount_capturable_updated",
                intent_json(&authorized, Some(&charge_id)),
            );
            return authorized;
        }
        intent.amount_received = intent.amount;
        let charge_id = new_id("ch");
        self.charges.insert(intent.id.clone(), charge_id.clone());
        let succeeded = self.update(intent, IntentStatus::Succeeded);
        self.emit(
            "payment_intent.succeeded",
            intent_json(&succeeded, Some(&charge_id)),
        );
        succeeded
    }

    fn fail(&mut self, mut intent: PaymentIntent, decline: Decline) -> PaymentIntent {
        intent.last_payment_error = Some(decline);
        let failed = self.update(intent, IntentStatus::RequiresPaymentMethod);
        self.emit("payment_intent.payment_failed", intent_json(&failed, None));
        failed
    }

    fn capture(&mut self, req: &CaptureRequest) -> Result<Answer, GatewayError> {
        let mut intent = self.intent(&req.payment_intent_id)?;
        let Some(&captures) = self.manual.get(&intent.id) else {
            return Err(unexpected_state(&intent, "capture"));
        };
        if intent.status != IntentStatus::RequiresCapture {
            return Err(unexpected_state(&intent, "capture"));
        }
        if req.amount_to_capture < 1 {
            return Err(invalid(
                "amount_too_small",
                "amount_to_capture must be positive.".into(),
            ));
        }
        if req.amount_to_capture > intent.amount_capturable {
            return Err(invalid(
                "amount_too_large",
                format!(
                    "The amount to capture ({}) is greater than the amount capturable ({}).",
                    req.amount_to_capture, intent.amount_capturable
                ),
            ));
        }
        if !req.final_capture && self.single_capture.contains(&intent.id) {
            return Err(invalid(
                "payment_intent_multicapture_not_available",
                "Multicapture is not available for this PaymentIntent.".into(),
            ));
        }
        let last_allowed = captures + 1 >= MAX_CAPTURES;
        if !req.final_capture && last_allowed {
            return Err(invalid(
                "payment_intent_max_captures_exceeded",
                format!("A PaymentIntent can be captured at most {MAX_CAPTURES} times."),
            ));
        }
        self.manual.insert(intent.id.clone(), captures + 1);
        intent.amount_received += req.amount_to_capture;
        intent.amount_capturable -= req.amount_to_capture;
        let charge_id = self.charges.get(&intent.id).cloned();
        let captured = if req.final_capture || intent.amount_capturable == 0 {
            // The rest of the hold is released.
            intent.amount_capturable = 0;
            let done = self.update(intent, IntentStatus::Succeeded);
            self.emit(
                "payment_intent.succeeded",
                intent_json(&done, charge_id.as_deref()),
            );
            done
        } else {
            self.update(intent, IntentStatus::RequiresCapture)
        };
        Ok(Answer::Intent(captured))
    }

    /// Records the event and hands it to the delivery task while still holding the lock, so
    /// the queue order is the order in which the changes happened.
    fn emit(&mut self, event_type: &str, object: serde_json::Value) {
        let id = new_id("evt");
        let payload = json!({
            "id": id,
            "object": "event",
            "api_version": STRIPE_VERSION,
            "created": chrono::Utc::now().timestamp(),
            "livemode": false,
            "pending_webhooks": u8::from(self.webhook.is_some()),
            "type": event_type,
            "data": { "object": object },
        })
        .to_string();
        let event = SimulatedEvent {
            id,
            event_type: event_type.to_owned(),
            payload,
        };
        self.events.push(event.clone());
        if let Some(webhook) = &self.webhook {
            if webhook.send(event).is_err() {
                tracing::warn!("the webhook delivery task has stopped; event only recorded");
            }
        }
    }
}

/// A PaymentIntent as Stripe serialises it inside an event.
fn intent_json(intent: &PaymentIntent, latest_charge: Option<&str>) -> serde_json::Value {
    let mut object = serde_json::to_value(intent).expect("a PaymentIntent always serialises");
    object["object"] = json!("payment_intent");
    object["livemode"] = json!(false);
    object["latest_charge"] = json!(latest_charge);
    if intent.last_payment_error.is_some() {
        object["last_payment_error"]["type"] = json!("card_error");
    }
    object
}

fn unexpected_state(intent: &PaymentIntent, action: &str) -> GatewayError {
    invalid(
        "payment_intent_unexpected_state",
        format!(
            "You cannot {action} this PaymentIntent because it has a status of {}.",
            intent.status.as_str()
        ),
    )
}

fn invalid(code: &str, message: String) -> GatewayError {
    GatewayError::InvalidRequest {
        code: code.to_owned(),
        message,
    }
}

fn random_part() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
}

/// Multicapture is offered for online Visa, Mastercard, Amex and Discover cards
/// (<https://docs.stripe.com/payments/multicapture>); other brands (`pm_card_jcb` here) are
/// captured once.
pub fn offers_multicapture(payment_method: &str) -> bool {
    matches!(
        payment_method,
        "pm_card_visa" | "pm_card_mastercard" | "pm_card_amex" | "pm_card_discover"
    )
}

/// What a failed test-mode refund gives as its reason: the card cannot take the money back.
pub fn failure_reason_of(status: Option<&str>) -> Option<String> {
    (status == Some("failed")).then(|| "expired_or_canceled_card".to_owned())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_part())
}

async fn deliver_events(
    mut events: mpsc::UnboundedReceiver<SimulatedEvent>,
    http: reqwest::Client,
    url: String,
    secret: SecretString,
) {
    while let Some(event) = events.recv().await {
        deliver(&http, &url, &secret, &event).await;
    }
}

#[tracing::instrument(skip_all, fields(event_id = %event.id, event_type = %event.event_type))]
async fn deliver(http: &reqwest::Client, url: &str, secret: &SecretString, event: &SimulatedEvent) {
    let mut backoff = WEBHOOK_FIRST_BACKOFF;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        // Signed afresh on every try, as Stripe does, so a late retry is not rejected as old.
        let header = signature::sign(
            event.payload.as_bytes(),
            secret.expose_secret(),
            chrono::Utc::now().timestamp(),
        );
        let sent = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Stripe-Signature", header)
            .body(event.payload.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                tracing::warn!(
                    attempt,
                    status = response.status().as_u16(),
                    "webhook refused"
                )
            }
            Err(e) => tracing::warn!(attempt, error = %e, "webhook delivery failed"),
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::error!("webhook given up after {WEBHOOK_ATTEMPTS} attempts");
}

#[async_trait]
impl PaymentGateway for StripeSimulator {
    fn name(&self) -> &'static str {
        "simulator"
    }

    #[tracing::instrument(skip_all, fields(
        gateway = "simulator",
        checkout_id = %req.checkout_id,
        idempotency_key = %req.idempotency_key,
    ))]
    async fn create_and_confirm(&self, req: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        let fingerprint = format!(
            "charge|{}|{}|{:?}|{}",
            req.amount,
            req.payment_method,
            req.metadata(),
            req.capture_method.as_str()
        );
        match self
            .state()
            .idempotent(&req.idempotency_key, fingerprint, |s| s.charge(req))?
        {
            Answer::Charge(outcome) => Ok(outcome),
            Answer::Intent(_) | Answer::Refund(_) => Err(reused_elsewhere(&req.idempotency_key)),
        }
    }

    async fn retrieve(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError> {
        self.state().intent(payment_intent_id)
    }

    #[tracing::instrument(skip_all, fields(gateway = "simulator", payment_intent_id = %payment_intent_id))]
    async fn cancel(
        &self,
        payment_intent_id: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, GatewayError> {
        let fingerprint = format!("cancel|{payment_intent_id}");
        match self.state().idempotent(idempotency_key, fingerprint, |s| {
            s.cancel(payment_intent_id)
        })? {
            Answer::Intent(intent) => Ok(intent),
            Answer::Charge(_) | Answer::Refund(_) => Err(reused_elsewhere(idempotency_key)),
        }
    }

    #[tracing::instrument(skip_all, fields(gateway = "simulator", payment_intent_id = %req.payment_intent_id))]
    async fn refund(&self, req: &RefundRequest) -> Result<Refund, GatewayError> {
        let fingerprint = format!("refund|{}|{:?}", req.payment_intent_id, req.amount);
        match self
            .state()
            .idempotent(&req.idempotency_key, fingerprint, |s| s.refund(req))?
        {
            Answer::Refund(refund) => Ok(refund),
            Answer::Charge(_) | Answer::Intent(_) => Err(reused_elsewhere(&req.idempotency_key)),
        }
    }

    #[tracing::instrument(skip_all, fields(gateway = "simulator", payment_intent_id = %req.payment_intent_id))]
    async fn capture(&self, req: &CaptureRequest) -> Result<PaymentIntent, GatewayError> {
        let fingerprint = format!(
            "capture|{}|{}|{}",
            req.payment_intent_id, req.amount_to_capture, req.final_capture
        );
        match self
            .state()
            .idempotent(&req.idempotency_key, fingerprint, |s| s.capture(req))?
        {
            Answer::Intent(intent) => Ok(intent),
            Answer::Charge(_) | Answer::Refund(_) => Err(reused_elsewhere(&req.idempotency_key)),
        }
    }

    async fn retrieve_refund(&self, refund_id: &str) -> Result<Refund, GatewayError> {
        self.state()
            .refunds
            .iter()
            .find(|r| r.id == refund_id)
            .cloned()
            .ok_or_else(|| invalid("resource_missing", format!("No such refund: '{refund_id}'")))
    }

    async fn intents_for_checkout(
        &self,
        checkout_id: CheckoutId,
    ) -> Result<Vec<PaymentIntent>, GatewayError> {
        Ok(self
            .state()
            .intents
            .iter()
            .filter(|i| i.checkout_id() == Some(checkout_id))
            .cloned()
            .collect())
    }
}

/// Fingerprints name the operation, so this is unreachable in practice; kept as an error
/// rather than a panic because the key comes from the caller.
fn reused_elsewhere(key: &str) -> GatewayError {
    GatewayError::IdempotencyKeyReused(format!(
        "Keys for idempotent requests can only be used for the same endpoint: '{key}'"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, CustomerId, Money, OrderId};

    fn charge(payment_method: &str, amount: i64) -> ChargeRequest {
        let checkout_id = CheckoutId::new();
        ChargeRequest {
            amount: Money::new(amount, Currency::parse("EUR").unwrap()).unwrap(),
            payment_method: payment_method.into(),
            checkout_id,
            order_id: OrderId::new(),
            customer_id: CustomerId::new(),
            idempotency_key: format!("checkout-{checkout_id}-charge-1"),
            capture_method: CaptureMethod::Automatic,
        }
    }

    async fn succeeded_charge(sim: &StripeSimulator, amount: i64) -> PaymentIntent {
        match sim
            .create_and_confirm(&charge("pm_card_visa", amount))
            .await
            .unwrap()
        {
            ChargeOutcome::Succeeded(intent) => intent,
            other => panic!("expected success, got {other:?}"),
        }
    }

    fn refund(intent: &PaymentIntent, amount: Option<i64>, key: &str) -> RefundRequest {
        RefundRequest {
            payment_intent_id: intent.id.clone(),
            amount,
            idempotency_key: key.into(),
        }
    }

    #[tokio::test]
    async fn visa_and_mastercard_succeed_with_the_checkout_in_the_metadata() {
        let sim = StripeSimulator::new();
        for pm in ["pm_card_visa", "pm_card_mastercard"] {
            let req = charge(pm, 1999);
            let ChargeOutcome::Succeeded(intent) = sim.create_and_confirm(&req).await.unwrap()
            else {
                panic!("{pm} should succeed");
            };
            assert!(intent.id.starts_with("pi_"));
            assert_eq!(intent.status, IntentStatus::Succeeded);
            assert_eq!(intent.amount, 1999);
            assert_eq!(intent.currency, "eur");
            assert_eq!(intent.checkout_id(), Some(req.checkout_id));
            assert_eq!(intent.order_id(), Some(req.order_id));
            assert_eq!(intent.metadata["customer_id"], req.customer_id.to_string());
        }
    }

    #[tokio::test]
    async fn declining_cards_are_declined_with_their_decline_code() {
        let sim = StripeSimulator::new();
        for (pm, decline_code) in [
            ("pm_card_chargeDeclined", "generic_decline"),
            (
                "pm_card_chargeDeclinedInsufficientFunds",
                "insufficient_funds",
            ),
        ] {
            let outcome = sim.create_and_confirm(&charge(pm, 500)).await.unwrap();
            let ChargeOutcome::Declined {
                payment_intent_id: Some(id),
                decline,
            } = outcome
            else {
                panic!("{pm} should be declined with an intent, got {outcome:?}");
            };
            assert_eq!(decline.code, "card_declined");
            assert_eq!(decline.decline_code.as_deref(), Some(decline_code));
            let intent = sim.retrieve(&id).await.unwrap();
            assert_eq!(intent.status, IntentStatus::RequiresPaymentMethod);
            assert_eq!(intent.last_payment_error, Some(decline));
        }
    }

    #[tokio::test]
    async fn a_card_needing_authentication_requires_action_with_a_client_secret() {
        let sim = StripeSimulator::new();
        let outcome = sim
            .create_and_confirm(&charge("pm_card_authenticationRequired", 700))
            .await
            .unwrap();
        let ChargeOutcome::RequiresAction(intent) = outcome else {
            panic!("expected requires_action, got {outcome:?}");
        };
        assert_eq!(intent.status, IntentStatus::RequiresAction);
        let secret = intent.client_secret.unwrap();
        assert!(
            secret.starts_with(&format!("{}_secret_", intent.id)),
            "{secret}"
        );
    }

    #[tokio::test]
    async fn an_unknown_payment_method_is_resource_missing_and_creates_nothing() {
        let sim = StripeSimulator::new();
        let result = sim.create_and_confirm(&charge("pm_card_bogus", 100)).await;
        assert!(matches!(
            result,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "resource_missing"
        ));
        assert_eq!(sim.ledger(), Ledger::default());
    }

    #[tokio::test]
    async fn the_same_key_and_parameters_replay_the_first_answer() {
        let sim = StripeSimulator::new();
        let req = charge("pm_card_visa", 1200);
        let first = sim.create_and_confirm(&req).await.unwrap();
        let second = sim.create_and_confirm(&req).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(sim.ledger().intents.len(), 1);
        assert_eq!(sim.ledger().succeeded_for(req.checkout_id), 1);
    }

    #[tokio::test]
    async fn a_replayed_decline_is_still_the_same_decline() {
        let sim = StripeSimulator::new();
        let req = charge("pm_card_chargeDeclined", 1200);
        let first = sim.create_and_confirm(&req).await.unwrap();
        assert_eq!(sim.create_and_confirm(&req).await.unwrap(), first);
        assert_eq!(sim.ledger().intents.len(), 1);
    }

    #[tokio::test]
    async fn the_same_key_with_other_parameters_is_refused() {
        let sim = StripeSimulator::new();
        let req = charge("pm_card_visa", 1200);
        sim.create_and_confirm(&req).await.unwrap();
        let mut changed = req.clone();
        changed.amount = Money::new(1300, req.amount.currency()).unwrap();
        let result = sim.create_and_confirm(&changed).await;
        assert!(matches!(result, Err(GatewayError::IdempotencyKeyReused(_))));
        let mut other_card = req.clone();
        other_card.payment_method = "pm_card_mastercard".into();
        assert!(matches!(
            sim.create_and_confirm(&other_card).await,
            Err(GatewayError::IdempotencyKeyReused(_))
        ));
        assert_eq!(sim.ledger().intents.len(), 1);
    }

    #[tokio::test]
    async fn keys_are_scoped_to_one_simulator() {
        let req = charge("pm_card_visa", 1200);
        let a = StripeSimulator::new();
        let b = StripeSimulator::new();
        let first = a.create_and_confirm(&req).await.unwrap();
        let second = b.create_and_confirm(&req).await.unwrap();
        assert_ne!(first.payment_intent_id(), second.payment_intent_id());
    }

    #[tokio::test]
    async fn refunds_answer_pending_failed_or_null_as_stripe_may() {
        let sim = StripeSimulator::new();
        for (status, key) in [
            (Some("pending"), "r-1"),
            (Some("failed"), "r-2"),
            (None, "r-3"),
        ] {
            sim.answer_refunds_with(status);
            let intent = succeeded_charge(&sim, 900).await;
            let events_before = sim.events().len();
            let refund = sim.refund(&refund(&intent, None, key)).await.unwrap();
            assert_eq!(refund.status.as_deref(), status);
            assert_eq!(
                sim.events().len(),
                events_before,
                "no charge.refunded for an unsettled refund"
            );
            let retrieved = sim.retrieve_refund(&refund.id).await.unwrap();
            assert_eq!(retrieved, refund);
        }
        // A failed refund gave nothing back: the whole amount may be refunded again.
        sim.answer_refunds_with(Some("failed"));
        let intent = succeeded_charge(&sim, 700).await;
        sim.refund(&refund(&intent, None, "f-1")).await.unwrap();
        sim.answer_refunds_with(Some("succeeded"));
        let again = sim.refund(&refund(&intent, None, "f-2")).await.unwrap();
        assert_eq!(
            (again.amount, again.status.as_deref()),
            (700, Some("succeeded"))
        );
    }

    #[tokio::test]
    async fn a_key_used_for_a_charge_cannot_be_used_for_a_refund() {
        let sim = StripeSimulator::new();
        let intent = succeeded_charge(&sim, 900).await;
        let req = refund(&intent, None, "shared-key");
        let charge_with_key = ChargeRequest {
            idempotency_key: "shared-key".into(),
            ..charge("pm_card_visa", 1000)
        };
        sim.create_and_confirm(&charge_with_key).await.unwrap();
        assert!(matches!(
            sim.refund(&req).await,
            Err(GatewayError::IdempotencyKeyReused(_))
        ));
        assert_eq!(sim.ledger().refunded(&intent.id), 0);
    }

    #[tokio::test]
    async fn the_ledger_lists_every_intent_of_a_checkout_in_order() {
        let sim = StripeSimulator::new();
        let declined = charge("pm_card_chargeDeclined", 800);
        let retried = ChargeRequest {
            payment_method: "pm_card_visa".into(),
            idempotency_key: format!("checkout-{}-charge-2", declined.checkout_id),
            ..declined.clone()
        };
        sim.create_and_confirm(&declined).await.unwrap();
        sim.create_and_confirm(&retried).await.unwrap();
        sim.create_and_confirm(&charge("pm_card_visa", 500))
            .await
            .unwrap();

        let intents = sim
            .intents_for_checkout(declined.checkout_id)
            .await
            .unwrap();
        let statuses: Vec<_> = intents.iter().map(|i| i.status).collect();
        assert_eq!(
            statuses,
            [IntentStatus::RequiresPaymentMethod, IntentStatus::Succeeded]
        );
        let ledger = sim.ledger();
        assert_eq!(ledger.intents.len(), 3);
        assert_eq!(ledger.succeeded_for(declined.checkout_id), 1);
    }

    #[tokio::test]
    async fn refunds_never_exceed_the_charged_amount() {
        let sim = StripeSimulator::new();
        let intent = succeeded_charge(&sim, 1000).await;

        let part = sim.refund(&refund(&intent, Some(600), "r1")).await.unwrap();
        assert_eq!(part.amount, 600);
        assert!(matches!(
            sim.refund(&refund(&intent, Some(401), "r2")).await,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "amount_too_large"
        ));
        let rest = sim.refund(&refund(&intent, None, "r3")).await.unwrap();
        assert_eq!(rest.amount, 400);
        assert!(matches!(
            sim.refund(&refund(&intent, None, "r4")).await,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "charge_already_refunded"
        ));
        assert_eq!(sim.ledger().refunded(&intent.id), 1000);
    }

    #[tokio::test]
    async fn a_refund_retried_with_its_key_refunds_once() {
        let sim = StripeSimulator::new();
        let intent = succeeded_charge(&sim, 1000).await;
        let req = refund(&intent, None, "refund-once");
        let first = sim.refund(&req).await.unwrap();
        let again = sim.refund(&req).await.unwrap();
        assert_eq!(first, again);
        assert_eq!(sim.ledger().refunds.len(), 1);
        assert_eq!(sim.ledger().refunded(&intent.id), 1000);
    }

    #[tokio::test]
    async fn only_a_succeeded_intent_can_be_refunded() {
        let sim = StripeSimulator::new();
        let ChargeOutcome::Declined {
            payment_intent_id: Some(id),
            ..
        } = sim
            .create_and_confirm(&charge("pm_card_chargeDeclined", 100))
            .await
            .unwrap()
        else {
            panic!("expected a decline");
        };
        let req = RefundRequest {
            payment_intent_id: id,
            amount: None,
            idempotency_key: "r".into(),
        };
        assert!(matches!(
            sim.refund(&req).await,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "payment_intent_unexpected_state"
        ));
        assert!(sim.ledger().refunds.is_empty());
    }

    #[tokio::test]
    async fn authentication_completes_a_pending_intent() {
        let sim = StripeSimulator::new();
        let req = charge("pm_card_authenticationRequired", 300);
        let pending = sim.create_and_confirm(&req).await.unwrap();
        let id = pending.payment_intent_id().unwrap().to_owned();

        let done = sim.authenticate(&id, true).unwrap();
        assert_eq!(done.status, IntentStatus::Succeeded);
        assert_eq!(
            sim.retrieve(&id).await.unwrap().status,
            IntentStatus::Succeeded
        );
        assert_eq!(sim.ledger().succeeded_for(req.checkout_id), 1);
        assert!(matches!(
            sim.authenticate(&id, true),
            Err(GatewayError::InvalidRequest { code, .. }) if code == "payment_intent_unexpected_state"
        ));
    }

    #[tokio::test]
    async fn failed_authentication_leaves_the_intent_needing_a_payment_method() {
        let sim = StripeSimulator::new();
        let pending = sim
            .create_and_confirm(&charge("pm_card_authenticationRequired", 300))
            .await
            .unwrap();
        let id = pending.payment_intent_id().unwrap().to_owned();
        let failed = sim.authenticate(&id, false).unwrap();
        assert_eq!(failed.status, IntentStatus::RequiresPaymentMethod);
        assert_eq!(
            failed.last_payment_error.map(|d| d.code).as_deref(),
            Some("payment_intent_authentication_failure")
        );
    }

    fn capture(
        intent: &PaymentIntent,
        amount: i64,
        final_capture: bool,
        key: &str,
    ) -> CaptureRequest {
        CaptureRequest {
            payment_intent_id: intent.id.clone(),
            amount_to_capture: amount,
            final_capture,
            idempotency_key: key.into(),
        }
    }

    #[tokio::test]
    async fn captures_take_at_most_what_is_capturable_and_the_final_one_releases_the_rest() {
        let sim = StripeSimulator::new();
        let manual = ChargeRequest {
            capture_method: CaptureMethod::Manual,
            ..charge("pm_card_visa", 3000)
        };
        let ChargeOutcome::Authorized(held) = sim.create_and_confirm(&manual).await.unwrap() else {
            panic!("an authorization")
        };
        assert_eq!((held.amount_capturable, held.amount_received), (3000, 0));
        // Nothing captured yet: nothing to refund.
        assert!(sim.refund(&refund(&held, Some(100), "r0")).await.is_err());

        let too_much = sim.capture(&capture(&held, 3001, false, "c0")).await;
        assert!(
            matches!(too_much, Err(GatewayError::InvalidRequest { ref code, .. }) if code == "amount_too_large")
        );
        let part = sim
            .capture(&capture(&held, 1000, false, "c1"))
            .await
            .unwrap();
        assert_eq!(part.status, IntentStatus::RequiresCapture);
        assert_eq!((part.amount_capturable, part.amount_received), (2000, 1000));
        // The same key replays the same capture.
        let again = sim
            .capture(&capture(&held, 1000, false, "c1"))
            .await
            .unwrap();
        assert_eq!(again.amount_received, 1000);
        let last = sim.capture(&capture(&held, 500, true, "c2")).await.unwrap();
        assert_eq!(last.status, IntentStatus::Succeeded);
        assert_eq!((last.amount_capturable, last.amount_received), (0, 1500));
        assert!(sim.capture(&capture(&held, 1, true, "c3")).await.is_err());
        // Refunds never pass what was captured.
        assert!(sim.refund(&refund(&held, Some(1501), "r1")).await.is_err());
        sim.refund(&refund(&held, Some(1500), "r2")).await.unwrap();
    }

    #[tokio::test]
    async fn a_pending_intent_can_be_canceled_but_a_succeeded_one_cannot() {
        let sim = StripeSimulator::new();
        let pending = sim
            .create_and_confirm(&charge("pm_card_authenticationRequired", 300))
            .await
            .unwrap();
        let id = pending.payment_intent_id().unwrap().to_owned();
        let canceled = sim.cancel(&id, "cancel-1").await.unwrap();
        assert_eq!(canceled.status, IntentStatus::Canceled);
        assert_eq!(sim.cancel(&id, "cancel-1").await.unwrap(), canceled);
        assert!(sim.authenticate(&id, true).is_err());

        let paid = succeeded_charge(&sim, 100).await;
        assert!(matches!(
            sim.cancel(&paid.id, "cancel-2").await,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "payment_intent_unexpected_state"
        ));
        assert!(matches!(
            sim.retrieve("pi_missing").await,
            Err(GatewayError::InvalidRequest { code, .. }) if code == "resource_missing"
        ));
    }

    #[tokio::test]
    async fn without_a_webhook_target_events_are_only_recorded() {
        let sim = StripeSimulator::new();
        let intent = succeeded_charge(&sim, 100).await;
        sim.refund(&refund(&intent, None, "r")).await.unwrap();
        let types: Vec<_> = sim.events().into_iter().map(|e| e.event_type).collect();
        assert_eq!(types, ["payment_intent.succeeded", "charge.refunded"]);
        let parsed =
            crate::payments::WebhookEvent::parse(sim.events()[1].payload.as_bytes()).unwrap();
        assert_eq!(parsed.payment_intent_id(), Some(intent.id.as_str()));
    }
}
