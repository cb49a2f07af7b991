//! The checkout saga end to end (promises 3–5): completion with the simulator's test cards on
//! both stores, Idempotency-Key, webhooks, late successes, and the Stripe client over HTTP
//! against the fake Stripe server with its faults. Every case ends with the audit.

use holdfast::checkout::{charge_key, SagaSettings};
use holdfast::domain::{CheckoutId, Currency, CustomerId, Money, OrderId};
use holdfast::payments::{
    signature, ChargeOutcome, ChargeRequest, PaymentGateway as _, StripeGateway, Timeouts,
};
use holdfast::store::{IdempotencyStart, Lease, StoreKind};
use serde_json::{json, Value};

use crate::both_stores;
use crate::fake_stripe::{FakeStripe, Fault, SECRET_KEY};
use crate::helpers::{
    eventually, execute_sql, quick_saga, spawn_app, spawn_app_with, AssertClean, Customer, Options,
    TestApp, WEBHOOK_SECRET,
};

both_stores!(
    a_visa_payment_completes_the_checkout_and_pays_the_order,
    a_declined_card_releases_the_units_and_reopens_the_cart,
    a_card_that_needs_authentication_completes_when_the_customer_authenticates,
    a_failed_authentication_releases_the_units,
    complete_needs_an_idempotency_key_and_replays_its_answer,
    an_unknown_payment_method_leaves_the_checkout_reserved,
    an_expired_checkout_cannot_be_paid,
    webhooks_need_a_valid_signature_and_are_handled_once,
    a_late_success_for_an_expired_checkout_takes_the_units_again_or_refunds,
    an_abandoned_authentication_is_cancelled_when_the_checkout_lifetime_ends,
    the_audit_finds_a_lost_event_and_a_ghost_checkout,
    an_admin_ships_or_refunds_a_paid_order,
    over_http_a_reused_charge_key_is_settled_from_the_gateway_by_recovery,
    over_http_a_refusal_after_an_unknown_outcome_never_opens_a_second_attempt,
    a_full_refund_reported_by_stripe_refunds_the_order_once,
    a_refund_reported_for_a_shipped_order_leaves_its_units_sold,
    a_refund_reported_before_the_payment_is_recorded_is_refused_until_it_is,
    starting_a_checkout_again_with_its_idempotency_key_replays_the_first_answer,
    an_idempotency_key_reused_for_another_cart_is_refused_and_changes_nothing,
    another_customers_identical_idempotency_key_starts_a_checkout_of_their_own,
    a_start_whose_answer_was_lost_after_reserving_answers_the_checkout_it_created,
    a_key_is_held_only_as_long_as_its_lease_is_renewed,
    a_total_below_the_minimum_charge_is_refused_before_any_gateway_call,
    a_pending_refund_refunds_the_order_only_when_stripe_reports_it_succeeded,
    a_failed_refund_leaves_the_order_paid_and_flagged,
    a_refund_answered_with_a_null_status_is_not_asked_for_again,
    a_pending_refund_whose_event_is_lost_is_settled_by_recovery,
    the_audit_sees_a_refund_holdfast_and_the_gateway_disagree_on,
    a_charge_lease_claimed_again_is_no_longer_renewed_by_its_first_holder,
);

fn checkout_id(raw: &str) -> CheckoutId {
    CheckoutId::parse(raw).expect("a checkout id")
}

async fn a_visa_payment_completes_the_checkout_and_pays_the_order(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;

    let done = app.complete(&ada, &checkout, "pm_card_visa", "key-1").await;

    done.assert_status(200);
    assert_eq!(done.body["state"], "completed");
    assert_eq!(done.body["order_id"], order.as_str());
    let order = app
        .get(&format!("/v1/orders/{order}"), Some(&ada.token))
        .await;
    assert_eq!(order.body["status"], "paid");
    let intent = order.str("payment_intent_id");
    assert!(intent.starts_with("pi_"));
    assert_eq!(
        app.stock_of("tea-01").await,
        (3, 0, 3),
        "sold units leave stock and reserved"
    );
    let ledger = app.simulator.as_ref().unwrap().ledger();
    assert_eq!(ledger.succeeded_for(checkout_id(&checkout)), 1);
    // The order.paid event reaches the warehouse and the notification consumer exactly once.
    let order_id = OrderId::parse(&order.str("id")).unwrap();
    eventually(10, "the warehouse allocates the order", || async {
        app.store.allocations_for(order_id).await.unwrap() == 1
    })
    .await;
    eventually(10, "the customer is notified", || async {
        app.store.notifications_for(order_id).await.unwrap() == 1
    })
    .await;
    // Completing again (another key) charges nothing more.
    let again = app.complete(&ada, &checkout, "pm_card_visa", "key-2").await;
    assert_eq!(again.body["state"], "completed");
    assert_eq!(
        app.simulator
            .as_ref()
            .unwrap()
            .ledger()
            .succeeded_for(checkout_id(&checkout)),
        1
    );
    app.audit().await.assert_clean();
}

async fn a_declined_card_releases_the_units_and_reopens_the_cart(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let started = app.start_checkout(&ada, &cart).await;
    let checkout = started.str("id");

    let declined = app
        .complete(&ada, &checkout, "pm_card_chargeDeclined", "k")
        .await;

    declined.assert_status(200);
    assert_eq!(declined.body["state"], "payment_failed");
    assert_eq!(declined.body["decline_code"], "generic_decline");
    assert_eq!(app.stock_of("tea-01").await, (5, 0, 5));
    let order = app
        .get(
            &format!("/v1/orders/{}", started.str("order_id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(order.body["status"], "payment_failed");
    // The cart keeps its lines and may be checked out again, with another card.
    let retry = app.start_checkout(&ada, &cart).await;
    retry.assert_status(201);
    let funds = app
        .complete(
            &ada,
            &retry.str("id"),
            "pm_card_chargeDeclinedInsufficientFunds",
            "k2",
        )
        .await;
    assert_eq!(funds.body["decline_code"], "insufficient_funds");
    let third = app.start_checkout(&ada, &cart).await;
    let paid = app
        .complete(&ada, &third.str("id"), "pm_card_mastercard", "k3")
        .await;
    assert_eq!(paid.body["state"], "completed");
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));
    app.audit().await.assert_clean();
}

async fn a_card_that_needs_authentication_completes_when_the_customer_authenticates(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;

    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;

    pending.assert_status(200);
    assert_eq!(pending.body["state"], "requires_action");
    assert!(pending.str("client_secret").contains("_secret_"));
    let order_path = format!("/v1/orders/{order}");
    assert_eq!(
        app.get(&order_path, Some(&ada.token)).await.body["status"],
        "payment_processing"
    );
    assert_eq!(
        app.stock_of("tea-01").await,
        (5, 1, 4),
        "still held while the customer authenticates"
    );

    // The customer passes 3-D Secure; the simulator's signed webhook moves the checkout on.
    let intent = pending.str("payment_intent_id");
    app.simulator
        .as_ref()
        .unwrap()
        .authenticate(&intent, true)
        .expect("authenticate");
    eventually(10, "the order is paid", || async {
        app.get(&order_path, Some(&ada.token)).await.body["status"] == "paid"
    })
    .await;
    let done = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    assert_eq!(done.body["state"], "completed");
    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    app.audit().await.assert_clean();
}

async fn a_failed_authentication_releases_the_units(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 3)]).await;
    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    let intent = pending.str("payment_intent_id");

    app.simulator
        .as_ref()
        .unwrap()
        .authenticate(&intent, false)
        .expect("authenticate");

    eventually(10, "the units come back", || async {
        app.stock_of("tea-01").await == (5, 0, 5)
    })
    .await;
    let failed = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    assert_eq!(failed.body["state"], "payment_failed");
    app.audit().await.assert_clean();
}

