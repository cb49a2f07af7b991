//! Authorize at checkout, capture at shipment (`--capture-method manual`), on both stores,
//! through the simulator and through the Stripe client against the fake Stripe server: the
//! card is authorized at checkout (stock committed, order `authorized`), each shipment
//! captures what it ships, short lines go back to stock uncaptured, an order cancelled before
//! shipping releases its authorization, and an authorization that lapses at Stripe closes the
//! order. Every scenario ends with the audit (captured ≤ authorized, every capture a
//! shipment's).

use holdfast::payments::{signature, IntentStatus};
use holdfast::store::StoreKind;
use serde_json::{json, Value};

use crate::both_stores;
use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::helpers::{
    eventually, fetch_strings, spawn_app_with, AssertClean, Customer, Options, TestApp,
    ADMIN_TOKEN, WEBHOOK_SECRET,
};
use crate::saga::app_with_fake_stripe;
use crate::wholesale::buyer_of;

both_stores!(
    an_authorized_order_is_captured_shipment_by_shipment,
    a_short_shipment_releases_the_units_it_never_ships_and_never_captures_them,
    an_order_cancelled_before_shipping_releases_its_authorization_and_its_units,
    a_shipment_that_does_not_fit_the_order_is_refused_and_changes_nothing,
    an_authorization_that_lapsed_at_stripe_closes_the_order,
    the_authorization_worker_closes_an_order_before_its_authorization_lapses,
    manual_capture_through_the_stripe_client_captures_each_shipment_once,
    a_lapse_reported_by_stripe_through_the_stripe_client_closes_the_order,
    whole_refunds_racing_charge_refunded_never_refund_twice,
    partial_refunds_by_line_refund_those_units_and_restock_each_once,
    partial_refunds_of_a_shipped_order_never_pass_what_was_captured,
    a_partial_refund_that_does_not_fit_the_order_is_refused_and_changes_nothing,
    partial_refunds_racing_charge_refunded_settle_once_and_restock_once,
    a_dispute_holds_the_order_and_a_lost_one_leaves_it_refunded_by_dispute,
    a_won_dispute_gives_the_order_its_status_back,
    an_authorization_after_3d_secure_is_recorded_from_its_webhook,
    a_partial_refund_stripe_holds_pending_settles_from_its_event_once,
    a_partial_refund_stripe_fails_gives_its_units_back_to_refund,
    a_pending_partial_refund_whose_event_is_lost_is_read_again_by_recovery,
    an_order_paid_at_checkout_shows_its_total_authorized_and_captured,
    a_company_on_manual_capture_is_authorized_while_retail_is_charged_at_once,
    a_company_on_manual_capture_is_authorized_through_the_stripe_client,
    a_company_charged_at_checkout_in_a_manual_capture_shop_is_charged_at_once,
    a_company_with_an_unknown_capture_method_is_refused_and_nothing_changes,
    a_whole_refund_of_a_partly_shipped_order_closes_it_and_refunds_only_what_was_captured,
    a_whole_refund_of_a_partly_shipped_order_through_the_stripe_client_refunds_only_what_was_captured,
    a_whole_refund_of_an_order_shipped_short_refunds_what_was_captured_never_the_total,
    a_whole_refund_of_an_order_with_partial_refunds_refunds_the_rest,
    refunds_stripe_fails_are_reported_with_their_reason,
    refunds_stripe_fails_through_the_stripe_client_are_reported_with_their_reason,
    a_card_without_multicapture_refuses_a_shipment_that_is_not_the_last,
    a_card_without_multicapture_refuses_it_through_the_stripe_client,
);

/// Signs an event as Stripe does and delivers it to the app at `base`; answers the status.
async fn post_signed(client: &reqwest::Client, base: &str, payload: String) -> u16 {
    let header = signature::sign(
        payload.as_bytes(),
        WEBHOOK_SECRET,
        chrono::Utc::now().timestamp(),
    );
    client
        .post(format!("{base}/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("Stripe-Signature", header)
        .body(payload)
        .send()
        .await
        .expect("the webhook is answered")
        .status()
        .as_u16()
}

fn manual() -> Options {
    Options {
        manual_capture: true,
        ..Options::default()
    }
}

/// Two products (`A` 10.00 × 10 in stock, `B` 5.00 × 5) and a buyer who checked out 3 A and
/// 2 B with `pm_card_visa`: `(customer, checkout, order)`.
async fn authorized_order(app: &TestApp) -> (Customer, String, String) {
    app.new_product("cap-a", 1000, 10).await;
    app.new_product("cap-b", 500, 5).await;
    let (customer, checkout, order) = app
        .reserved_checkout("buyer", &[("cap-a", 3), ("cap-b", 2)])
        .await;
    let paid = app
        .complete(&customer, &checkout, "pm_card_visa", "pay-1")
        .await;
    paid.assert_status(200);
    assert_eq!(paid.str("state"), "completed", "{:?}", paid.body);
    (customer, checkout, order)
}

/// The order as the store holds it, in the shape of the admin's order view.
async fn admin_order(app: &TestApp, order: &str) -> Value {
    let stored = app
        .store
        .admin_order(holdfast::domain::OrderId::parse(order).expect("an order id"))
        .await
        .expect("the store answers")
        .expect("the order exists");
    let amounts = stored.amounts();
    json!({
        "status": stored.status.as_str(),
        "payment_intent_id": stored.payment_intent_id,
        "authorized": {"amount": amounts.authorized},
        "captured": {"amount": amounts.captured},
        "refunded": {"amount": amounts.refunded},
    })
}

/// The PaymentIntent as the app's gateway holds it.
async fn intent(app: &TestApp, id: &str) -> holdfast::payments::PaymentIntent {
    app.gateway
        .retrieve(id)
        .await
        .expect("the gateway knows it")
}

fn amount(order: &Value, field: &str) -> i64 {
    order[field]["amount"]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} missing in {order}"))
}

async fn ship(app: &TestApp, order: &str, body: Value) -> crate::helpers::Resp {
    app.admin_post(&format!("/v1/admin/orders/{order}/shipments"), body)
        .await
}

async fn topics(app: &TestApp, order: &str) -> Vec<String> {
    let mut topics = fetch_strings(
        app,
        &format!(
            "SELECT o.topic FROM outbox o WHERE o.payload LIKE '%\"order_id\":\"{order}\"%' \
             ORDER BY o.topic"
        ),
    )
    .await;
    topics.sort();
    topics
}

async fn an_authorized_order_is_captured_shipment_by_shipment(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;

    let authorized = admin_order(&app, &order).await;
    assert_eq!(authorized["status"], "authorized");
    assert_eq!(amount(&authorized, "authorized"), 4000);
    assert_eq!(amount(&authorized, "captured"), 0);
    // The reservation became a deduction: stock committed, nothing reserved.
    assert_eq!(app.stock_of("cap-a").await, (7, 0, 7));
    let intent_id = authorized["payment_intent_id"]
        .as_str()
        .expect("an intent")
        .to_owned();
    let held = intent(&app, &intent_id).await;
    assert_eq!(held.status, IntentStatus::RequiresCapture);
    assert_eq!((held.amount_capturable, held.amount_received), (4000, 0));

    let first = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}]}),
    )
    .await;
    first.assert_status(200);
    assert_eq!(first.str("status"), "partially_fulfilled");
    assert_eq!(amount(&first.body, "captured"), 2000);
    let part = intent(&app, &intent_id).await;
    assert_eq!(part.status, IntentStatus::RequiresCapture);
    assert_eq!((part.amount_capturable, part.amount_received), (2000, 2000));

    let rest = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}, {"sku": "cap-b", "quantity": 2}]}),
    )
    .await;
    rest.assert_status(200);
    assert_eq!(rest.str("status"), "fulfilled");
    assert_eq!(amount(&rest.body, "captured"), 4000);
    let done = intent(&app, &intent_id).await;
    assert_eq!(done.status, IntentStatus::Succeeded);
    assert_eq!((done.amount_capturable, done.amount_received), (0, 4000));

    // A fulfilled order takes no more shipments.
    ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    assert_eq!(
        topics(&app, &order).await,
        [
            "order.authorized",
            "order.shipment_captured",
            "order.shipment_captured"
        ]
    );
    assert_eq!(app.stock_of("cap-a").await, (7, 0, 7));
    assert_eq!(app.stock_of("cap-b").await, (3, 0, 3));
    app.audit().await.assert_clean();
}

