//! The payment gateways against independent counterparts: the Stripe client against the fake
//! Stripe server (every outcome and every fault), the simulator's webhooks against a small
//! receiver that verifies signatures as `POST /webhooks/stripe` will. Promise 3: whatever
//! fails, a retry with the same key never charges twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use holdfast::domain::{CheckoutId, Currency, CustomerId, Money, OrderId};
use holdfast::payments::signature::{self, SignatureError, DEFAULT_TOLERANCE};
use holdfast::payments::{
    ChargeOutcome, ChargeRequest, EventObject, GatewayError, IntentStatus, PaymentGateway,
    PaymentIntent, RefundRequest, StripeGateway, StripeSimulator, Timeouts, WebhookEvent,
};
use secrecy::SecretString;
use tokio::sync::mpsc;

use crate::fake_stripe::{FakeStripe, Fault, SECRET_KEY};

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    request: Duration::from_secs(5),
};

fn gateway(fake: &FakeStripe) -> StripeGateway {
    gateway_with(fake, SECRET_KEY, TIMEOUTS)
}

fn gateway_with(fake: &FakeStripe, key: &str, timeouts: Timeouts) -> StripeGateway {
    StripeGateway::new(SecretString::from(key), &fake.base_url(), timeouts)
        .expect("the fake's URL is a valid base")
}

fn charge(payment_method: &str, amount: i64) -> ChargeRequest {
    let checkout_id = CheckoutId::new();
    ChargeRequest {
        amount: Money::new(amount, Currency::parse("EUR").unwrap()).unwrap(),
        payment_method: payment_method.into(),
        checkout_id,
        order_id: OrderId::new(),
        customer_id: CustomerId::new(),
        idempotency_key: format!("checkout-{checkout_id}-charge-1"),
        capture_method: Default::default(),
    }
}

fn succeeded(outcome: Result<ChargeOutcome, GatewayError>) -> PaymentIntent {
    match outcome {
        Ok(ChargeOutcome::Succeeded(intent)) => intent,
        other => panic!("expected a succeeded charge, got {other:?}"),
    }
}

/// What the saga does after `Unknown` or a 409: send the same request again, with the same
/// key, until the answer is definitive (or a deadline passes).
async fn retry_until_definitive(
    gateway: &StripeGateway,
    req: &ChargeRequest,
) -> Result<ChargeOutcome, GatewayError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match gateway.create_and_confirm(req).await {
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            answer => return answer,
        }
    }
}

#[tokio::test]
async fn a_visa_charge_succeeds_with_the_checkout_in_its_metadata() {
    let fake = FakeStripe::start().await;
    let req = charge("pm_card_visa", 1999);

    let intent = succeeded(gateway(&fake).create_and_confirm(&req).await);

    assert!(intent.id.starts_with("pi_"));
    assert_eq!(intent.status, IntentStatus::Succeeded);
    assert_eq!((intent.amount, intent.currency.as_str()), (1999, "eur"));
    assert_eq!(intent.checkout_id(), Some(req.checkout_id));
    assert_eq!(intent.order_id(), Some(req.order_id));
    assert_eq!(intent.metadata["customer_id"], req.customer_id.to_string());
    assert_eq!(fake.charges_for(req.checkout_id), 1);
}