async fn complete_needs_an_idempotency_key_and_replays_its_answer(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;

    let missing = app
        .post(
            &format!("/v1/checkouts/{checkout}/complete"),
            Some(&ada.token),
            json!({"payment_method": "pm_card_visa"}),
        )
        .await;
    missing.assert_error(400, "idempotency_key_required");
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4), "nothing changed");

    let first = app
        .complete(&ada, &checkout, "pm_card_visa", "same-key")
        .await;
    let replay = app
        .complete(&ada, &checkout, "pm_card_visa", "same-key")
        .await;
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let reused = app
        .complete(&ada, &checkout, "pm_card_mastercard", "same-key")
        .await;
    reused.assert_error(422, "idempotency_key_reused");
    assert_eq!(
        app.simulator
            .as_ref()
            .unwrap()
            .ledger()
            .succeeded_for(checkout_id(&checkout)),
        1
    );

    // Keys are scoped to the customer: Bob's identical key is his own.
    let (bob, bobs, _) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    let his = app.complete(&bob, &bobs, "pm_card_visa", "same-key").await;
    his.assert_status(200);
    assert_eq!(his.body["id"], bobs.as_str());
    assert_eq!(his.body["state"], "completed");
    // Another customer's checkout id is simply not found.
    app.complete(&bob, &checkout, "pm_card_visa", "other")
        .await
        .assert_error(404, "checkout_not_found");
    app.audit().await.assert_clean();
}

async fn checkout_count(app: &TestApp) -> Vec<String> {
    crate::helpers::fetch_strings(app, "SELECT CAST(COUNT(*) AS TEXT) FROM checkouts").await
}

async fn starting_a_checkout_again_with_its_idempotency_key_replays_the_first_answer(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let first = app.start_checkout_with_key(&ada, &cart, "start-1").await;
    first.assert_status(201);

    // The answer was lost on the way back; the client sends the very same request again.
    let replay = app.start_checkout_with_key(&ada, &cart, "start-1").await;

    replay.assert_status(201);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(app.stock_of("tea-01").await, (5, 2, 3), "reserved once");
    assert_eq!(checkout_count(&app).await, ["1"]);
    // Without the key the same request is a second start, which the cart refuses.
    app.start_checkout(&ada, &cart)
        .await
        .assert_error(409, "cart_not_open");
    app.audit().await.assert_clean();
}

async fn an_idempotency_key_reused_for_another_cart_is_refused_and_changes_nothing(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let other_cart = app.new_cart(&ada).await;
    app.set_line(&ada, &other_cart, "tea-01", 1)
        .await
        .assert_status(200);
    app.start_checkout_with_key(&ada, &cart, "start-1")
        .await
        .assert_status(201);

    let reused = app
        .start_checkout_with_key(&ada, &other_cart, "start-1")
        .await;

    reused.assert_error(422, "idempotency_key_reused");
    assert_eq!(app.stock_of("tea-01").await, (5, 2, 3), "nothing reserved");
    assert_eq!(checkout_count(&app).await, ["1"]);
    // The other cart is untouched: with a key of its own it checks out.
    app.start_checkout_with_key(&ada, &other_cart, "start-2")
        .await
        .assert_status(201);
    assert_eq!(app.stock_of("tea-01").await, (5, 3, 2));
    app.audit().await.assert_clean();
}

async fn another_customers_identical_idempotency_key_starts_a_checkout_of_their_own(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, adas_cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let (bob, bobs_cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    let adas = app
        .start_checkout_with_key(&ada, &adas_cart, "start-1")
        .await;
    adas.assert_status(201);

    let bobs = app
        .start_checkout_with_key(&bob, &bobs_cart, "start-1")
        .await;

    bobs.assert_status(201);
    assert!(bobs.headers.get("idempotent-replayed").is_none());
    assert_ne!(bobs.body["id"], adas.body["id"]);
    assert_eq!(bobs.body["cart_id"], bobs_cart.as_str());
    assert_eq!(app.stock_of("tea-01").await, (5, 3, 2));
    // And each replays their own.
    let again = app
        .start_checkout_with_key(&ada, &adas_cart, "start-1")
        .await;
    assert_eq!(again.body, adas.body);
    app.audit().await.assert_clean();
}

async fn a_start_whose_answer_was_lost_after_reserving_answers_the_checkout_it_created(
    kind: StoreKind,
) {
    // The plain reservation and the grouped one record the key alike.
    for group_linger_us in [None, Some(500)] {
        let app = spawn_app_with(
            kind,
            Options {
                group_linger_us,
                ..Options::default()
            },
        )
        .await;
        a_lost_start_answers_its_checkout(&app).await;
    }
}

async fn a_lost_start_answers_its_checkout(app: &TestApp) {
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let first = app.start_checkout_with_key(&ada, &cart, "start-1").await;
    first.assert_status(201);
    // What a crash right after the reservation's commit leaves: the key's row without its
    // answer (the process died before storing it), its lease still running.
    execute_sql(
        app,
        &["UPDATE idempotency_keys SET status_code = NULL, response_body = NULL".to_owned()],
    )
    .await;

    let retry = app.start_checkout_with_key(&ada, &cart, "start-1").await;

    retry.assert_status(201);
    assert_eq!(retry.body["id"], first.body["id"], "{}", retry.body);
    assert_eq!(retry.body["state"], "reserved");
    assert_eq!(app.stock_of("tea-01").await, (5, 2, 3), "reserved once");
    assert_eq!(checkout_count(app).await, ["1"]);
    // That answer is stored now: the next retry replays it.
    let again = app.start_checkout_with_key(&ada, &cart, "start-1").await;
    assert_eq!(again.body, retry.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    app.audit().await.assert_clean();
}

async fn a_key_is_held_only_as_long_as_its_lease_is_renewed(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let customer = CustomerId::new();
    // Whole milliseconds, as the stores keep them.
    let t0 = chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis())
        .expect("now in range");
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
    let lease = chrono::Duration::seconds(5);
    let begin = |now| {
        app.store
            .idempotency_begin(customer, "k", "print", now, lease)
    };
    assert_eq!(
        begin(at(0)).await.expect("begin"),
        IdempotencyStart::Proceed
    );
    assert_eq!(
        begin(at(1_000)).await.expect("begin"),
        IdempotencyStart::InFlight { until: at(5_000) }
    );
    // The owner renews: the key stays its own past the first lease.
    app.store
        .idempotency_renew(customer, "k", at(8_000))
        .await
        .expect("renew");
    assert_eq!(
        begin(at(6_000)).await.expect("begin"),
        IdempotencyStart::InFlight { until: at(8_000) }
    );
    // The owner stops renewing (it died): the next request takes the key over.
    assert_eq!(
        begin(at(8_001)).await.expect("begin"),
        IdempotencyStart::Proceed
    );
    assert_eq!(
        begin(at(8_002)).await.expect("begin"),
        IdempotencyStart::InFlight { until: at(13_001) }
    );
    app.audit().await.assert_clean();
}

async fn a_total_below_the_minimum_charge_is_refused_before_any_gateway_call(kind: StoreKind) {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..Options::default()
        },
    )
    .await;
    app.new_product("mint-01", 25, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("mint-01", 1)]).await;

    let refused = app.complete(&ada, &checkout, "pm_card_visa", "pay-1").await;

    refused.assert_error(422, "amount_too_small");
    assert_eq!(
        refused.body["error"]["details"],
        json!({"total": {"amount": 25, "currency": "EUR"},
               "minimum": {"amount": 50, "currency": "EUR"}}),
        "{}",
        refused.body
    );
    assert_eq!(fake.requests(), 0, "no request reached the gateway");
    let after = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    assert_eq!(after.body["state"], "reserved", "{}", after.body);
    assert_eq!(app.stock_of("mint-01").await, (5, 1, 4));
    // Two units reach the minimum and are charged.
    let (bob, two, _) = app.reserved_checkout("Bob", &[("mint-01", 2)]).await;
    let paid = app.complete(&bob, &two, "pm_card_visa", "pay-2").await;
    paid.assert_status(200);
    assert_eq!(paid.body["state"], "completed", "{}", paid.body);
    assert_eq!(fake.charges_for(CheckoutId::parse(&two).expect("an id")), 1);
    app.audit().await.assert_clean();
}