async fn a_short_shipment_releases_the_units_it_never_ships_and_never_captures_them(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;

    let shipped = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}], "last": true}),
    )
    .await;

    shipped.assert_status(200);
    assert_eq!(shipped.str("status"), "fulfilled");
    assert_eq!(amount(&shipped.body, "captured"), 2000);
    assert_eq!(amount(&shipped.body, "authorized"), 4000);
    // One A and both B were short: back on the shelf.
    assert_eq!(app.stock_of("cap-a").await, (8, 0, 8));
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5));
    let intent = intent(&app, &shipped.str("payment_intent_id")).await;
    assert_eq!(intent.status, IntentStatus::Succeeded);
    assert_eq!(
        (intent.amount_capturable, intent.amount_received),
        (0, 2000)
    );
    app.audit().await.assert_clean();
}

async fn an_order_cancelled_before_shipping_releases_its_authorization_and_its_units(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;

    let cancelled = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;

    cancelled.assert_status(200);
    assert_eq!(cancelled.str("status"), "cancelled");
    assert_eq!(amount(&cancelled.body, "captured"), 0);
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5));
    let sim = app.simulator.clone().expect("the simulator");
    let intent = intent(&app, &cancelled.str("payment_intent_id")).await;
    assert_eq!(intent.status, IntentStatus::Canceled);
    assert_eq!(intent.amount_received, 0);
    assert!(sim.ledger().refunds.is_empty(), "nothing to refund");
    app.audit().await.assert_clean();
}

async fn a_shipment_that_does_not_fit_the_order_is_refused_and_changes_nothing(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;
    let before = (
        app.inventory_snapshot().await,
        admin_order(&app, &order).await,
    );
    let cases = [
        (
            json!({"lines": [{"sku": "cap-x", "quantity": 1}]}),
            422,
            "invalid_shipment",
            "a SKU not of the order",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 4}]}),
            422,
            "invalid_shipment",
            "more units than ordered",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 2}, {"sku": "cap-a", "quantity": 2}]}),
            422,
            "invalid_shipment",
            "one SKU twice, more than ordered together",
        ),
        (
            json!({"lines": []}),
            422,
            "invalid_shipment",
            "nothing to ship",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 0}]}),
            422,
            "validation_failed",
            "a quantity of zero",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 1}], "extra": 1}),
            422,
            "validation_failed",
            "an unknown field",
        ),
    ];
    for (body, status, code, what) in cases {
        let resp = ship(&app, &order, body).await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (status, code),
            "{what}: {:?}",
            resp.body
        );
    }
    assert_eq!(
        (
            app.inventory_snapshot().await,
            admin_order(&app, &order).await
        ),
        before
    );
    let intent = intent(
        &app,
        before.1["payment_intent_id"].as_str().expect("an intent"),
    )
    .await;
    assert_eq!(intent.amount_received, 0, "nothing captured");
    app.audit().await.assert_clean();
}

async fn an_authorization_that_lapsed_at_stripe_closes_the_order(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;
    let first = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 1}]}),
    )
    .await;
    first.assert_status(200);
    let sim = app.simulator.clone().expect("the simulator");

    // Seven days on, Stripe cancels the authorization; its webhook arrives.
    sim.lapse(&first.str("payment_intent_id"))
        .expect("an authorization to lapse");

    eventually(10, "the lapsed order is closed", || async {
        admin_order(&app, &order).await["status"] == "fulfilled"
    })
    .await;
    let closed = admin_order(&app, &order).await;
    assert_eq!(amount(&closed, "captured"), 500);
    // What never shipped is back on the shelf.
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (4, 0, 4));
    app.audit().await.assert_clean();
}

async fn the_authorization_worker_closes_an_order_before_its_authorization_lapses(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..manual()
        },
    )
    .await;
    let (_, _, order) = authorized_order(&app).await;
    app.recovery.tick().await.expect("a recovery tick");
    assert_eq!(admin_order(&app, &order).await["status"], "authorized");

    app.advance(chrono::Duration::days(6) + chrono::Duration::minutes(1));
    app.recovery.tick().await.expect("a recovery tick");

    let closed = admin_order(&app, &order).await;
    assert_eq!(closed["status"], "cancelled");
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    let intent = intent(
        &app,
        closed["payment_intent_id"].as_str().expect("an intent"),
    )
    .await;
    assert_eq!(intent.status, IntentStatus::Canceled);
    // Workers are off on a manual clock: the relay publishes when told.
    app.relay.tick().await.expect("a relay tick");
    app.audit().await.assert_clean();
}