#[tokio::test]
async fn every_post_carries_its_idempotency_key_and_the_pinned_version() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let req = charge("pm_card_authenticationRequired", 500);
    let pending = gateway.create_and_confirm(&req).await.unwrap();
    let id = pending.payment_intent_id().unwrap().to_owned();
    gateway.retrieve(&id).await.unwrap();
    gateway.cancel(&id, "cancel-key").await.unwrap();

    let log = fake.request_log();
    assert_eq!(log.len(), 3);
    for record in &log {
        assert_eq!(
            record.stripe_version.as_deref(),
            Some("2024-06-20"),
            "{record:?}"
        );
    }
    let posts: Vec<_> = log.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(
        posts[0].idempotency_key.as_deref(),
        Some(req.idempotency_key.as_str())
    );
    assert_eq!(
        posts[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(posts[1].idempotency_key.as_deref(), Some("cancel-key"));
}

#[tokio::test]
async fn declined_cards_are_declined_with_their_decline_code_and_intent() {
    let fake = FakeStripe::start().await;
    for (pm, decline_code) in [
        ("pm_card_chargeDeclined", "generic_decline"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
    ] {
        let req = charge(pm, 2500);

        let outcome = gateway(&fake).create_and_confirm(&req).await;

        let Ok(ChargeOutcome::Declined {
            payment_intent_id: Some(id),
            decline,
        }) = outcome
        else {
            panic!("{pm} should be declined with an intent, got {outcome:?}");
        };
        assert_eq!(decline.code, "card_declined");
        assert_eq!(decline.decline_code.as_deref(), Some(decline_code));
        assert!(!decline.message.is_empty());
        let intent = gateway(&fake).retrieve(&id).await.unwrap();
        assert_eq!(intent.status, IntentStatus::RequiresPaymentMethod);
        assert_eq!(fake.charges_for(req.checkout_id), 0);
    }
}

#[tokio::test]
async fn a_card_needing_authentication_requires_action_with_a_client_secret() {
    let fake = FakeStripe::start().await;
    let req = charge("pm_card_authenticationRequired", 4200);

    let outcome = gateway(&fake).create_and_confirm(&req).await;

    let Ok(ChargeOutcome::RequiresAction(intent)) = outcome else {
        panic!("expected requires_action, got {outcome:?}");
    };
    let secret = intent.client_secret.expect("a client secret");
    assert!(
        secret.starts_with(&format!("{}_secret_", intent.id)),
        "{secret}"
    );
    assert_eq!(fake.charges_for(req.checkout_id), 0);
}

#[tokio::test]
async fn an_unknown_payment_method_is_an_invalid_request() {
    let fake = FakeStripe::start().await;

    let outcome = gateway(&fake)
        .create_and_confirm(&charge("pm_card_doesNotExist", 100))
        .await;

    assert!(
        matches!(&outcome, Err(GatewayError::InvalidRequest { code, .. }) if code == "resource_missing"),
        "{outcome:?}"
    );
    assert_eq!(fake.intent_count(), 0);
}

#[tokio::test]
async fn a_server_error_or_rate_limit_is_unknown_and_the_retry_charges_once() {
    for fault in [Fault::InternalError, Fault::TooManyRequests] {
        let fake = FakeStripe::start().await;
        let gateway = gateway(&fake);
        let req = charge("pm_card_visa", 1000);
        fake.fail_next(1, fault);

        let first = gateway.create_and_confirm(&req).await;
        assert!(
            matches!(first, Err(GatewayError::Unknown(_))),
            "{fault:?}: {first:?}"
        );

        succeeded(gateway.create_and_confirm(&req).await);
        assert_eq!(fake.charges_for(req.checkout_id), 1, "{fault:?}");
        assert_eq!(fake.requests(), 2, "{fault:?}");
    }
}

#[tokio::test]
async fn a_connection_dropped_after_the_charge_is_unknown_and_the_retry_replays_the_same_intent() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let req = charge("pm_card_visa", 3000);
    fake.fail_next(1, Fault::DropAfterCharge);

    let first = gateway.create_and_confirm(&req).await;
    assert!(matches!(first, Err(GatewayError::Unknown(_))), "{first:?}");
    assert_eq!(fake.charges_for(req.checkout_id), 1, "the money moved");

    let retried = succeeded(gateway.create_and_confirm(&req).await);
    let log = fake.request_log();
    assert!(log.last().unwrap().replayed, "the retry is a replay");
    let by_search = gateway.intents_for_checkout(req.checkout_id).await.unwrap();
    assert_eq!(by_search.len(), 1);
    assert_eq!(retried.id, by_search[0].id);
    assert_eq!(fake.charges_for(req.checkout_id), 1);
}

#[tokio::test]
async fn a_slow_answer_times_out_as_unknown_and_the_retry_settles_on_one_charge() {
    let fake = FakeStripe::start().await;
    let impatient = gateway_with(
        &fake,
        SECRET_KEY,
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_millis(200),
        },
    );
    let req = charge("pm_card_visa", 3000);
    fake.latency(Duration::from_millis(1500));

    let first = impatient.create_and_confirm(&req).await;
    assert!(matches!(first, Err(GatewayError::Unknown(_))), "{first:?}");

    fake.latency(Duration::ZERO);
    let settled = retry_until_definitive(&impatient, &req).await;
    let intent = succeeded(settled);
    assert_eq!(intent.checkout_id(), Some(req.checkout_id));
    assert_eq!(fake.charges_for(req.checkout_id), 1);
    assert_eq!(fake.intent_count(), 1);
}