/// A `refund.*` event about refund `refund` of `intent`, in `status` (`None` is `null`).
fn refund_object_event(
    id: &str,
    event_type: &str,
    refund: &str,
    intent: &str,
    status: Option<&str>,
) -> String {
    json!({
        "id": id, "object": "event", "type": event_type,
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": refund, "object": "refund", "amount": 900, "currency": "eur",
            "payment_intent": intent, "status": status, "charge": null, "reason": null,
            "metadata": {}, "balance_transaction": null, "receipt_number": null
        }}
    })
    .to_string()
}

/// The order's `refund_status` as its customer sees it.
async fn refund_status(app: &TestApp, customer: &Customer, order: &str) -> Value {
    app.get(&format!("/v1/orders/{order}"), Some(&customer.token))
        .await
        .body["refund_status"]
        .clone()
}

/// The refund id recorded with the one checkout.
async fn recorded_refund(app: &TestApp) -> String {
    let ids = crate::helpers::fetch_strings(app, "SELECT refund_id FROM checkouts").await;
    ids.into_iter()
        .next()
        .expect("one checkout with a refund id")
}

/// An admin refund of the paid order while the fake answers refunds with `status`; recovery
/// runs twice after it. Returns the refund's answer status code.
async fn admin_refund_answered(
    app: &TestApp,
    fake: &FakeStripe,
    order: &str,
    status: Option<&str>,
) -> u16 {
    fake.answer_refunds_with(status);
    let answer = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;
    for _ in 0..2 {
        app.recovery.tick().await.expect("recovery tick");
    }
    assert_eq!(fake.refund_count(), 1, "the refund was asked for once");
    answer.status.as_u16()
}

async fn a_pending_refund_refunds_the_order_only_when_stripe_reports_it_succeeded(kind: StoreKind) {
    let (app, fake) = app_with_fake_stripe(kind, Options::default()).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;

    let answered = admin_refund_answered(&app, &fake, &order, Some("pending")).await;

    // Pending: the order stays paid and nothing goes back to stock.
    assert_eq!(answered, 202);
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("paid".into(), "completed".into())
    );
    assert_eq!(refund_status(&app, &ada, &order).await, "pending");
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));
    // Stripe's charge.refunded for the pending refund does not settle it either.
    let charge = refund_event("evt_charge_refunded", &intent, 900, 900);
    assert_eq!(deliver_signed(&app, &charge).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("paid".into(), "completed".into())
    );
    // refund.updated: it succeeded.
    let refund = recorded_refund(&app).await;
    let still = refund_object_event(
        "evt_r1",
        "refund.updated",
        &refund,
        &intent,
        Some("pending"),
    );
    assert_eq!(deliver_signed(&app, &still).await, (200, None));
    assert_eq!(refund_status(&app, &ada, &order).await, "pending");
    fake.settle_refunds("succeeded");
    let done = refund_object_event(
        "evt_r2",
        "refund.updated",
        &refund,
        &intent,
        Some("succeeded"),
    );
    assert_eq!(deliver_signed(&app, &done).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(refund_status(&app, &ada, &order).await, "succeeded");
    assert_eq!(
        app.stock_of("tea-01").await,
        (5, 0, 5),
        "the units are back once"
    );
    assert_eq!(fake.refund_count(), 1);
    app.audit().await.assert_clean();
}

async fn a_failed_refund_leaves_the_order_paid_and_flagged(kind: StoreKind) {
    let (app, fake) = app_with_fake_stripe(kind, Options::default()).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;

    // Stripe answers the refund `failed` at once.
    let answered = admin_refund_answered(&app, &fake, &order, Some("failed")).await;

    assert_eq!(answered, 200);
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("paid".into(), "completed".into())
    );
    assert_eq!(refund_status(&app, &ada, &order).await, "failed");
    assert_eq!(
        app.stock_of("tea-01").await,
        (3, 0, 3),
        "the goods stay sold"
    );
    // A late charge.refunded (out of order) does not undo the flag.
    let charge = refund_event("evt_charge_refunded", &intent, 900, 900);
    assert_eq!(deliver_signed(&app, &charge).await, (200, None));
    assert_eq!(refund_status(&app, &ada, &order).await, "failed");
    app.audit().await.assert_clean();

    // Another order: pending first, then Stripe's refund.failed.
    let (bob, second, second_order) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    let paid = app.complete(&bob, &second, "pm_card_visa", "k2").await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    fake.answer_refunds_with(Some("pending"));
    app.admin_post(
        &format!("/v1/admin/orders/{second_order}/refund"),
        json!({}),
    )
    .await
    .assert_status(202);
    let refund = crate::helpers::fetch_strings(
        &app,
        "SELECT refund_id FROM checkouts WHERE refund_id IS NOT NULL ORDER BY created_at DESC",
    )
    .await
    .into_iter()
    .next()
    .expect("a refund id");
    let second_intent = app
        .get(&format!("/v1/orders/{second_order}"), Some(&bob.token))
        .await
        .str("payment_intent_id");
    fake.settle_refunds("failed");
    let failed = refund_object_event(
        "evt_rf",
        "refund.failed",
        &refund,
        &second_intent,
        Some("failed"),
    );
    assert_eq!(deliver_signed(&app, &failed).await, (200, None));
    assert_eq!(
        statuses(&app, &bob, &second, &second_order).await,
        ("paid".into(), "completed".into())
    );
    assert_eq!(refund_status(&app, &bob, &second_order).await, "failed");
    assert_eq!(app.stock_of("tea-01").await, (2, 0, 2));
    app.audit().await.assert_clean();
}