async fn manual_capture_through_the_stripe_client_captures_each_shipment_once(kind: StoreKind) {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..manual()
        },
    )
    .await;
    let (_, checkout, order) = authorized_order(&app).await;
    let checkout = holdfast::domain::CheckoutId::parse(&checkout).expect("a checkout id");
    assert_eq!(admin_order(&app, &order).await["status"], "authorized");
    assert_eq!(fake.captured_for(checkout), 0);

    ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 3}]}),
    )
    .await
    .assert_status(200);
    assert_eq!(fake.captured_for(checkout), 3000);
    let rest = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 2}]}),
    )
    .await;

    rest.assert_status(200);
    assert_eq!(rest.str("status"), "fulfilled");
    assert_eq!(fake.captured_for(checkout), 4000);
    assert_eq!(fake.captures_for(checkout), 2);
    assert_eq!(fake.charges_for(checkout), 1);
    app.audit().await.assert_clean();
}

async fn an_order_paid_at_checkout_shows_its_total_authorized_and_captured(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;

    let paid = admin_order(&app, &order).await;

    assert_eq!(paid["status"], "paid");
    assert_eq!(amount(&paid, "authorized"), 4000);
    assert_eq!(amount(&paid, "captured"), 4000);
    assert_eq!(amount(&paid, "refunded"), 0);
    // Lines on a paid order are not a manual-capture shipment.
    ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    app.audit().await.assert_clean();
}

async fn a_lapse_reported_by_stripe_through_the_stripe_client_closes_the_order(kind: StoreKind) {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..manual()
        },
    )
    .await;
    let (_, checkout, order) = authorized_order(&app).await;
    let intent_id = admin_order(&app, &order).await["payment_intent_id"]
        .as_str()
        .expect("an intent")
        .to_owned();
    assert_eq!(
        fake.lapse(holdfast::domain::CheckoutId::parse(&checkout).expect("a checkout id")),
        1
    );

    // Stripe tells the shop: `payment_intent.canceled`, signed; a repeat changes nothing.
    let payload = json!({
        "id": format!("evt_lapse_{checkout}"), "object": "event",
        "type": "payment_intent.canceled", "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": intent_id, "object": "payment_intent", "amount": 4000, "currency": "eur",
            "status": "canceled", "cancellation_reason": "automatic", "client_secret": null,
            "created": 0, "metadata": {"checkout_id": checkout, "order_id": order},
            "last_payment_error": null
        }}
    })
    .to_string();
    for _ in 0..2 {
        let status = post_signed(&app.client, &app.base, payload.clone()).await;
        assert_eq!(status, 200);
    }

    let closed = admin_order(&app, &order).await;
    assert_eq!(closed["status"], "cancelled");
    assert_eq!(amount(&closed, "captured"), 0);
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5));
    app.audit().await.assert_clean();
}

/// The admin's whole refund and Stripe's `charge.refunded` for the same payments, released
/// together order by order: the admin call locks the order then the checkout, the event the
/// checkout then the order, unless both take them in one order.
async fn whole_refunds_racing_charge_refunded_never_refund_twice(kind: StoreKind) {
    const ORDERS: usize = 48;
    let app = spawn_app_with(kind, Options::default()).await;
    app.new_product("race-a", 900, 100).await;
    let mut paid = Vec::with_capacity(ORDERS);
    for i in 0..ORDERS {
        let (customer, checkout, order) = app
            .reserved_checkout(&format!("racer {i}"), &[("race-a", 1)])
            .await;
        let done = app
            .complete(&customer, &checkout, "pm_card_visa", &format!("pay-{i}"))
            .await;
        done.assert_status(200);
        let stored = admin_order(&app, &order).await;
        let intent = stored["payment_intent_id"]
            .as_str()
            .expect("an intent")
            .to_owned();
        paid.push((order, intent));
    }
    assert_eq!(
        app.stock_of("race-a").await,
        (100 - ORDERS as i64, 0, 100 - ORDERS as i64)
    );

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2 * ORDERS));
    let mut tasks = Vec::new();
    for (i, (order, intent)) in paid.iter().cloned().enumerate() {
        let (app_base, client) = (app.base.clone(), app.client.clone());
        let gate = barrier.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let resp = client
                .post(format!("{app_base}/v1/admin/orders/{order}/refund"))
                .bearer_auth(crate::helpers::ADMIN_TOKEN)
                .json(&json!({}))
                .send()
                .await
                .expect("an answer");
            ("admin", resp.status().as_u16())
        }));
        let event = crate::saga::refund_event(&format!("evt_race_{i}"), &intent, 900, 900);
        let gate = barrier.clone();
        let header_app = (app.base.clone(), app.client.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            (
                "webhook",
                post_signed(&header_app.1, &header_app.0, event).await,
            )
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("the task ends"));
    }

    // Every call answered without a server error: the admin's refund (200/202) or, once the
    // event recorded the refund first, 409; the event 2xx.
    for (who, status) in &answers {
        match *who {
            "admin" => assert!(
                matches!(status, 200 | 202 | 409),
                "admin {status}: {answers:?}"
            ),
            _ => assert!((200..300).contains(status), "webhook {status}: {answers:?}"),
        }
    }
    for (order, _) in &paid {
        assert_eq!(admin_order(&app, order).await["status"], "refunded");
    }
    // Each sold unit back on the shelf exactly once.
    assert_eq!(app.stock_of("race-a").await, (100, 0, 100));
    let sim = app.simulator.clone().expect("the simulator");
    for (_, intent) in &paid {
        assert!(
            sim.ledger().refunded(intent) <= 900,
            "refunded at most once"
        );
    }
    app.audit().await.assert_clean();
}