#[tokio::test]
async fn an_unreadable_answer_is_unknown_and_the_retry_replays_the_charge() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let req = charge("pm_card_mastercard", 800);
    fake.fail_next(1, Fault::MalformedBody);

    let first = gateway.create_and_confirm(&req).await;
    assert!(matches!(first, Err(GatewayError::Unknown(_))), "{first:?}");

    succeeded(gateway.create_and_confirm(&req).await);
    assert_eq!(fake.charges_for(req.checkout_id), 1);
}

#[tokio::test]
async fn a_concurrent_duplicate_is_an_idempotency_conflict() {
    let fake = FakeStripe::start().await;
    let gateway = Arc::new(gateway(&fake));
    let req = charge("pm_card_visa", 6100);
    fake.hold();
    let first = tokio::spawn({
        let (gateway, req) = (gateway.clone(), req.clone());
        async move { gateway.create_and_confirm(&req).await }
    });
    fake.wait_until_held(1).await;

    let duplicate = gateway.create_and_confirm(&req).await;
    fake.release();

    assert_eq!(duplicate, Err(GatewayError::IdempotencyConflict));
    succeeded(first.await.unwrap());
    assert_eq!(fake.charges_for(req.checkout_id), 1);
}

#[tokio::test]
async fn the_same_key_with_a_different_amount_is_refused_and_not_retried() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let req = charge("pm_card_visa", 1000);
    succeeded(gateway.create_and_confirm(&req).await);
    let changed = ChargeRequest {
        amount: Money::new(1001, req.amount.currency()).unwrap(),
        ..req.clone()
    };
    let before = fake.requests();

    let outcome = gateway.create_and_confirm(&changed).await;

    let Err(GatewayError::IdempotencyKeyReused(message)) = &outcome else {
        panic!("expected IdempotencyKeyReused, got {outcome:?}");
    };
    assert!(message.contains("same parameters"), "{message}");
    assert!(!outcome.unwrap_err().is_retryable());
    assert_eq!(fake.requests(), before + 1, "sent once, not retried");
    assert_eq!(fake.charges_for(req.checkout_id), 1);
}

#[tokio::test]
async fn a_pending_intent_can_be_retrieved_and_canceled_once() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let req = charge("pm_card_authenticationRequired", 1500);
    let pending = gateway.create_and_confirm(&req).await.unwrap();
    let id = pending.payment_intent_id().unwrap().to_owned();

    let fetched = gateway.retrieve(&id).await.unwrap();
    assert_eq!(fetched.status, IntentStatus::RequiresAction);
    assert_eq!(fetched.checkout_id(), Some(req.checkout_id));

    let canceled = gateway.cancel(&id, "cancel-1").await.unwrap();
    assert_eq!(canceled.status, IntentStatus::Canceled);
    assert_eq!(gateway.cancel(&id, "cancel-1").await.unwrap(), canceled);
    assert!(fake.request_log().last().unwrap().replayed);
    assert_eq!(
        gateway.retrieve(&id).await.unwrap().status,
        IntentStatus::Canceled
    );
}

#[tokio::test]
async fn a_succeeded_intent_cannot_be_canceled_and_a_missing_one_cannot_be_found() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let paid = succeeded(
        gateway
            .create_and_confirm(&charge("pm_card_visa", 1000))
            .await,
    );

    let cancel = gateway.cancel(&paid.id, "cancel-paid").await;
    assert!(
        matches!(&cancel, Err(GatewayError::InvalidRequest { code, .. }) if code == "payment_intent_unexpected_state"),
        "{cancel:?}"
    );
    let missing = gateway.retrieve("pi_doesnotexist").await;
    assert!(
        matches!(&missing, Err(GatewayError::InvalidRequest { code, .. }) if code == "resource_missing"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_refund_retried_with_its_key_refunds_once() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let intent = succeeded(
        gateway
            .create_and_confirm(&charge("pm_card_visa", 2000))
            .await,
    );
    let req = RefundRequest {
        payment_intent_id: intent.id.clone(),
        amount: Some(1500),
        idempotency_key: format!("refund-{}", intent.id),
    };
    fake.fail_next(1, Fault::DropAfterCharge);

    let first = gateway.refund(&req).await;
    assert!(matches!(first, Err(GatewayError::Unknown(_))), "{first:?}");
    let refund = gateway.refund(&req).await.unwrap();

    assert_eq!(
        refund.payment_intent_id.as_deref(),
        Some(intent.id.as_str())
    );
    assert_eq!(refund.amount, 1500);
    assert_eq!(refund.status.as_deref(), Some("succeeded"));
    assert_eq!(fake.refund_count(), 1);
    assert_eq!(fake.refunded(&intent.id), 1500);
}

#[tokio::test]
async fn a_refund_beyond_the_charged_amount_is_refused() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let intent = succeeded(
        gateway
            .create_and_confirm(&charge("pm_card_visa", 2000))
            .await,
    );
    let refund = |amount, key: &str| RefundRequest {
        payment_intent_id: intent.id.clone(),
        amount,
        idempotency_key: key.into(),
    };

    let too_much = gateway.refund(&refund(Some(2001), "r1")).await;
    assert!(
        matches!(&too_much, Err(GatewayError::InvalidRequest { code, .. }) if code == "amount_too_large"),
        "{too_much:?}"
    );
    let all = gateway.refund(&refund(None, "r2")).await.unwrap();
    assert_eq!(all.amount, 2000);
    let again = gateway.refund(&refund(None, "r3")).await;
    assert!(
        matches!(&again, Err(GatewayError::InvalidRequest { code, .. }) if code == "charge_already_refunded"),
        "{again:?}"
    );
    assert_eq!(fake.refunded(&intent.id), 2000);
}

