//! No secret is ever logged or returned (DESIGN §7): the built binary runs with debug logs while
//! it is given right and wrong credentials and signatures, and neither its output nor any
//! answer holds the admin token, the webhook secret, the Stripe secret key or a customer's
//! token, whether the secrets came as flags or as `HOLDFAST_*` variables. The store keeps
//! only the SHA-256 of a customer's token.

use std::fs::File;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use holdfast::payments::signature;
use holdfast::store::StoreKind;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::both_stores;
use crate::fake_stripe::FakeStripe;
use crate::helpers::{fetch_strings, fresh_postgres_database, spawn_app, Reaped};

both_stores!(the_store_keeps_only_the_hash_of_a_customers_token);

const ADMIN: &str = "hfa_secret_admin_token_4f1c9e2b7a";
const WEBHOOK: &str = "whsec_secret_webhook_key_8d3a6b0e5c";
/// The key the fake Stripe server accepts.
const STRIPE_KEY: &str = crate::fake_stripe::SECRET_KEY;

/// How the secrets reach the server, and what it runs on.
#[derive(Clone, Copy)]
enum Shape {
    /// Flags, SQLite, the built-in payment simulator.
    FlagsEmbedded,
    /// `HOLDFAST_*` environment variables, PostgreSQL, and a Stripe secret key used against a
    /// Stripe-compatible server.
    EnvironmentProduction,
}

/// `(status, raw body)` of one call.
async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = client.request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("the app answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("a body"))
}