async fn a_refund_answered_with_a_null_status_is_not_asked_for_again(kind: StoreKind) {
    let (app, fake) = app_with_fake_stripe(kind, Options::default()).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;

    // `"status": null`, as Stripe's spec allows: read, recorded as pending, not repeated.
    let answered = admin_refund_answered(&app, &fake, &order, None).await;

    assert_eq!(answered, 202);
    assert_eq!(refund_status(&app, &ada, &order).await, "pending");
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("paid".into(), "completed".into())
    );
    // charge.refund.updated settles it.
    let refund = recorded_refund(&app).await;
    fake.settle_refunds("succeeded");
    let done = refund_object_event(
        "evt_cr",
        "charge.refund.updated",
        &refund,
        &intent,
        Some("succeeded"),
    );
    assert_eq!(deliver_signed(&app, &done).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(fake.refund_count(), 1);
    app.audit().await.assert_clean();
}

async fn a_pending_refund_whose_event_is_lost_is_settled_by_recovery(kind: StoreKind) {
    let (app, fake) = manual_app_with_fake_stripe(kind).await;
    let (ada, checkout, order, _) = paid_for_two(&app).await;
    // Answered `null` (pending), then Stripe settles it and its event is lost.
    assert_eq!(admin_refund_answered(&app, &fake, &order, None).await, 202);
    fake.settle_refunds("succeeded");

    // Within the reconcile threshold recovery leaves it to the event.
    app.recovery.tick().await.expect("recovery tick");
    assert_eq!(refund_status(&app, &ada, &order).await, "pending");
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));

    // Past it, recovery reads the refund and records it as the event would have.
    app.advance(chrono::Duration::seconds(1));
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 1);
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(refund_status(&app, &ada, &order).await, "succeeded");
    app.advance(chrono::Duration::seconds(1));
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 0);
    assert_eq!(
        app.stock_of("tea-01").await,
        (5, 0, 5),
        "the units are back once"
    );
    assert_eq!(fake.refund_count(), 1, "the refund was asked for once");
    app.audit().await.assert_clean();

    // Another order whose refund stays pending at the next look, then fails.
    let (bob, second, second_order) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    let paid = app.complete(&bob, &second, "pm_card_visa", "k2").await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    fake.answer_refunds_with(Some("pending"));
    app.admin_post(
        &format!("/v1/admin/orders/{second_order}/refund"),
        json!({}),
    )
    .await
    .assert_status(202);
    app.advance(chrono::Duration::seconds(1));
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 1);
    assert_eq!(refund_status(&app, &bob, &second_order).await, "pending");
    // Read again only after another threshold.
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 0);
    let refund = crate::helpers::fetch_strings(
        &app,
        "SELECT refund_id FROM checkouts WHERE refund_id IS NOT NULL ORDER BY created_at DESC",
    )
    .await
    .into_iter()
    .next()
    .expect("a refund id");
    fake.settle_refund(&refund, "failed");
    app.advance(chrono::Duration::seconds(1));
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 1);
    assert_eq!(
        statuses(&app, &bob, &second, &second_order).await,
        ("paid".into(), "completed".into())
    );
    assert_eq!(refund_status(&app, &bob, &second_order).await, "failed");
    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    app.advance(chrono::Duration::seconds(1));
    assert_eq!(app.recovery.tick().await.expect("recovery tick"), 0);
    assert_eq!(fake.refund_count(), 2);
    app.audit().await.assert_clean();
}

async fn the_audit_sees_a_refund_holdfast_and_the_gateway_disagree_on(kind: StoreKind) {
    let (app, fake) = app_with_fake_stripe(kind, Options::default()).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;
    assert_eq!(
        admin_refund_answered(&app, &fake, &order, Some("pending")).await,
        202
    );
    app.audit().await.assert_clean();

    // Stripe settles the refund and its event is lost: holdfast still says pending.
    fake.settle_refunds("succeeded");
    let report = app.audit().await;

    let refund = recorded_refund(&app).await;
    let found: Vec<&String> = report.violations().collect();
    assert_eq!(found.len(), 1, "{report}");
    assert!(
        found[0].contains(&refund) && found[0].contains("succeeded at the gateway"),
        "{report}"
    );
    // The event arrives after all: both sides agree again.
    let done = refund_object_event(
        "evt_late",
        "refund.updated",
        &refund,
        &intent,
        Some("succeeded"),
    );
    assert_eq!(deliver_signed(&app, &done).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    app.audit().await.assert_clean();
    // And the other way round: the gateway reverses it (a refund that failed later).
    fake.settle_refunds("failed");
    assert_eq!(app.audit().await.violations().count(), 1);
}

async fn an_unknown_payment_method_leaves_the_checkout_reserved(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;

    app.complete(&ada, &checkout, "pm_card_nonsense", "k1")
        .await
        .assert_error(422, "payment_method_refused");
    app.complete(&ada, &checkout, "not a method!", "k2")
        .await
        .assert_error(422, "validation_failed");
    let state = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    assert_eq!(state.body["state"], "reserved");
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4));

    let paid = app.complete(&ada, &checkout, "pm_card_visa", "k3").await;
    assert_eq!(paid.body["state"], "completed");
    app.audit().await.assert_clean();
}

async fn an_expired_checkout_cannot_be_paid(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    eventually(10, "the reservation expires", || async {
        app.stock_of("tea-01").await == (5, 0, 5)
    })
    .await;

    let late = app.complete(&ada, &checkout, "pm_card_visa", "k").await;

    late.assert_error(409, "checkout_expired");
    assert_eq!(
        app.simulator
            .as_ref()
            .unwrap()
            .ledger()
            .succeeded_for(checkout_id(&checkout)),
        0
    );
    app.audit().await.assert_clean();
}

async fn post_webhook(
    app: &TestApp,
    payload: &str,
    header: Option<String>,
) -> (u16, serde_json::Value) {
    let mut req = app
        .client
        .post(format!("{}/webhooks/stripe", app.base))
        .header("content-type", "application/json")
        .body(payload.to_owned());
    if let Some(h) = header {
        req = req.header("Stripe-Signature", h);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

fn event(id: &str, kind: &str, intent: &str, checkout: &str, status: &str) -> String {
    json!({
        "id": id, "object": "event", "type": kind, "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": intent, "object": "payment_intent", "amount": 450, "currency": "eur",
            "status": status, "client_secret": null, "created": 0,
            "metadata": {"checkout_id": checkout}, "last_payment_error": null
        }}
    })
    .to_string()
}

