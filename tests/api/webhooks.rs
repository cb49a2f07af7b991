//! `POST /webhooks/stripe` under attack (DESIGN §6, §7): forged, stale, re-targeted, oversized
//! and mistyped deliveries are refused and change nothing; an event for a payment nobody knows
//! is acknowledged and ignored; a replayed event id is handled once.

use holdfast::payments::signature;
use holdfast::store::StoreKind;
use serde_json::{json, Value};

use crate::both_stores;
use crate::helpers::{
    fetch_strings, spawn_app, spawn_app_with, Customer, Options, TestApp, WEBHOOK_SECRET,
};

both_stores!(
    hostile_deliveries_are_refused_and_change_nothing,
    an_event_for_an_unknown_payment_is_acknowledged_and_changes_nothing,
    a_replayed_event_id_is_handled_once,
    while_rotating_both_configured_secrets_are_accepted_and_no_other,
);

/// A `payment_intent.*` event as Stripe sends it.
pub fn event(id: &str, kind: &str, intent: &str, checkout: Option<&str>) -> String {
    let metadata = match checkout {
        Some(checkout) => json!({ "checkout_id": checkout }),
        None => json!({}),
    };
    let status = if kind.ends_with("succeeded") {
        "succeeded"
    } else {
        "requires_payment_method"
    };
    json!({
        "id": id, "object": "event", "type": kind, "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": intent, "object": "payment_intent", "amount": 450, "currency": "eur",
            "status": status,
            "client_secret": null, "created": 0, "metadata": metadata, "last_payment_error": null
        }}
    })
    .to_string()
}

async fn deliver(
    app: &TestApp,
    body: Vec<u8>,
    content_type: Option<&str>,
    signature: Option<String>,
) -> (u16, Value) {
    let mut req = app
        .client
        .post(format!("{}/webhooks/stripe", app.base))
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let resp = req.send().await.expect("the app answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

/// A customer whose payment waits for authentication: `(customer, checkout, order, intent)`.
async fn awaiting_authentication(app: &TestApp) -> (Customer, String, String, String) {
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let pending = app
        .complete(&ada, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    assert_eq!(pending.body["state"], "requires_action");
    (ada, checkout, order, pending.str("payment_intent_id"))
}

/// Everything a webhook could move: the order, the checkout, the stock, and what the endpoint
/// and the outbox recorded.
async fn state(app: &TestApp, ada: &Customer, checkout: &str, order: &str) -> Vec<Value> {
    let order = app
        .get(&format!("/v1/orders/{order}"), Some(&ada.token))
        .await;
    let checkout = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    let count = |table: &str| format!("SELECT CAST(COUNT(*) AS TEXT) FROM {table}");
    vec![
        order.body["status"].clone(),
        checkout.body["state"].clone(),
        json!(app.stock_of("tea-01").await),
        json!(fetch_strings(app, &count("webhook_events")).await),
        json!(fetch_strings(app, &count("outbox")).await),
    ]
}

async fn hostile_deliveries_are_refused_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (ada, checkout, order, intent) = awaiting_authentication(&app).await;
    let before = state(&app, &ada, &checkout, &order).await;
    let paid = event(
        "evt_hostile_1",
        "payment_intent.succeeded",
        &intent,
        Some(&checkout),
    );
    let now = chrono::Utc::now().timestamp();
    let signed = |body: &[u8], secret: &str, at: i64| Some(signature::sign(body, secret, at));
    let json = Some("application/json");
    let huge = {
        let mut body: Value = serde_json::from_str(&paid).unwrap();
        body["padding"] = json!("x".repeat(70 * 1024));
        body.to_string().into_bytes()
    };
    let other = event(
        "evt_hostile_2",
        "payment_intent.succeeded",
        "pi_someone_else",
        None,
    );
    // (what, body, content type, signature, status, code)
    type Case<'a> = (
        &'a str,
        Vec<u8>,
        Option<&'a str>,
        Option<String>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "no signature",
            paid.clone().into_bytes(),
            json,
            None,
            400,
            "signature_missing",
        ),
        (
            "garbage signature",
            paid.clone().into_bytes(),
            json,
            Some("garbage".into()),
            400,
            "invalid_signature",
        ),
        (
            "forged v1",
            paid.clone().into_bytes(),
            json,
            Some(format!("t={now},v1={}", "0f".repeat(32))),
            400,
            "invalid_signature",
        ),
        (
            "another secret",
            paid.clone().into_bytes(),
            json,
            signed(paid.as_bytes(), "whsec_attacker", now),
            400,
            "invalid_signature",
        ),
        (
            "secret without its whsec_ prefix",
            paid.clone().into_bytes(),
            json,
            signed(
                paid.as_bytes(),
                WEBHOOK_SECRET.trim_start_matches("whsec_"),
                now,
            ),
            400,
            "invalid_signature",
        ),
        (
            "replayed after the tolerance",
            paid.clone().into_bytes(),
            json,
            signed(paid.as_bytes(), WEBHOOK_SECRET, now - 301),
            400,
            "invalid_signature",
        ),
        (
            "dated in the future",
            paid.clone().into_bytes(),
            json,
            signed(paid.as_bytes(), WEBHOOK_SECRET, now + 301),
            400,
            "invalid_signature",
        ),
        (
            "a valid signature over another body",
            paid.clone().into_bytes(),
            json,
            signed(other.as_bytes(), WEBHOOK_SECRET, now),
            400,
            "invalid_signature",
        ),
        (
            "a signature with another timestamp",
            paid.clone().into_bytes(),
            json,
            signed(paid.as_bytes(), WEBHOOK_SECRET, now)
                .map(|s| s.replacen(&format!("t={now}"), &format!("t={}", now - 1), 1)),
            400,
            "invalid_signature",
        ),
        (
            "over 64 KiB",
            huge.clone(),
            json,
            signed(&huge, WEBHOOK_SECRET, now),
            413,
            "payload_too_large",
        ),
        (
            "text/plain",
            paid.clone().into_bytes(),
            Some("text/plain"),
            signed(paid.as_bytes(), WEBHOOK_SECRET, now),
            415,
            "unsupported_media_type",
        ),
        (
            "a form",
            paid.clone().into_bytes(),
            Some("application/x-www-form-urlencoded"),
            signed(paid.as_bytes(), WEBHOOK_SECRET, now),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            paid.clone().into_bytes(),
            None,
            signed(paid.as_bytes(), WEBHOOK_SECRET, now),
            415,
            "unsupported_media_type",
        ),
        (
            "signed, but not an event",
            b"{\"hello\":1}".to_vec(),
            json,
            signed(b"{\"hello\":1}", WEBHOOK_SECRET, now),
            400,
            "invalid_event",
        ),
        (
            "signed, but not JSON",
            b"\xff\x00".to_vec(),
            json,
            signed(b"\xff\x00", WEBHOOK_SECRET, now),
            400,
            "invalid_event",
        ),
    ];

    for (what, body, content_type, signature, status, code) in cases {
        let (got, answer) = deliver(&app, body, content_type, signature).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {answer}"
        );
        assert!(
            !answer.to_string().contains(WEBHOOK_SECRET),
            "{what}: the secret is echoed"
        );
    }

    assert_eq!(state(&app, &ada, &checkout, &order).await, before);
}