/// PostgreSQL, where rows are locked: `charge.refunded` (`record_refunded`) locks the checkout,
/// then its order. An admin refund arriving meanwhile must take them in the same order;
/// taking the order first deadlocks the two (one of them aborted by the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_refund_locks_the_checkout_before_the_order_as_charge_refunded_does() {
    let app = spawn_app_with(StoreKind::Postgres, Options::default()).await;
    app.new_product("lock-a", 900, 10).await;
    let (customer, checkout, order) = app.reserved_checkout("locker", &[("lock-a", 1)]).await;
    app.complete(&customer, &checkout, "pm_card_visa", "pay-lock")
        .await
        .assert_status(200);
    let order_id = holdfast::domain::OrderId::parse(&order).expect("an order id");
    let pool = sqlx::PgPool::connect(app.database_url.as_deref().expect("a database"))
        .await
        .expect("connect");

    // The event's transaction holds the checkout, as `record_refunded` does first.
    let mut event = pool.begin().await.expect("a transaction");
    sqlx::query("SELECT id FROM checkouts WHERE order_id = $1 FOR UPDATE")
        .bind(order_id.uuid())
        .fetch_one(&mut *event)
        .await
        .expect("the checkout row");
    let store = app.store.clone();
    let now = app.clock.now();
    let admin = tokio::spawn(async move { store.request_refund(order_id, now).await });
    let mut waiting = false;
    for _ in 0..200 {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("pg_stat_activity");
        if blocked > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(waiting, "the admin refund waits for the checkout's lock");

    // Then the event takes the order, as `record_refunded` does next.
    let order_lock = sqlx::query("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
        .bind(order_id.uuid())
        .fetch_one(&mut *event)
        .await;
    assert!(
        order_lock.is_ok(),
        "the event gets the order: {order_lock:?}"
    );
    event.commit().await.expect("the event commits");
    let refunded = admin.await.expect("the admin task ends");
    assert!(
        refunded.is_ok(),
        "the admin refund goes through: {refunded:?}"
    );
}

async fn refund_lines(app: &TestApp, order: &str, body: Value) -> crate::helpers::Resp {
    app.admin_post(&format!("/v1/admin/orders/{order}/refunds"), body)
        .await
}

async fn partial_refunds_by_line_refund_those_units_and_restock_each_once(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;
    assert_eq!(app.stock_of("cap-a").await, (7, 0, 7));

    let first = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": true}),
    )
    .await;

    first.assert_status(200);
    assert_eq!(first.str("status"), "paid");
    assert_eq!(amount(&first.body, "refunded"), 1000);
    assert_eq!(app.stock_of("cap-a").await, (8, 0, 8));
    let sim = app.simulator.clone().expect("the simulator");
    let intent = first.str("payment_intent_id");
    assert_eq!(sim.ledger().refunded(&intent), 1000);

    // The rest, without restocking: the order is refunded, the shelf unchanged.
    let rest = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}, {"sku": "cap-b", "quantity": 2}]}),
    )
    .await;
    rest.assert_status(200);
    assert_eq!(rest.str("status"), "refunded");
    assert_eq!(amount(&rest.body, "refunded"), 4000);
    assert_eq!(sim.ledger().refunded(&intent), 4000);
    assert_eq!(app.stock_of("cap-a").await, (8, 0, 8));
    assert_eq!(app.stock_of("cap-b").await, (3, 0, 3));

    // Nothing is left to refund.
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": true}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    eventually(10, "the refund events are published", || async {
        topics(&app, &order)
            .await
            .iter()
            .filter(|t| *t == "order.refunded")
            .count()
            == 2
    })
    .await;
    app.audit().await.assert_clean();
}

async fn partial_refunds_of_a_shipped_order_never_pass_what_was_captured(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;
    ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}]}),
    )
    .await
    .assert_status(200);

    // Only shipped (captured) units can be refunded.
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 1}]}),
    )
    .await
    .assert_error(422, "invalid_refund");
    let refunded = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}], "restock": true}),
    )
    .await;

    refunded.assert_status(200);
    assert_eq!(amount(&refunded.body, "captured"), 2000);
    assert_eq!(amount(&refunded.body, "refunded"), 2000);
    assert_eq!(app.stock_of("cap-a").await, (9, 0, 9));
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await
    .assert_error(422, "invalid_refund");
    app.audit().await.assert_clean();
}

async fn a_partial_refund_that_does_not_fit_the_order_is_refused_and_changes_nothing(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;
    let before = (
        app.inventory_snapshot().await,
        admin_order(&app, &order).await,
    );
    let cases = [
        (
            json!({"lines": [{"sku": "cap-x", "quantity": 1}]}),
            422,
            "invalid_refund",
            "a SKU not of the order",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 4}]}),
            422,
            "invalid_refund",
            "more units than ordered",
        ),
        (
            json!({"lines": []}),
            422,
            "invalid_refund",
            "nothing to refund",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 0}]}),
            422,
            "validation_failed",
            "a quantity of zero",
        ),
        (
            json!({"restock": true}),
            422,
            "validation_failed",
            "no lines",
        ),
        (
            json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": "yes"}),
            422,
            "validation_failed",
            "restock not a boolean",
        ),
    ];
    for (body, status, code, what) in cases {
        let resp = refund_lines(&app, &order, body).await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (status, code),
            "{what}: {:?}",
            resp.body
        );
    }
    assert_eq!(
        (
            app.inventory_snapshot().await,
            admin_order(&app, &order).await
        ),
        before
    );
    let sim = app.simulator.clone().expect("the simulator");
    assert!(sim.ledger().refunds.is_empty(), "nothing refunded");
    app.audit().await.assert_clean();
}