/// A `charge.refunded` event as Stripe sends it (API 2024-06-20: the charge, its refunds not
/// expanded). `refunded` is Stripe's "fully refunded".
pub(crate) fn refund_event(id: &str, intent: &str, amount: i64, amount_refunded: i64) -> String {
    json!({
        "id": id, "object": "event", "type": "charge.refunded",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": format!("ch_of_{intent}"), "object": "charge", "amount": amount,
            "amount_refunded": amount_refunded, "currency": "eur", "payment_intent": intent,
            "refunded": amount_refunded == amount, "status": "succeeded"
        }}
    })
    .to_string()
}

/// Signs and delivers an event now; returns the status and whether it was a duplicate.
pub(crate) async fn deliver_signed(app: &TestApp, payload: &str) -> (u16, Option<bool>) {
    let now = chrono::Utc::now().timestamp();
    let header = signature::sign(payload.as_bytes(), WEBHOOK_SECRET, now);
    let (status, body) = post_webhook(app, payload, Some(header)).await;
    (status, body["duplicate"].as_bool())
}

/// `(order status, checkout state)` as the customer sees them.
async fn statuses(
    app: &TestApp,
    customer: &Customer,
    checkout: &str,
    order: &str,
) -> (String, String) {
    let order = app
        .get(&format!("/v1/orders/{order}"), Some(&customer.token))
        .await;
    let checkout = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&customer.token))
        .await;
    (order.str("status"), checkout.str("state"))
}

/// A paid checkout of two units of tea-01 (stock 5): `(customer, checkout, order, intent)`.
async fn paid_for_two(app: &TestApp) -> (Customer, String, String, String) {
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;
    let paid = app.complete(&ada, &checkout, "pm_card_visa", "k").await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    let intent = app
        .get(&format!("/v1/orders/{order}"), Some(&ada.token))
        .await
        .str("payment_intent_id");
    (ada, checkout, order, intent)
}

async fn a_full_refund_reported_by_stripe_refunds_the_order_once(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));

    // A partial refund (say, goodwill on one cup) leaves the order paid.
    let partial = refund_event("evt_refund_partial", &intent, 900, 100);
    assert_eq!(deliver_signed(&app, &partial).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("paid".into(), "completed".into())
    );

    // The full refund made on Stripe's dashboard, delivered twice.
    let full = refund_event("evt_refund_full", &intent, 900, 900);
    assert_eq!(deliver_signed(&app, &full).await, (200, None));
    assert_eq!(deliver_signed(&app, &full).await, (200, Some(true)));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(
        app.stock_of("tea-01").await,
        (5, 0, 5),
        "the units are back on the shelf, as after an admin refund"
    );

    // The same story under another event id, and a success arriving late: nothing moves back.
    let again = refund_event("evt_refund_again", &intent, 900, 900);
    assert_eq!(deliver_signed(&app, &again).await, (200, None));
    let late = event(
        "evt_late_success",
        "payment_intent.succeeded",
        &intent,
        &checkout,
        "succeeded",
    );
    assert_eq!(deliver_signed(&app, &late).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(app.stock_of("tea-01").await, (5, 0, 5), "returned once");
    let events = crate::helpers::fetch_strings(
        &app,
        "SELECT CAST(COUNT(*) AS TEXT) FROM outbox WHERE topic = 'order.paid'",
    )
    .await;
    assert_eq!(events, ["1"], "the order was paid once");
    app.audit().await.assert_clean();
}

async fn a_refund_reported_for_a_shipped_order_leaves_its_units_sold(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (ada, checkout, order, intent) = paid_for_two(&app).await;
    app.admin_post(&format!("/v1/admin/orders/{order}/shipments"), json!({}))
        .await
        .assert_status(200);

    let full = refund_event("evt_refund_shipped", &intent, 900, 900);
    assert_eq!(deliver_signed(&app, &full).await, (200, None));

    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(
        app.stock_of("tea-01").await,
        (3, 0, 3),
        "shipped units left the warehouse; they come back only by a stock adjustment"
    );
    app.audit().await.assert_clean();
}

async fn a_refund_reported_before_the_payment_is_recorded_is_refused_until_it_is(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    assert_eq!(pending.body["state"], "requires_action");
    let intent = pending.str("payment_intent_id");

    // Stripe delivers out of order: the refund before the success. Answering 2xx would lose
    // it, so the endpoint refuses and Stripe delivers it again later.
    let refund = refund_event("evt_refund_early", &intent, 450, 450);
    assert_eq!(deliver_signed(&app, &refund).await.0, 500);
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("payment_processing".into(), "requires_action".into())
    );

    app.simulator
        .as_ref()
        .unwrap()
        .authenticate(&intent, true)
        .expect("authenticate");
    eventually(10, "the order is paid", || async {
        statuses(&app, &ada, &checkout, &order).await.0 == "paid"
    })
    .await;
    assert_eq!(deliver_signed(&app, &refund).await, (200, None));
    assert_eq!(
        statuses(&app, &ada, &checkout, &order).await,
        ("refunded".into(), "refunded".into())
    );
    assert_eq!(app.stock_of("tea-01").await, (5, 0, 5));
    app.audit().await.assert_clean();
}

async fn webhooks_need_a_valid_signature_and_are_handled_once(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    let intent = pending.str("payment_intent_id");
    let now = chrono::Utc::now().timestamp();
    let payload = event(
        "evt_test_1",
        "payment_intent.succeeded",
        &intent,
        &checkout,
        "succeeded",
    );

    let bad = [
        (None, "signature_missing"),
        (Some("garbage".to_owned()), "invalid_signature"),
        (
            Some(signature::sign(payload.as_bytes(), "whsec_wrong", now)),
            "invalid_signature",
        ),
        (
            Some(signature::sign(
                payload.as_bytes(),
                WEBHOOK_SECRET,
                now - 301,
            )),
            "invalid_signature",
        ),
        (
            Some(signature::sign(b"{\"tampered\":true}", WEBHOOK_SECRET, now)),
            "invalid_signature",
        ),
    ];
    for (header, code) in bad {
        let (status, body) = post_webhook(&app, &payload, header.clone()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{header:?}"
        );
    }
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "payment_processing"
    );

    let signed = signature::sign(payload.as_bytes(), WEBHOOK_SECRET, now);
    let (status, _) = post_webhook(&app, &payload, Some(signed.clone())).await;
    assert_eq!(status, 200);
    let (status, body) = post_webhook(&app, &payload, Some(signed)).await;
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(true)));
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "paid"
    );

    // A failure reported after the success never moves the checkout back.
    let failed = event(
        "evt_test_2",
        "payment_intent.payment_failed",
        &intent,
        &checkout,
        "requires_payment_method",
    );
    let (status, _) = post_webhook(
        &app,
        &failed,
        Some(signature::sign(failed.as_bytes(), WEBHOOK_SECRET, now)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        app.get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
            .await
            .body["state"],
        "completed"
    );
    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    app.audit().await.assert_clean();
}