#[tokio::test]
async fn intents_for_a_checkout_are_every_attempt_of_that_checkout() {
    let fake = FakeStripe::start().await;
    let gateway = gateway(&fake);
    let declined = charge("pm_card_chargeDeclined", 900);
    let second_attempt = ChargeRequest {
        payment_method: "pm_card_visa".into(),
        idempotency_key: format!("checkout-{}-charge-2", declined.checkout_id),
        ..declined.clone()
    };
    gateway.create_and_confirm(&declined).await.unwrap();
    succeeded(gateway.create_and_confirm(&second_attempt).await);
    succeeded(
        gateway
            .create_and_confirm(&charge("pm_card_visa", 500))
            .await,
    );

    let intents = gateway
        .intents_for_checkout(declined.checkout_id)
        .await
        .unwrap();

    let statuses: Vec<_> = intents.iter().map(|i| i.status).collect();
    assert_eq!(
        statuses,
        [IntentStatus::RequiresPaymentMethod, IntentStatus::Succeeded]
    );
    assert!(intents
        .iter()
        .all(|i| i.checkout_id() == Some(declined.checkout_id)));
    assert!(gateway
        .intents_for_checkout(CheckoutId::new())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_wrong_secret_key_is_an_authentication_error() {
    let fake = FakeStripe::start().await;
    let gateway = gateway_with(&fake, "sk_test_wrong", TIMEOUTS);
    let req = charge("pm_card_visa", 100);

    let outcome = gateway.create_and_confirm(&req).await;

    assert!(
        matches!(&outcome, Err(GatewayError::Authentication(_))),
        "{outcome:?}"
    );
    assert_eq!(fake.intent_count(), 0);
}

#[tokio::test]
async fn an_unreachable_stripe_is_unknown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let gateway = StripeGateway::new(
        SecretString::from(SECRET_KEY),
        &format!("http://{addr}"),
        TIMEOUTS,
    )
    .unwrap();

    let outcome = gateway
        .create_and_confirm(&charge("pm_card_visa", 100))
        .await;

    assert!(
        matches!(outcome, Err(GatewayError::Unknown(_))),
        "{outcome:?}"
    );
}

// ---- the simulator's webhooks ----

const WEBHOOK_SECRET: &str = "whsec_simulator_test_secret";

/// What `POST /webhooks/stripe` will do first: verify the signature, then parse.
struct Receiver {
    url: String,
    events: mpsc::UnboundedReceiver<Result<WebhookEvent, SignatureError>>,
    attempts: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct ReceiverState {
    secret: &'static str,
    refuse_first: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
    seen: mpsc::UnboundedSender<Result<WebhookEvent, SignatureError>>,
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state.attempts.fetch_add(1, Ordering::SeqCst);
    let refuse = state
        .refuse_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refuse {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    let verified = signature::verify(header, &body, &[state.secret], now, DEFAULT_TOLERANCE)
        .map(|()| WebhookEvent::parse(&body).expect("a signed body is an event"));
    let status = if verified.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let _ = state.seen.send(verified);
    status
}

async fn start_receiver(secret: &'static str, refuse_first: usize) -> Receiver {
    let (seen, events) = mpsc::unbounded_channel();
    let attempts = Arc::new(AtomicUsize::new(0));
    let state = ReceiverState {
        secret,
        refuse_first: Arc::new(AtomicUsize::new(refuse_first)),
        attempts: attempts.clone(),
        seen,
    };
    let app = Router::new()
        .route("/webhooks/stripe", post(receive))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhooks/stripe", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Receiver {
        url,
        events,
        attempts,
        server,
    }
}

impl Receiver {
    async fn next(&mut self) -> Result<WebhookEvent, SignatureError> {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event arrives within the deadline")
            .expect("the receiver is running")
    }
}

#[tokio::test]
async fn the_simulator_delivers_signed_events_in_the_order_things_happened() {
    let mut receiver = start_receiver(WEBHOOK_SECRET, 0).await;
    let sim = StripeSimulator::new();
    sim.set_webhook_target(receiver.url.clone(), SecretString::from(WEBHOOK_SECRET));
    let paid = charge("pm_card_visa", 1200);
    let declined = charge("pm_card_chargeDeclined", 300);
    let pending = charge("pm_card_authenticationRequired", 700);

    let paid_intent = succeeded(sim.create_and_confirm(&paid).await);
    sim.create_and_confirm(&declined).await.unwrap();
    let pending_id = sim
        .create_and_confirm(&pending)
        .await
        .unwrap()
        .payment_intent_id()
        .unwrap()
        .to_owned();
    sim.cancel(&pending_id, "cancel-pending").await.unwrap();
    sim.refund(&RefundRequest {
        payment_intent_id: paid_intent.id.clone(),
        amount: None,
        idempotency_key: "refund-paid".into(),
    })
    .await
    .unwrap();

    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(receiver.next().await.expect("a valid signature"));
    }
    let types: Vec<_> = received.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
            "charge.refunded"
        ]
    );
    let EventObject::PaymentIntent(intent) = &received[0].object else {
        panic!("a payment intent event, got {:?}", received[0].object);
    };
    assert_eq!(intent.id, paid_intent.id);
    assert_eq!(intent.checkout_id(), Some(paid.checkout_id));
    assert!(matches!(
        &received[3].object,
        EventObject::Charge { payment_intent: Some(pi), amount_refunded: 1200, refunded: true, .. }
            if *pi == paid_intent.id
    ));
    let recorded: Vec<_> = sim.events().into_iter().map(|e| e.id).collect();
    let delivered: Vec<_> = received.into_iter().map(|e| e.id).collect();
    assert_eq!(recorded, delivered);
}