/// Partial refunds racing Stripe's `charge.refunded` reporting them (`amount_refunded`),
/// order by order: whichever is recorded first, each refund settles once and its units come
/// back to stock once.
async fn partial_refunds_racing_charge_refunded_settle_once_and_restock_once(kind: StoreKind) {
    const ORDERS: usize = 24;
    let app = spawn_app_with(kind, Options::default()).await;
    app.new_product("prace-a", 700, 100).await;
    let mut paid = Vec::with_capacity(ORDERS);
    for i in 0..ORDERS {
        let (customer, checkout, order) = app
            .reserved_checkout(&format!("partial racer {i}"), &[("prace-a", 2)])
            .await;
        app.complete(&customer, &checkout, "pm_card_visa", &format!("pay-{i}"))
            .await
            .assert_status(200);
        let intent = admin_order(&app, &order).await["payment_intent_id"]
            .as_str()
            .expect("an intent")
            .to_owned();
        paid.push((order, intent));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2 * ORDERS));
    let mut tasks = Vec::new();
    for (i, (order, intent)) in paid.iter().cloned().enumerate() {
        let (base, client) = (app.base.clone(), app.client.clone());
        let gate = barrier.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let resp = client
                .post(format!("{base}/v1/admin/orders/{order}/refunds"))
                .bearer_auth(crate::helpers::ADMIN_TOKEN)
                .json(&json!({"lines": [{"sku": "prace-a", "quantity": 1}], "restock": true}))
                .send()
                .await
                .expect("an answer");
            ("admin", resp.status().as_u16())
        }));
        let event = crate::saga::refund_event(&format!("evt_prace_{i}"), &intent, 1400, 700);
        let (base, client) = (app.base.clone(), app.client.clone());
        let gate = barrier.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            ("webhook", post_signed(&client, &base, event).await)
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("the task ends"));
    }

    for (who, status) in &answers {
        match *who {
            "admin" => assert_eq!(*status, 200, "{answers:?}"),
            _ => assert!((200..300).contains(status), "webhook {status}: {answers:?}"),
        }
    }
    let sim = app.simulator.clone().expect("the simulator");
    for (order, intent) in &paid {
        let now = admin_order(&app, order).await;
        assert_eq!(now["status"], "paid");
        assert_eq!(amount(&now, "refunded"), 700, "{order}");
        assert_eq!(
            sim.ledger().refunded(intent),
            700,
            "refunded once at the gateway"
        );
    }
    // One unit of each order back on the shelf, once.
    let back = 100 - ORDERS as i64;
    assert_eq!(app.stock_of("prace-a").await, (back, 0, back));
    app.audit().await.assert_clean();
}

/// A `charge.dispute.*` event as Stripe sends it, signed and delivered; answers the status.
async fn dispute(app: &TestApp, event_id: &str, kind: &str, intent: &str, status: &str) -> u16 {
    let payload = json!({
        "id": event_id, "object": "event", "type": kind,
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": format!("dp_of_{intent}"), "object": "dispute", "amount": 4000,
            "currency": "eur", "charge": format!("ch_of_{intent}"), "payment_intent": intent,
            "reason": "fraudulent", "status": status
        }}
    })
    .to_string();
    post_signed(&app.client, &app.base, payload).await
}

async fn a_dispute_holds_the_order_and_a_lost_one_leaves_it_refunded_by_dispute(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    let (_, _, order) = authorized_order(&app).await;
    let shipped = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await;
    shipped.assert_status(200);
    let intent = shipped.str("payment_intent_id");

    let created = dispute(
        &app,
        "evt_dp_1",
        "charge.dispute.created",
        &intent,
        "needs_response",
    );
    assert_eq!(created.await, 200);
    // Stripe may deliver it again.
    assert_eq!(
        dispute(
            &app,
            "evt_dp_1b",
            "charge.dispute.created",
            &intent,
            "needs_response"
        )
        .await,
        200
    );

    assert_eq!(admin_order(&app, &order).await["status"], "disputed");
    // The warehouse is told to stop, once; no shipment goes out while disputed.
    eventually(10, "the hold event is written", || async {
        topics(&app, &order)
            .await
            .iter()
            .filter(|t| *t == "order.disputed")
            .count()
            == 1
    })
    .await;
    ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await
    .assert_error(409, "invalid_order_state");
    let ops = app
        .get("/v1/admin/ops", Some(crate::helpers::ADMIN_TOKEN))
        .await;
    ops.assert_status(200);
    assert_eq!(ops.body["disputed_orders"], json!([order]));

    let stock_before = app.stock_of("cap-a").await;
    assert_eq!(
        dispute(&app, "evt_dp_2", "charge.dispute.closed", &intent, "lost").await,
        200
    );
    let lost = admin_order(&app, &order).await;
    assert_eq!(lost["status"], "refunded_by_dispute");
    assert_eq!(app.stock_of("cap-a").await, stock_before, "stock untouched");
    // A late `created` does not reopen it.
    assert_eq!(
        dispute(
            &app,
            "evt_dp_3",
            "charge.dispute.created",
            &intent,
            "needs_response"
        )
        .await,
        200
    );
    assert_eq!(
        admin_order(&app, &order).await["status"],
        "refunded_by_dispute"
    );
    app.audit().await.assert_clean();
}

async fn a_won_dispute_gives_the_order_its_status_back(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;
    let intent = admin_order(&app, &order).await["payment_intent_id"]
        .as_str()
        .expect("an intent")
        .to_owned();

    assert_eq!(
        dispute(
            &app,
            "evt_w_1",
            "charge.dispute.created",
            &intent,
            "needs_response"
        )
        .await,
        200
    );
    assert_eq!(admin_order(&app, &order).await["status"], "disputed");
    assert_eq!(
        dispute(&app, "evt_w_2", "charge.dispute.closed", &intent, "won").await,
        200
    );

    assert_eq!(admin_order(&app, &order).await["status"], "paid");
    app.audit().await.assert_clean();
}

async fn an_authorization_after_3d_secure_is_recorded_from_its_webhook(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    app.new_product("cap-a", 1000, 10).await;
    let (customer, checkout, order) = app.reserved_checkout("secure", &[("cap-a", 2)]).await;
    let waiting = app
        .complete(
            &customer,
            &checkout,
            "pm_card_authenticationRequired",
            "pay-3ds",
        )
        .await;
    waiting.assert_status(200);
    assert_eq!(waiting.str("state"), "requires_action");
    let intent_id = admin_order(&app, &order).await["payment_intent_id"]
        .as_str()
        .expect("an intent")
        .to_owned();

    // The customer passes 3-D Secure: Stripe holds the funds and says so by webhook.
    let sim = app.simulator.clone().expect("the simulator");
    let held = sim
        .authenticate(&intent_id, true)
        .expect("an authentication");
    assert_eq!(held.status, IntentStatus::RequiresCapture);

    eventually(10, "the authorization is recorded", || async {
        admin_order(&app, &order).await["status"] == "authorized"
    })
    .await;
    assert_eq!(amount(&admin_order(&app, &order).await, "authorized"), 2000);
    assert_eq!(app.stock_of("cap-a").await, (8, 0, 8));
    app.audit().await.assert_clean();
}