async fn a_late_success_for_an_expired_checkout_takes_the_units_again_or_refunds(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 1).await;
    let now = chrono::Utc::now().timestamp();

    // Ada's reservation expires; a success for it arrives while the unit is still free.
    let (ada, first, first_order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    eventually(10, "expired", || async {
        app.stock_of("tea-01").await == (1, 0, 1)
    })
    .await;
    let paid = event(
        "evt_late_1",
        "payment_intent.succeeded",
        "pi_late_1",
        &first,
        "succeeded",
    );
    let (status, _) = post_webhook(
        &app,
        &paid,
        Some(signature::sign(paid.as_bytes(), WEBHOOK_SECRET, now)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        app.get(&format!("/v1/orders/{first_order}"), Some(&ada.token))
            .await
            .body["status"],
        "paid"
    );
    assert_eq!(app.stock_of("tea-01").await, (0, 0, 0));

    // Bob's expires too, Carol buys the unit, and only then does Bob's payment succeed: the
    // unit is gone, so his money goes back.
    app.new_product("cup-02", 900, 1).await;
    let (bob, second, second_order) = app.reserved_checkout("Bob", &[("cup-02", 1)]).await;
    eventually(10, "expired", || async {
        app.stock_of("cup-02").await == (1, 0, 1)
    })
    .await;
    let (carol, carols, _) = app.reserved_checkout("Carol", &[("cup-02", 1)]).await;
    assert_eq!(
        app.complete(&carol, &carols, "pm_card_visa", "k")
            .await
            .body["state"],
        "completed"
    );
    let simulator = app.simulator.clone().unwrap();
    let late = simulator
        .create_and_confirm(&ChargeRequest {
            amount: Money::new(900, Currency::parse("EUR").unwrap()).unwrap(),
            payment_method: "pm_card_visa".into(),
            checkout_id: checkout_id(&second),
            order_id: OrderId::parse(&second_order).unwrap(),
            customer_id: CustomerId::new(),
            idempotency_key: "late-bob".into(),
            capture_method: Default::default(),
        })
        .await
        .expect("the simulator charges");
    let ChargeOutcome::Succeeded(intent) = late else {
        panic!("a success: {late:?}")
    };
    // The simulator's webhook reaches the service, which refunds.
    eventually(10, "the late payment is refunded", || async {
        app.get(&format!("/v1/orders/{second_order}"), Some(&bob.token))
            .await
            .body["status"]
            == "refunded"
    })
    .await;
    assert_eq!(simulator.ledger().refunded(&intent.id), 900);
    assert_eq!(
        app.get(&format!("/v1/checkouts/{second}"), Some(&bob.token))
            .await
            .body["state"],
        "refunded"
    );
    assert_eq!(
        app.stock_of("cup-02").await,
        (0, 0, 0),
        "the unit was sold once, to Carol"
    );
    app.audit().await.assert_clean();
}

// The Stripe client over HTTP against the fake Stripe server (PostgreSQL).

async fn app_on_fake_stripe() -> (TestApp, FakeStripe) {
    app_with_fake_stripe(StoreKind::Postgres, Options::default()).await
}

pub(crate) async fn app_with_fake_stripe(
    kind: StoreKind,
    options: Options,
) -> (TestApp, FakeStripe) {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..options
        },
    )
    .await;
    (app, fake)
}