async fn an_event_for_an_unknown_payment_is_acknowledged_and_changes_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (ada, checkout, order, _) = awaiting_authentication(&app).await;
    let before = state(&app, &ada, &checkout, &order).await;
    let now = chrono::Utc::now().timestamp();

    for (i, kind) in [
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
    ]
    .into_iter()
    .enumerate()
    {
        let body = event(&format!("evt_unknown_{i}"), kind, "pi_nobody_knows", None);
        let (status, answer) = deliver(
            &app,
            body.clone().into_bytes(),
            Some("application/json"),
            Some(signature::sign(body.as_bytes(), WEBHOOK_SECRET, now)),
        )
        .await;
        assert_eq!(status, 200, "{kind}: {answer}");
    }

    let after = state(&app, &ada, &checkout, &order).await;
    assert_eq!(
        after[..3],
        before[..3],
        "order, checkout and stock unchanged"
    );
    assert_eq!(after[4], before[4], "no event published");
}

async fn a_replayed_event_id_is_handled_once(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (ada, checkout, order, intent) = awaiting_authentication(&app).await;
    let paid = event(
        "evt_replayed",
        "payment_intent.succeeded",
        &intent,
        Some(&checkout),
    );
    let now = chrono::Utc::now().timestamp();
    let (status, _) = deliver(
        &app,
        paid.clone().into_bytes(),
        Some("application/json"),
        Some(signature::sign(paid.as_bytes(), WEBHOOK_SECRET, now)),
    )
    .await;
    assert_eq!(status, 200);
    let handled = state(&app, &ada, &checkout, &order).await;
    assert_eq!(
        handled[..3],
        [json!("paid"), json!("completed"), json!([4, 0, 4])]
    );

    // The same event again, freshly signed; then its id on a different story.
    let failed = event(
        "evt_replayed",
        "payment_intent.payment_failed",
        &intent,
        Some(&checkout),
    );
    for body in [paid, failed] {
        let (status, answer) = deliver(
            &app,
            body.clone().into_bytes(),
            Some("application/json"),
            Some(signature::sign(body.as_bytes(), WEBHOOK_SECRET, now + 1)),
        )
        .await;
        assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    }

    assert_eq!(state(&app, &ada, &checkout, &order).await, handled);
    let events = fetch_strings(
        &app,
        "SELECT event_id FROM webhook_events WHERE event_id = 'evt_replayed'",
    )
    .await;
    assert_eq!(events.len(), 1);
}

async fn while_rotating_both_configured_secrets_are_accepted_and_no_other(kind: StoreKind) {
    let (old, new) = ("whsec_rotation_old_5e1d", "whsec_rotation_new_9a7c");
    let app = spawn_app_with(
        kind,
        Options {
            webhook_secrets: Some(format!("{old}, {new}")),
            ..Options::default()
        },
    )
    .await;
    let now = chrono::Utc::now().timestamp();

    for (i, (secret, expected)) in [(old, 200), (new, 200), (WEBHOOK_SECRET, 400)]
        .into_iter()
        .enumerate()
    {
        let body = event(
            &format!("evt_rotation_{i}"),
            "payment_intent.canceled",
            "pi_nobody_knows",
            None,
        );
        let (status, answer) = deliver(
            &app,
            body.clone().into_bytes(),
            Some("application/json"),
            Some(signature::sign(body.as_bytes(), secret, now)),
        )
        .await;
        assert_eq!(status, expected, "signed with secret #{i}: {answer}");
    }
    // Only the two accepted deliveries were recorded.
    let seen = fetch_strings(
        &app,
        "SELECT event_id FROM webhook_events ORDER BY event_id",
    )
    .await;
    assert_eq!(seen, ["evt_rotation_0", "evt_rotation_1"]);
}