/// A signed `refund.updated` event for a refund now at `status`.
async fn refund_updated(app: &TestApp, refund: &holdfast::payments::Refund, status: &str) -> u16 {
    let payload = json!({
        "id": format!("evt_ru_{}_{status}", refund.id), "object": "event", "type": "refund.updated",
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": refund.id, "object": "refund", "amount": refund.amount, "currency": "eur",
            "payment_intent": refund.payment_intent_id, "status": status
        }}
    })
    .to_string();
    post_signed(&app.client, &app.base, payload).await
}

async fn a_partial_refund_stripe_holds_pending_settles_from_its_event_once(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;
    let sim = app.simulator.clone().expect("the simulator");
    sim.answer_refunds_with(Some("pending"));

    let asked = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 2}], "restock": true}),
    )
    .await;

    asked.assert_status(202);
    assert_eq!(amount(&asked.body, "refunded"), 0);
    assert_eq!(
        app.stock_of("cap-b").await,
        (3, 0, 3),
        "nothing back before Stripe settles"
    );
    // The units are held: a second refund of them is refused meanwhile.
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 1}]}),
    )
    .await
    .assert_error(422, "invalid_refund");
    let refund = sim.ledger().refunds.last().cloned().expect("a refund");
    for _ in 0..2 {
        assert_eq!(refund_updated(&app, &refund, "succeeded").await, 200);
    }
    let settled = admin_order(&app, &order).await;
    assert_eq!(amount(&settled, "refunded"), 1000);
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5), "restocked once");
    app.audit().await.assert_clean();
}

async fn a_partial_refund_stripe_fails_gives_its_units_back_to_refund(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let (_, _, order) = authorized_order(&app).await;
    let sim = app.simulator.clone().expect("the simulator");
    sim.answer_refunds_with(Some("failed"));

    let failed = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 3}], "restock": true}),
    )
    .await;

    failed.assert_status(200);
    assert_eq!(amount(&failed.body, "refunded"), 0);
    assert_eq!(app.stock_of("cap-a").await, (7, 0, 7));
    // Stripe kept the money: the units may be refunded again.
    sim.answer_refunds_with(Some("succeeded"));
    let again = refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 3}]}),
    )
    .await;
    again.assert_status(200);
    assert_eq!(amount(&again.body, "refunded"), 3000);
    app.audit().await.assert_clean();
}

async fn a_pending_partial_refund_whose_event_is_lost_is_read_again_by_recovery(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    let (_, _, order) = authorized_order(&app).await;
    let sim = app.simulator.clone().expect("the simulator");
    sim.answer_refunds_with(Some("pending"));
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": true}),
    )
    .await
    .assert_status(202);
    // Still pending at Stripe: recovery reads it again and it waits on.
    app.advance(chrono::Duration::minutes(2));
    app.recovery.tick().await.expect("a recovery tick");
    assert_eq!(amount(&admin_order(&app, &order).await, "refunded"), 0);

    // Stripe settles it; its event never arrives.
    let refund_id = sim.ledger().refunds.last().expect("a refund").id.clone();
    sim.settle_refund(&refund_id, "succeeded");
    app.advance(chrono::Duration::minutes(2));
    app.recovery.tick().await.expect("a recovery tick");
    app.recovery.tick().await.expect("a recovery tick");

    assert_eq!(amount(&admin_order(&app, &order).await, "refunded"), 1000);
    assert_eq!(app.stock_of("cap-a").await, (8, 0, 8), "restocked once");
    app.relay.tick().await.expect("a relay tick");
    app.audit().await.assert_clean();
}

/// A prepaid company, with `capture_method` when given: its id.
async fn company_capturing(app: &TestApp, capture_method: Option<&str>) -> String {
    let mut body = json!({"name": "Acme Hotels", "currency": "EUR", "payment_terms": "prepaid",
                          "credit_limit": 0});
    if let Some(method) = capture_method {
        body["capture_method"] = json!(method);
    }
    let resp = app.admin_post("/v1/admin/companies", body).await;
    resp.assert_status(201);
    resp.str("id")
}

/// `(capture_method, capture_method_source)` as the company's GET shows them.
async fn company_capture(app: &TestApp, company: &str) -> (String, String) {
    let shown = app
        .get(&format!("/v1/admin/companies/{company}"), Some(ADMIN_TOKEN))
        .await;
    shown.assert_status(200);
    (
        shown.str("capture_method"),
        shown.str("capture_method_source"),
    )
}

/// The customer buys 2 `cap-a` (10.00 each) with `pm_card_visa`: the order id.
async fn bought(app: &TestApp, customer: &Customer, key: &str) -> String {
    let cart = app.new_cart(customer).await;
    app.set_line(customer, &cart, "cap-a", 2)
        .await
        .assert_status(200);
    let started = app.start_checkout(customer, &cart).await;
    started.assert_status(201);
    let paid = app
        .complete(customer, &started.str("id"), "pm_card_visa", key)
        .await;
    paid.assert_status(200);
    assert_eq!(paid.str("state"), "completed", "{:?}", paid.body);
    started.str("order_id")
}

/// The order is `authorized` for 20.00 with nothing captured, its PaymentIntent holding it.
async fn assert_authorized(app: &TestApp, order: &str) {
    let shown = admin_order(app, order).await;
    assert_eq!(shown["status"], "authorized", "{shown}");
    assert_eq!(amount(&shown, "authorized"), 2000);
    assert_eq!(amount(&shown, "captured"), 0);
    let pi = shown["payment_intent_id"].as_str().expect("an intent");
    assert_eq!(intent(app, pi).await.status, IntentStatus::RequiresCapture);
}

/// The order is `paid`: 20.00 charged at checkout, its PaymentIntent succeeded.
async fn assert_charged(app: &TestApp, order: &str) {
    let shown = admin_order(app, order).await;
    assert_eq!(shown["status"], "paid", "{shown}");
    assert_eq!(amount(&shown, "captured"), 2000);
    let pi = shown["payment_intent_id"].as_str().expect("an intent");
    assert_eq!(intent(app, pi).await.status, IntentStatus::Succeeded);
}