#[tokio::test]
async fn a_refused_webhook_delivery_is_retried_until_accepted() {
    let mut receiver = start_receiver(WEBHOOK_SECRET, 2).await;
    let sim = StripeSimulator::new();
    sim.set_webhook_target(receiver.url.clone(), SecretString::from(WEBHOOK_SECRET));
    let pending = sim
        .create_and_confirm(&charge("pm_card_authenticationRequired", 700))
        .await
        .unwrap();
    let id = pending.payment_intent_id().unwrap().to_owned();

    sim.authenticate(&id, true).unwrap();

    let event = receiver.next().await.expect("a valid signature");
    assert_eq!(event.event_type, "payment_intent.succeeded");
    assert_eq!(event.payment_intent_id(), Some(id.as_str()));
    assert_eq!(receiver.attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_receiver_with_another_secret_rejects_every_simulated_event() {
    let mut receiver = start_receiver("whsec_not_the_one", 0).await;
    let sim = StripeSimulator::new();
    sim.set_webhook_target(receiver.url.clone(), SecretString::from(WEBHOOK_SECRET));

    sim.create_and_confirm(&charge("pm_card_visa", 100))
        .await
        .unwrap();

    assert_eq!(receiver.next().await, Err(SignatureError::NoMatch));
}

#[tokio::test]
async fn below_the_minimum_charge_the_fake_and_the_simulator_answer_amount_too_small() {
    let fake = FakeStripe::start().await;
    let simulator = StripeSimulator::new();
    let gateways: [(&str, &dyn PaymentGateway); 2] =
        [("fake Stripe", &gateway(&fake)), ("simulator", &simulator)];
    for (name, gateway) in gateways {
        // EUR 0.49: Stripe's minimum charge is EUR 0.50.
        match gateway
            .create_and_confirm(&charge("pm_card_visa", 49))
            .await
        {
            Err(GatewayError::InvalidRequest { code, .. }) => {
                assert_eq!(code, "amount_too_small", "{name}")
            }
            other => panic!("{name}: expected amount_too_small, got {other:?}"),
        }
        // EUR 0.50 is charged.
        succeeded(
            gateway
                .create_and_confirm(&charge("pm_card_visa", 50))
                .await,
        );
    }
    assert_eq!(
        fake.intent_count(),
        1,
        "nothing was created for the refused amount"
    );
}