async fn webhook(
    client: &reqwest::Client,
    base: &str,
    body: &str,
    header: String,
) -> (u16, String) {
    let resp = client
        .post(format!("{base}/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", header)
        .body(body.to_owned())
        .send()
        .await
        .expect("the app answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("a body"))
}

#[tokio::test]
async fn secrets_given_as_flags_never_appear_in_logs_or_answers_even_at_debug_level() {
    secrets_never_appear_in_logs_or_answers(Shape::FlagsEmbedded).await;
}

#[tokio::test]
async fn secrets_given_in_the_environment_never_appear_in_logs_or_answers_on_postgres() {
    secrets_never_appear_in_logs_or_answers(Shape::EnvironmentProduction).await;
}

async fn secrets_never_appear_in_logs_or_answers(shape: Shape) {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let base = format!("http://127.0.0.1:{port}");
    // Files rather than pipes: debug logs are plenty, and a full pipe would stall the server.
    let out_path = dir.path().join("stdout.log");
    let err_path = dir.path().join("stderr.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    command
        .current_dir(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "debug");
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("HOLDFAST_")) {
        command.env_remove(name);
    }
    // Kept alive until the server has stopped.
    let mut _fake_stripe = None;
    match shape {
        Shape::FlagsEmbedded => {
            command.args(["--admin-token", ADMIN, "--stripe-webhook-secret", WEBHOOK]);
        }
        Shape::EnvironmentProduction => {
            let fake = FakeStripe::start().await;
            command
                .env("HOLDFAST_ADMIN_TOKEN", ADMIN)
                .env("HOLDFAST_STRIPE_WEBHOOK_SECRET", WEBHOOK)
                .env("HOLDFAST_STRIPE_SECRET_KEY", STRIPE_KEY)
                .env("HOLDFAST_STRIPE_API_BASE", fake.base_url())
                .env("HOLDFAST_DATABASE_URL", fresh_postgres_database().await);
            _fake_stripe = Some(fake);
        }
    }
    let mut child = Reaped(
        command
            .stdout(Stdio::from(File::create(&out_path).unwrap()))
            .stderr(Stdio::from(File::create(&err_path).unwrap()))
            .spawn()
            .expect("spawn holdfast"),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "holdfast did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answers = Vec::new();
    let post = reqwest::Method::POST;

    // The one answer that carries a secret by design: a new customer's token, shown once.
    let (status, created) = call(
        &client,
        post.clone(),
        format!("{base}/v1/admin/customers"),
        Some(ADMIN),
        Some(json!({"name": "Ada"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let customer: Value = serde_json::from_str(&created).unwrap();
    let token = customer["token"].as_str().expect("a token").to_owned();

    answers.push(
        call(
            &client,
            post.clone(),
            format!("{base}/v1/admin/products"),
            Some(ADMIN),
            Some(
                json!({"sku": "tea-01", "name": "Tea", "price": {"amount": 450, "currency": "EUR"},
                        "stock": 5}),
            ),
        )
        .await,
    );
    // Wrong and misplaced credentials.
    for (path, wrong) in [
        ("/v1/admin/inventory", format!("{ADMIN}x")),
        ("/v1/admin/inventory", token.clone()),
        ("/v1/carts", ADMIN.to_owned()),
        ("/v1/carts", format!("{token}x")),
    ] {
        answers.push(
            call(
                &client,
                reqwest::Method::GET,
                format!("{base}{path}"),
                Some(&wrong),
                None,
            )
            .await,
        );
    }
    // A customer's ordinary life: a cart, a checkout, a payment (whose simulated webhook comes
    // back signed with the secret).
    let (status, cart) = call(
        &client,
        post.clone(),
        format!("{base}/v1/carts"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 201, "{cart}");
    let cart: Value = serde_json::from_str(&cart).unwrap();
    let cart = cart["id"].as_str().unwrap().to_owned();
    answers.push(
        call(
            &client,
            reqwest::Method::PUT,
            format!("{base}/v1/carts/{cart}/lines/tea-01"),
            Some(&token),
            Some(json!({"quantity": 1})),
        )
        .await,
    );
    let (status, started) = call(
        &client,
        post.clone(),
        format!("{base}/v1/checkouts"),
        Some(&token),
        Some(json!({"cart_id": cart})),
    )
    .await;
    assert_eq!(status, 201, "{started}");
    let checkout = serde_json::from_str::<Value>(&started).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    answers.push((status, started));
    let paid = client
        .post(format!("{base}/v1/checkouts/{checkout}/complete"))
        .bearer_auth(&token)
        .header("idempotency-key", "pay-1")
        .json(&json!({"payment_method": "pm_card_authenticationRequired"}))
        .send()
        .await
        .expect("the app answers");
    let paid = (paid.status().as_u16(), paid.text().await.unwrap());
    // The payment went through the gateway (with the Stripe key, in production shape).
    assert!(
        paid.0 == 200 && paid.1.contains("requires_action"),
        "{paid:?}"
    );
    answers.push(paid);
    // Bad webhooks: forged, signed with another secret, stale, and over another body.
    let now = chrono::Utc::now().timestamp();
    let event = crate::webhooks::event(
        "evt_secret_1",
        "payment_intent.succeeded",
        "pi_unknown",
        None,
    );
    for header in [
        format!("t={now},v1={}", "ab".repeat(32)),
        signature::sign(event.as_bytes(), "whsec_not_the_secret", now),
        signature::sign(event.as_bytes(), WEBHOOK, now - 3600),
        signature::sign(b"{}", WEBHOOK, now),
        "garbage".to_owned(),
    ] {
        let answer = webhook(&client, &base, &event, header).await;
        assert_eq!(answer.0, 400, "{}", answer.1);
        answers.push(answer);
    }
    // And a good one, for an intent nobody knows.
    let answer = webhook(
        &client,
        &base,
        &event,
        signature::sign(event.as_bytes(), WEBHOOK, now),
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    answers.push(answer);

    let stopped = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(stopped.success());
    assert!(child.0.wait().expect("holdfast exits").success());
    let output =
        std::fs::read_to_string(&out_path).unwrap() + &std::fs::read_to_string(&err_path).unwrap();
    assert!(
        output.contains("DEBUG"),
        "the logs ran at debug level: {}",
        &output[..output.len().min(2000)]
    );
    for (name, secret) in [
        ("the admin token", ADMIN),
        ("the webhook secret", WEBHOOK),
        ("the customer's token", token.as_str()),
        ("the Stripe secret key", STRIPE_KEY),
    ] {
        assert!(!output.contains(secret), "{name} appears in the output");
        for (status, body) in &answers {
            assert!(
                !body.contains(secret),
                "{name} appears in an answer ({status}): {body}"
            );
        }
    }
}

async fn the_store_keeps_only_the_hash_of_a_customers_token(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let tokens = [
        app.new_customer("Ada").await.token,
        app.new_customer("Bob").await.token,
    ];

    let mut stored = fetch_strings(&app, "SELECT token_hash FROM customers").await;

    stored.sort();
    let mut expected: Vec<String> = tokens
        .iter()
        .map(|t| hex::encode(Sha256::digest(t.as_bytes())))
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
    for token in &tokens {
        assert!(
            stored.iter().all(|hash| !hash.contains(token.as_str())),
            "a token is stored as it is"
        );
    }
}