/// In a shop charging at checkout: a buyer of a company on manual capture is authorized and
/// captured by the shipment; a retail customer and a buyer of a company without a setting of
/// its own are charged at once.
async fn company_on_manual_capture_in_an_automatic_shop(app: &TestApp) {
    app.new_product("cap-a", 1000, 10).await;
    let manual_company = company_capturing(app, Some("manual")).await;
    let following = company_capturing(app, None).await;
    assert_eq!(
        company_capture(app, &manual_company).await,
        ("manual".to_owned(), "company".to_owned())
    );
    assert_eq!(
        company_capture(app, &following).await,
        ("automatic".to_owned(), "shop".to_owned())
    );
    let wholesale = buyer_of(app, &manual_company, "Bea").await;
    let other = buyer_of(app, &following, "Cy").await;
    let retail = app.new_customer("Ada").await;

    let held = bought(app, &wholesale, "pay-w").await;
    let charged = bought(app, &retail, "pay-r").await;
    let charged_too = bought(app, &other, "pay-o").await;

    assert_authorized(app, &held).await;
    assert_charged(app, &charged).await;
    assert_charged(app, &charged_too).await;
    let shipped = ship(
        app,
        &held,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}]}),
    )
    .await;
    shipped.assert_status(200);
    assert_eq!(shipped.str("status"), "fulfilled");
    assert_eq!(amount(&admin_order(app, &held).await, "captured"), 2000);
    app.audit().await.assert_clean();
}

async fn a_company_on_manual_capture_is_authorized_while_retail_is_charged_at_once(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, Options::default()).await;
    company_on_manual_capture_in_an_automatic_shop(&app).await;
}

async fn a_company_on_manual_capture_is_authorized_through_the_stripe_client(kind: StoreKind) {
    let (app, _fake) = app_with_fake_stripe(kind, Options::default()).await;
    company_on_manual_capture_in_an_automatic_shop(&app).await;
}

async fn a_company_charged_at_checkout_in_a_manual_capture_shop_is_charged_at_once(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, manual()).await;
    app.new_product("cap-a", 1000, 10).await;
    let automatic = company_capturing(&app, Some("automatic")).await;
    let following = company_capturing(&app, None).await;
    assert_eq!(
        company_capture(&app, &following).await,
        ("manual".to_owned(), "shop".to_owned())
    );
    let buyer = buyer_of(&app, &automatic, "Bea").await;
    let retail = app.new_customer("Ada").await;

    let charged = bought(&app, &buyer, "pay-b").await;
    let held = bought(&app, &retail, "pay-r").await;

    assert_charged(&app, &charged).await;
    assert_authorized(&app, &held).await;
    app.audit().await.assert_clean();
}

async fn a_company_with_an_unknown_capture_method_is_refused_and_nothing_changes(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let count = "SELECT CAST(COUNT(*) AS TEXT) FROM companies";
    let before = fetch_strings(&app, count).await;
    let cases = [
        (json!("later"), "an unknown method"),
        (json!("Manual"), "another spelling"),
        (json!(""), "empty"),
    ];
    for (method, what) in cases {
        let resp = app
            .admin_post(
                "/v1/admin/companies",
                json!({"name": "Acme", "currency": "EUR", "payment_terms": "prepaid",
                       "credit_limit": 0, "capture_method": method}),
            )
            .await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{what}");
    }
    assert_eq!(
        fetch_strings(&app, count).await,
        before,
        "nothing was opened"
    );
}

/// A manual-capture order of 3 A and 2 B (40.00): 2 A shipped (20.00 captured), 1 A refunded
/// and restocked; then the whole refund. `refunded_at_gateway` reads the gateway's ledger.
async fn whole_refund_of_a_partly_shipped_order(
    app: &TestApp,
    refunded_at_gateway: impl Fn(&str) -> i64,
) {
    let (_, _, order) = authorized_order(app).await;
    ship(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 2}]}),
    )
    .await
    .assert_status(200);
    refund_lines(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": true}),
    )
    .await
    .assert_status(200);
    let intent_id = admin_order(app, &order).await["payment_intent_id"]
        .as_str()
        .expect("an intent")
        .to_owned();
    assert_eq!(refunded_at_gateway(&intent_id), 1000);

    let whole = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;

    whole.assert_status(200);
    assert_eq!(whole.str("status"), "refunded", "{:?}", whole.body);
    assert_eq!(amount(&whole.body, "captured"), 2000);
    assert_eq!(amount(&whole.body, "refunded"), 2000);
    assert_eq!(
        refunded_at_gateway(&intent_id),
        2000,
        "never more than captured"
    );
    let closed = intent(app, &intent_id).await;
    assert_ne!(
        closed.status,
        IntentStatus::RequiresCapture,
        "the hold is released"
    );
    // Every unit is back: the one never shipped, both B short, the two shipped ones refunded.
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5));
    // Once refunded, nothing more.
    app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await
        .assert_error(409, "invalid_order_state");
    assert_eq!(refunded_at_gateway(&intent_id), 2000);
    app.audit().await.assert_clean();
}

async fn a_whole_refund_of_a_partly_shipped_order_closes_it_and_refunds_only_what_was_captured(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, manual()).await;
    let sim = app.simulator.clone().expect("the simulator");
    whole_refund_of_a_partly_shipped_order(&app, |pi| sim.ledger().refunded(pi)).await;
}

async fn a_whole_refund_of_a_partly_shipped_order_through_the_stripe_client_refunds_only_what_was_captured(
    kind: StoreKind,
) {
    let (app, fake) = app_with_fake_stripe(kind, manual()).await;
    whole_refund_of_a_partly_shipped_order(&app, |pi| fake.refunded(pi)).await;
}

async fn a_whole_refund_of_an_order_shipped_short_refunds_what_was_captured_never_the_total(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, manual()).await;
    let sim = app.simulator.clone().expect("the simulator");
    let (_, _, order) = authorized_order(&app).await;
    let shipped = ship(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 3}], "last": true}),
    )
    .await;
    shipped.assert_status(200);
    assert_eq!(shipped.str("status"), "fulfilled");

    let whole = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;

    whole.assert_status(200);
    assert_eq!(whole.str("status"), "refunded");
    assert_eq!(amount(&whole.body, "refunded"), 3000);
    assert_eq!(sim.ledger().refunded(&whole.str("payment_intent_id")), 3000);
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (5, 0, 5));
    app.audit().await.assert_clean();
}