/// The app on the fake with a clock that moves only when the test says so (workers off).
async fn manual_app_with_fake_stripe(kind: StoreKind) -> (TestApp, FakeStripe) {
    app_with_fake_stripe(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await
}

/// Lets time pass past every retry and reconcile threshold and runs recovery, a few rounds,
/// until the checkout has left `charging`; returns its state.
async fn recover_until_settled(app: &TestApp, customer: &Customer, checkout: &str) -> String {
    let path = format!("/v1/checkouts/{checkout}");
    for _ in 0..5 {
        app.advance(chrono::Duration::seconds(1));
        app.recovery.tick().await.expect("recovery tick");
        let state = app.get(&path, Some(&customer.token)).await.str("state");
        if state != "charging" {
            return state;
        }
    }
    "charging".to_owned()
}

/// The idempotency keys of every charge request the fake received for this checkout.
fn charge_keys(fake: &FakeStripe, checkout: &str) -> Vec<String> {
    let prefix = format!("checkout-{checkout}-charge-");
    fake.request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/payment_intents")
        .filter_map(|r| r.idempotency_key)
        .filter(|k| k.starts_with(&prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_visa_payment_completes_with_one_charge() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let done = app.complete(&ada, &checkout, "pm_card_visa", "k").await;
    assert_eq!(done.body["state"], "completed", "{:?}", done.body);
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    let keys: Vec<_> = fake
        .request_log()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    assert_eq!(keys, [format!("checkout-{checkout}-charge-1")]);
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_500_or_a_dropped_connection_still_ends_with_one_charge_and_a_paid_order() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    for (name, fault) in [
        ("Ada", Fault::InternalError),
        ("Bob", Fault::DropAfterCharge),
        ("Cy", Fault::TooManyRequests),
    ] {
        let (customer, checkout, order) = app.reserved_checkout(name, &[("tea-01", 1)]).await;
        fake.fail_next(1, fault);
        let done = app
            .complete(&customer, &checkout, "pm_card_visa", "k")
            .await;
        assert_eq!(
            done.body["state"], "completed",
            "{fault:?}: {:?}",
            done.body
        );
        assert_eq!(fake.charges_for(checkout_id(&checkout)), 1, "{fault:?}");
        assert_eq!(
            app.get(&format!("/v1/orders/{order}"), Some(&customer.token))
                .await
                .body["status"],
            "paid"
        );
    }
    assert_eq!(app.stock_of("tea-01").await, (2, 0, 2));
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_an_outcome_unknown_for_long_is_finished_by_recovery_with_the_same_key() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    // Every in-request try is lost after the charge was made.
    fake.fail_next(3, Fault::DropAfterCharge);
    let pending = app.complete(&ada, &checkout, "pm_card_visa", "k").await;
    assert_eq!(pending.body["state"], "charging", "{:?}", pending.body);
    assert_eq!(
        app.stock_of("tea-01").await,
        (5, 1, 4),
        "the reservation cannot expire while charging"
    );

    // The recovery worker retries with the same key; the fake replays the stored charge.
    eventually(15, "the order is paid", || async {
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"]
            == "paid"
    })
    .await;
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    // The same Idempotency-Key now answers the final state.
    let retried = app.complete(&ada, &checkout, "pm_card_visa", "k").await;
    assert_eq!(retried.body["state"], "completed");
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_charge_slower_than_the_lease_keeps_its_lease_and_is_sent_once() {
    // A one-second lease, and a recovery worker looking for lapsed leases every 100 ms: the
    // other instance that would take a stalled checkout over.
    let (app, fake) = app_with_fake_stripe(
        StoreKind::Postgres,
        Options {
            saga: SagaSettings {
                lease: chrono::Duration::seconds(1),
                ..quick_saga()
            },
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;

    // Stripe takes three leases' time to answer.
    fake.latency(std::time::Duration::from_secs(3));
    let done = app.complete(&ada, &checkout, "pm_card_visa", "k").await;

    assert_eq!(done.body["state"], "completed", "{:?}", done.body);
    assert_eq!(
        charge_keys(&fake, &checkout),
        vec![charge_key(checkout_id(&checkout), 1)],
        "the charge was sent once: nobody took the checkout over mid-call"
    );
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "paid"
    );
    app.audit().await.assert_clean();
}

async fn a_charge_lease_claimed_again_is_no_longer_renewed_by_its_first_holder(kind: StoreKind) {
    // Workers off: the test is the only one claiming.
    let app = spawn_app_with(
        kind,
        Options {
            workers: false,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (_, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let id = checkout_id(&checkout);
    let customer = app
        .store
        .find_checkout(id)
        .await
        .unwrap()
        .unwrap()
        .customer_id;
    let lease = |now: chrono::DateTime<chrono::Utc>, seconds| Lease {
        owner: "instance-a",
        now,
        until: now + chrono::Duration::seconds(seconds),
    };
    let now = chrono::Utc::now();
    let taken = lease(now, 1);
    app.store
        .begin_charge(customer, id, "pm_card_visa", taken)
        .await
        .unwrap();

    // Its holder renews the lease while the charge runs.
    let renewed = lease(now, 2);
    assert!(app
        .store
        .renew_charge_lease(id, taken.until, renewed)
        .await
        .unwrap());

    // The lease lapses anyway and recovery claims the checkout again, under the same owner
    // name as an instance's own recovery worker does: the first holder's lease is gone.
    let later = now + chrono::Duration::seconds(3);
    let reclaimed = lease(later, 1);
    assert_eq!(
        app.store.claim_stalled(10, reclaimed).await.unwrap().len(),
        1
    );
    assert!(
        !app.store
            .renew_charge_lease(id, renewed.until, lease(later, 2))
            .await
            .unwrap(),
        "the superseded holder cannot renew"
    );
    assert!(
        app.store
            .renew_charge_lease(id, reclaimed.until, lease(later, 2))
            .await
            .unwrap(),
        "the new claim can"
    );

    // A checkout that left `charging` has no charge lease to renew.
    app.store.abort_charge(id, later).await.unwrap();
    assert!(!app
        .store
        .renew_charge_lease(id, later + chrono::Duration::seconds(2), lease(later, 3))
        .await
        .unwrap());
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_concurrent_duplicate_complete_gets_409() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    fake.hold();
    let first = {
        let client = app.client.clone();
        let url = format!("{}/v1/checkouts/{checkout}/complete", app.base);
        let token = ada.token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "dup")
                .json(&json!({"payment_method": "pm_card_visa"}))
                .send()
                .await
                .expect("request")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        })
    };
    fake.wait_until_held(1).await;
    let duplicate = app.complete(&ada, &checkout, "pm_card_visa", "dup").await;
    duplicate.assert_error(409, "idempotency_conflict");
    let other_key = app.complete(&ada, &checkout, "pm_card_visa", "other").await;
    other_key.assert_error(409, "payment_in_progress");
    fake.release();
    let first = first.await.unwrap();
    assert_eq!(first["state"], "completed");
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    app.audit().await.assert_clean();
}

async fn an_abandoned_authentication_is_cancelled_when_the_checkout_lifetime_ends(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 1,
            max_lifetime_seconds: 2,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;
    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    assert_eq!(pending.body["state"], "requires_action");

    // The customer never authenticates: the reconciler asks the gateway, and once the
    // checkout's lifetime is over cancels the payment and releases the units.
    eventually(15, "the checkout is cancelled", || async {
        app.recovery.tick().await.expect("recovery tick");
        app.get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
            .await
            .body["state"]
            == "cancelled"
    })
    .await;
    assert_eq!(app.stock_of("tea-01").await, (5, 0, 5));
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "cancelled"
    );
    assert_eq!(
        app.simulator
            .as_ref()
            .unwrap()
            .ledger()
            .succeeded_for(checkout_id(&checkout)),
        0
    );
    app.audit().await.assert_clean();
}

async fn the_audit_finds_a_lost_event_and_a_ghost_checkout(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, paid, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    app.complete(&ada, &paid, "pm_card_visa", "k")
        .await
        .assert_status(200);
    let (_, ghost, _) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    app.audit().await.assert_clean();

    // The paid order loses its event, and a checkout sits in `charging` with nobody driving it.
    let statements = [
        "DELETE FROM outbox".to_owned(),
        "UPDATE checkouts SET state = 'charging', lease_until = NULL, lease_owner = NULL \
         WHERE state = 'reserved'"
            .to_owned(),
    ];
    crate::helpers::execute_sql(&app, &statements).await;

    let report = app.audit().await;
    assert!(!report.is_clean());
    assert!(
        report
            .violations()
            .any(|v| v.contains(&paid) && v.contains("0 order.paid events")),
        "{report}"
    );
    assert!(
        report
            .violations()
            .any(|v| v.contains(&ghost) && v.contains("no live lease")),
        "{report}"
    );
}

async fn an_admin_ships_or_refunds_a_paid_order(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, first, first_order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;
    let (_, _, unpaid_order) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    assert_eq!(
        app.complete(&ada, &first, "pm_card_visa", "k").await.body["state"],
        "completed"
    );
    let (ada2, second, second_order) = app.reserved_checkout("Ada2", &[("tea-01", 2)]).await;
    assert_eq!(
        app.complete(&ada2, &second, "pm_card_visa", "k").await.body["state"],
        "completed"
    );
    assert_eq!(app.stock_of("tea-01").await, (1, 1, 0));

    // Refund: money back once, units back on the shelf.
    let refunded = app
        .admin_post(&format!("/v1/admin/orders/{first_order}/refund"), json!({}))
        .await;
    refunded.assert_status(200);
    assert_eq!(refunded.body["status"], "refunded");
    let intent = refunded.str("payment_intent_id");
    assert_eq!(
        app.simulator.as_ref().unwrap().ledger().refunded(&intent),
        900
    );
    assert_eq!(app.stock_of("tea-01").await, (3, 1, 2));
    app.admin_post(&format!("/v1/admin/orders/{first_order}/refund"), json!({}))
        .await
        .assert_error(409, "invalid_order_state");
    assert_eq!(
        app.simulator.as_ref().unwrap().ledger().refunded(&intent),
        900,
        "refunded once"
    );
    assert_eq!(
        app.get(&format!("/v1/checkouts/{first}"), Some(&ada.token))
            .await
            .body["state"],
        "refunded"
    );

    // Shipment: paid → fulfilled, once; an unpaid order cannot ship.
    let shipped = app
        .admin_post(
            &format!("/v1/admin/orders/{second_order}/shipments"),
            json!({}),
        )
        .await;
    shipped.assert_status(200);
    assert_eq!(shipped.body["status"], "fulfilled");
    app.admin_post(
        &format!("/v1/admin/orders/{second_order}/shipments"),
        json!({}),
    )
    .await
    .assert_status(200);
    app.admin_post(
        &format!("/v1/admin/orders/{second_order}/refund"),
        json!({}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    app.admin_post(
        &format!("/v1/admin/orders/{unpaid_order}/shipments"),
        json!({}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    app.admin_post("/v1/admin/orders/nope/refund", json!({}))
        .await
        .assert_error(404, "order_not_found");
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_webhook_that_beats_the_charge_response_completes_the_checkout_once() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    fake.hold();
    let pending = {
        let client = app.client.clone();
        let url = format!("{}/v1/checkouts/{checkout}/complete", app.base);
        let token = ada.token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "k")
                .json(&json!({"payment_method": "pm_card_visa"}))
                .send()
                .await
                .expect("request")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        })
    };
    fake.wait_until_held(1).await;

    // Stripe's event arrives while our charge call is still waiting for its answer: it is
    // matched by the metadata and completes the checkout.
    let now = chrono::Utc::now().timestamp();
    let early = event(
        "evt_early",
        "payment_intent.succeeded",
        "pi_early",
        &checkout,
        "succeeded",
    );
    let (status, _) = post_webhook(
        &app,
        &early,
        Some(signature::sign(early.as_bytes(), WEBHOOK_SECRET, now)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "paid"
    );

    // The late response changes nothing: still completed, stock confirmed once, one event.
    fake.release();
    let answer = pending.await.unwrap();
    assert_eq!(answer["state"], "completed");
    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    let order_id = OrderId::parse(&order).unwrap();
    eventually(10, "one allocation", || async {
        app.store.allocations_for(order_id).await.unwrap() == 1
    })
    .await;
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_checkout_finish() {
    let (app, fake) = app_on_fake_stripe().await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let (store, gateway) = (app.store.clone(), app.gateway.clone());
    fake.hold();
    let pending = {
        let client = app.client.clone();
        let url = format!("{}/v1/checkouts/{checkout}/complete", app.base);
        let token = ada.token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "k")
                .json(&json!({"payment_method": "pm_card_visa"}))
                .send()
                .await
                .expect("the in-flight request is answered")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        })
    };
    fake.wait_until_held(1).await;

    // Shutdown begins while the charge is in flight; it waits for the request to finish.
    let stopping = tokio::spawn(app.stop());
    fake.release();
    let answer = pending.await.unwrap();
    stopping.await.expect("the server stops cleanly");

    assert_eq!(answer["state"], "completed");
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    let paid = store
        .admin_order(OrderId::parse(&order).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(paid.status.as_str(), "paid");
    let options = holdfast::audit::AuditOptions {
        gateway: Some(gateway.as_ref()),
        ..Default::default()
    };
    holdfast::audit::run_with(store.as_ref(), options)
        .await
        .unwrap()
        .assert_clean();
}

async fn over_http_a_reused_charge_key_is_settled_from_the_gateway_by_recovery(kind: StoreKind) {
    let (app, fake) = manual_app_with_fake_stripe(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    // Another client (say, an older release sending other parameters) already charged under
    // this checkout's first key: Stripe answers every request of ours with that key 400
    // idempotency_error, while the money has moved.
    let other_client = StripeGateway::new(SECRET_KEY.into(), &fake.base_url(), Timeouts::default())
        .expect("a gateway on the fake");
    let earlier = other_client
        .create_and_confirm(&ChargeRequest {
            amount: Money::new(450, Currency::parse("EUR").unwrap()).unwrap(),
            payment_method: "pm_card_mastercard".into(),
            checkout_id: checkout_id(&checkout),
            order_id: OrderId::parse(&order).unwrap(),
            customer_id: CustomerId::new(),
            idempotency_key: charge_key(checkout_id(&checkout), 1),
            capture_method: Default::default(),
        })
        .await;
    assert!(
        matches!(earlier, Ok(ChargeOutcome::Succeeded(_))),
        "{earlier:?}"
    );

    let refused = app.complete(&ada, &checkout, "pm_card_visa", "k").await;
    refused.assert_error(502, "payment_gateway_error");

    // Recovery keeps getting 400 for the key; once the charge has been in flight past the
    // reconcile threshold it asks the gateway, which holds the payment.
    assert_eq!(
        recover_until_settled(&app, &ada, &checkout).await,
        "completed"
    );
    assert_eq!(
        app.get(&format!("/v1/orders/{order}"), Some(&ada.token))
            .await
            .body["status"],
        "paid"
    );
    assert_eq!(fake.charges_for(checkout_id(&checkout)), 1);
    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    app.audit().await.assert_clean();
}

async fn over_http_a_refusal_after_an_unknown_outcome_never_opens_a_second_attempt(
    kind: StoreKind,
) {
    let (app, fake) = manual_app_with_fake_stripe(kind).await;
    app.new_product("tea-01", 450, 5).await;
    // (first try's fate, the retry's refusal): the money moved and the answer was lost, then
    // the key is refused; or a 500, then the payment method is refused.
    for (name, lost, refusal) in [
        ("Ada", Fault::DropAfterCharge, Fault::Unauthorized),
        ("Bob", Fault::InternalError, Fault::InvalidRequest),
    ] {
        let (customer, checkout, order) = app.reserved_checkout(name, &[("tea-01", 1)]).await;
        fake.fail_next(1, lost);
        fake.fail_next(1, refusal);

        let answer = app
            .complete(&customer, &checkout, "pm_card_visa", "k")
            .await;

        // The refusal says nothing about the first try: the charge stays open, same attempt.
        answer.assert_status(200);
        assert_eq!(answer.body["state"], "charging", "{lost:?}, {refusal:?}");
        assert_eq!(app.stock_of("tea-01").await.1, 1, "{lost:?}: still held");
        app.complete(&customer, &checkout, "pm_card_visa", "another-key")
            .await
            .assert_error(409, "payment_in_progress");
        assert_eq!(
            recover_until_settled(&app, &customer, &checkout).await,
            "completed",
            "{lost:?}, {refusal:?}"
        );
        assert_eq!(
            app.get(&format!("/v1/orders/{order}"), Some(&customer.token))
                .await
                .body["status"],
            "paid"
        );
        assert_eq!(fake.charges_for(checkout_id(&checkout)), 1, "{lost:?}");
        let first_key = charge_key(checkout_id(&checkout), 1);
        let keys = charge_keys(&fake, &checkout);
        assert!(
            keys.len() >= 3 && keys.iter().all(|k| *k == first_key),
            "{lost:?}: every try repeats the first attempt: {keys:?}"
        );
        // Later requests with the first key answer the final state.
        let retried = app
            .complete(&customer, &checkout, "pm_card_visa", "k")
            .await;
        assert_eq!(retried.body["state"], "completed");
    }
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));
    app.audit().await.assert_clean();
}