async fn a_whole_refund_of_an_order_with_partial_refunds_refunds_the_rest(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let sim = app.simulator.clone().expect("the simulator");
    let (_, _, order) = authorized_order(&app).await;
    refund_lines(
        &app,
        &order,
        json!({"lines": [{"sku": "cap-b", "quantity": 1}]}),
    )
    .await
    .assert_status(200);

    let whole = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;

    whole.assert_status(200);
    assert_eq!(whole.str("status"), "refunded", "{:?}", whole.body);
    assert_eq!(amount(&whole.body, "refunded"), 4000);
    let intent_id = whole.str("payment_intent_id");
    assert_eq!(
        sim.ledger().refunded(&intent_id),
        4000,
        "the rest, not the total again"
    );
    // The rest goes back on the shelf; the unit refunded without restocking stays out.
    assert_eq!(app.stock_of("cap-a").await, (10, 0, 10));
    assert_eq!(app.stock_of("cap-b").await, (4, 0, 4));
    app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await
        .assert_error(409, "invalid_order_state");
    assert_eq!(sim.ledger().refunded(&intent_id), 4000);
    app.audit().await.assert_clean();
}

/// Stripe fails a partial refund and then a whole one (`answer_refunds_with` sets how the
/// gateway answers new refunds): each answer says `refund_status: "failed"` and why, the
/// money and the units stay where they were, and the refund can be asked for again.
async fn failed_refunds_are_reported(app: &TestApp, answer_refunds_with: impl Fn(Option<&str>)) {
    let (_, _, order) = authorized_order(app).await;
    let (other, checkout, whole_only) = app.reserved_checkout("other", &[("cap-a", 1)]).await;
    app.complete(&other, &checkout, "pm_card_visa", "pay-2")
        .await
        .assert_status(200);
    answer_refunds_with(Some("failed"));

    // An order without partial refunds, refunded whole.
    let alone = app
        .admin_post(&format!("/v1/admin/orders/{whole_only}/refund"), json!({}))
        .await;
    let partial = refund_lines(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}], "restock": true}),
    )
    .await;
    let whole = app
        .admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await;

    for (answer, what) in [
        (&alone, "whole, alone"),
        (&partial, "partial"),
        (&whole, "whole, after a partial one"),
    ] {
        answer.assert_status(200);
        assert_eq!(
            answer.str("refund_status"),
            "failed",
            "{what}: {:?}",
            answer.body
        );
        assert_eq!(
            answer.str("refund_failure_reason"),
            "expired_or_canceled_card",
            "{what}"
        );
        assert_eq!(answer.str("status"), "paid", "{what}");
        assert_eq!(amount(&answer.body, "refunded"), 0, "{what}");
    }
    assert_eq!(app.stock_of("cap-a").await, (6, 0, 6));
    answer_refunds_with(Some("succeeded"));
    let again = refund_lines(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await;
    again.assert_status(200);
    assert_eq!(again.str("refund_status"), "succeeded");
    assert!(
        again.body.get("refund_failure_reason").is_none(),
        "{:?}",
        again.body
    );
    assert_eq!(amount(&again.body, "refunded"), 1000);
    app.audit().await.assert_clean();
}

async fn refunds_stripe_fails_are_reported_with_their_reason(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    let sim = app.simulator.clone().expect("the simulator");
    failed_refunds_are_reported(&app, |status| sim.answer_refunds_with(status)).await;
}

async fn refunds_stripe_fails_through_the_stripe_client_are_reported_with_their_reason(
    kind: StoreKind,
) {
    let (app, fake) = app_with_fake_stripe(kind, Options::default()).await;
    failed_refunds_are_reported(&app, |status| fake.answer_refunds_with(status)).await;
}

/// A card without multicapture (`pm_card_jcb`: Stripe offers it for Visa, Mastercard, Amex
/// and Discover only): a shipment that is not the last captures with `final_capture=false`,
/// which Stripe refuses; the shipment is recorded `failed`, nothing is captured or shipped,
/// and the order keeps its authorization, so the whole order still ships in one last capture.
/// Answers the checkout's id.
async fn shipments_on_a_card_without_multicapture(app: &TestApp) -> String {
    app.new_product("cap-a", 1000, 10).await;
    let (customer, checkout, order) = app.reserved_checkout("buyer", &[("cap-a", 3)]).await;
    let paid = app
        .complete(&customer, &checkout, "pm_card_jcb", "pay-1")
        .await;
    paid.assert_status(200);
    assert_eq!(paid.str("state"), "completed", "{:?}", paid.body);
    assert_eq!(admin_order(app, &order).await["status"], "authorized");

    let refused = ship(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 1}]}),
    )
    .await;

    refused.assert_status(200);
    assert_eq!(refused.str("status"), "authorized", "{:?}", refused.body);
    assert_eq!(amount(&refused.body, "captured"), 0);
    let shipments = fetch_strings(
        app,
        "SELECT status || ':' || COALESCE(failure, '') FROM shipments",
    )
    .await;
    assert_eq!(shipments.len(), 1);
    assert!(
        shipments[0].starts_with("failed:") && shipments[0].contains("multicapture"),
        "{shipments:?}"
    );
    let intent_id = refused.str("payment_intent_id");
    let held = intent(app, &intent_id).await;
    assert_eq!(held.status, IntentStatus::RequiresCapture);
    assert_eq!(held.amount_received, 0);
    // The whole order in its last shipment: one final capture.
    let last = ship(
        app,
        &order,
        json!({"lines": [{"sku": "cap-a", "quantity": 3}], "last": true}),
    )
    .await;
    last.assert_status(200);
    assert_eq!(last.str("status"), "fulfilled");
    assert_eq!(amount(&last.body, "captured"), 3000);
    let done = intent(app, &intent_id).await;
    assert_eq!(done.status, IntentStatus::Succeeded);
    assert_eq!(done.amount_received, 3000);
    app.audit().await.assert_clean();
    checkout
}

async fn a_card_without_multicapture_refuses_a_shipment_that_is_not_the_last(kind: StoreKind) {
    let app = spawn_app_with(kind, manual()).await;
    shipments_on_a_card_without_multicapture(&app).await;
}

async fn a_card_without_multicapture_refuses_it_through_the_stripe_client(kind: StoreKind) {
    let (app, fake) = app_with_fake_stripe(kind, manual()).await;
    let checkout = shipments_on_a_card_without_multicapture(&app).await;
    let checkout = holdfast::domain::CheckoutId::parse(&checkout).expect("a checkout id");
    assert_eq!(
        fake.captures_for(checkout),
        1,
        "only the final capture was made"
    );
}
