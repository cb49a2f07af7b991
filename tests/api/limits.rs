//! Hostile and careless callers (DESIGN §7, §8): the per-customer rate limit on checkout,
//! complete and flash-sale tokens, body and header size limits, and the timeouts that keep a
//! slow client from holding a connection. Every refusal is the JSON error body and changes
//! nothing.

use std::time::Duration;

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::both_stores;
use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::helpers::{
    eventually, spawn_app_with, AssertClean, Customer, Options, Resp, TestApp, ADMIN_TOKEN,
};

both_stores!(
    a_customer_over_the_rate_limit_gets_429_and_changes_nothing_while_others_go_on,
    an_unauthenticated_flood_gets_401_and_spends_no_customers_budget,
    a_rate_limit_of_zero_never_refuses,
    every_route_refuses_an_oversized_body_with_the_error_body,
    a_chunked_body_over_the_limit_is_refused_with_the_error_body,
    oversized_headers_are_refused,
    a_client_that_withholds_its_body_gets_408_and_the_connection_is_closed,
    a_client_that_withholds_its_headers_is_disconnected,
    a_payment_past_the_request_timeout_is_answered_408_and_still_recorded,
);

/// Where the app listens, for clients that write raw bytes.
fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

async fn open_sale(app: &TestApp, sku: &str, units: i64) -> String {
    let resp = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({ "sku": sku, "units": units }),
        )
        .await;
    resp.assert_status(201);
    resp.str("id")
}

async fn take_token(app: &TestApp, customer: &Customer, sale: &str) -> Resp {
    app.request(
        Method::POST,
        &format!("/v1/flash-sales/{sale}/tokens"),
        Some(&customer.token),
        None,
    )
    .await
}

/// Spends `customer`'s budget on token requests (which change nothing for a holder) until one
/// is refused, and returns the refusal.
async fn exhaust(app: &TestApp, customer: &Customer, sale: &str) -> Resp {
    for _ in 0..100 {
        let resp = take_token(app, customer, sale).await;
        if resp.status.as_u16() == 429 {
            return resp;
        }
        assert!(matches!(resp.status.as_u16(), 200 | 201), "{:?}", resp.body);
    }
    panic!("100 token requests in a row were never limited");
}

#[track_caller]
fn assert_rate_limited(resp: &Resp, what: &str) {
    assert_eq!(
        (resp.status.as_u16(), resp.code()),
        (429, "rate_limited"),
        "{what}: {:?}",
        resp.body
    );
    assert!(resp.body["error"]["message"].is_string(), "{what}");
    let retry: u64 = resp
        .headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: a Retry-After header"))
        .to_str()
        .expect("ascii")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry >= 1, "{what}: Retry-After {retry}");
    assert!(
        resp.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{what}"
    );
}

/// Up to three tries of `act` right after the budget ran out: a refill can land between the
/// refusal and the act (the budget refills continuously), and then the act simply succeeds
/// and the test tries again with a fresh target.
const TRIES: usize = 3;

async fn a_customer_over_the_rate_limit_gets_429_and_changes_nothing_while_others_go_on(
    kind: StoreKind,
) {
    let app = spawn_app_with(
        kind,
        Options {
            rate_limit_per_second: 2,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 100).await;
    let mut sales = Vec::new();
    for i in 1..=TRIES + 2 {
        let sku = format!("hot-0{i}");
        app.new_product(&sku, 900, 5).await;
        sales.push(open_sale(&app, &sku, 5).await);
    }
    // Ada spends her budget on the first sale; the next ones are fresh targets, the last Bob's.
    let spent = sales[0].clone();
    let bobs_sale = sales[TRIES + 1].clone();
    // Ada's targets are made before her budget is spent: three open carts and (within the burst
    // of four) three reserved checkouts.
    let ada = app.new_customer("Ada").await;
    let mut carts = Vec::new();
    for _ in 0..TRIES {
        let cart = app.new_cart(&ada).await;
        app.set_line(&ada, &cart, "tea-01", 1)
            .await
            .assert_status(200);
        carts.push(cart);
    }
    let mut checkouts = Vec::new();
    for _ in 0..TRIES {
        let cart = app.new_cart(&ada).await;
        app.set_line(&ada, &cart, "tea-01", 1)
            .await
            .assert_status(200);
        let started = app.start_checkout(&ada, &cart).await;
        started.assert_status(201);
        checkouts.push(started.str("id"));
    }

    // Starting a checkout: the cart stays open and nothing is reserved.
    let mut refused = false;
    for cart in &carts {
        assert_rate_limited(&exhaust(&app, &ada, &spent).await, "token burst");
        let before = app.inventory_snapshot().await;
        let resp = app.start_checkout(&ada, cart).await;
        if resp.status.as_u16() == 201 {
            continue;
        }
        assert_rate_limited(&resp, "start");
        assert_eq!(
            app.inventory_snapshot().await,
            before,
            "start: nothing reserved"
        );
        let cart = app
            .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
            .await;
        assert_eq!(cart.body["status"], "open", "start: the cart is still open");
        refused = true;
        break;
    }
    assert!(refused, "start was never limited");

    // Completing: no charge, the checkout stays reserved.
    let mut refused = false;
    for (i, checkout) in checkouts.iter().enumerate() {
        assert_rate_limited(&exhaust(&app, &ada, &spent).await, "token burst");
        let resp = app
            .complete(&ada, checkout, "pm_card_visa", &format!("pay-{i}"))
            .await;
        if resp.status.as_u16() == 200 {
            continue;
        }
        assert_rate_limited(&resp, "complete");
        let after = app
            .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
            .await;
        assert_eq!(after.body["state"], "reserved", "complete: no payment");
        let ledger = app.simulator.as_ref().expect("the simulator").ledger();
        let id = holdfast::domain::CheckoutId::parse(checkout).unwrap();
        assert_eq!(ledger.succeeded_for(id), 0, "complete: nothing charged");
        refused = true;
        break;
    }
    assert!(refused, "complete was never limited");

    // A token for another sale: Ada does not become a holder.
    let mut refused = false;
    for sale in &sales[1..=TRIES] {
        assert_rate_limited(&exhaust(&app, &ada, &spent).await, "token burst");
        let resp = take_token(&app, &ada, sale).await;
        if resp.status.as_u16() == 201 {
            continue;
        }
        assert_rate_limited(&resp, "token");
        let sale = app
            .get(&format!("/v1/admin/flash-sales/{sale}"), Some(ADMIN_TOKEN))
            .await;
        assert_eq!(sale.body["figures"]["holders"], 0, "token: nobody admitted");
        refused = true;
        break;
    }
    assert!(refused, "token was never limited");

    // Bob's budget is his own: all three calls go through while Ada is limited.
    assert_rate_limited(&exhaust(&app, &ada, &spent).await, "token burst");
    let (bob, cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    take_token(&app, &bob, &bobs_sale).await.assert_status(201);
    let started = app.start_checkout(&bob, &cart).await;
    started.assert_status(201);
    let paid = app
        .complete(&bob, &started.str("id"), "pm_card_visa", "bob-1")
        .await;
    paid.assert_status(200);
    assert_eq!(paid.body["state"], "completed");
}

async fn an_unauthenticated_flood_gets_401_and_spends_no_customers_budget(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            rate_limit_per_second: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 10).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    let nil = "00000000-0000-0000-0000-000000000000";
    let routes = [
        "/v1/checkouts".to_owned(),
        format!("/v1/checkouts/{nil}/complete"),
        format!("/v1/flash-sales/{nil}/tokens"),
    ];

    for path in &routes {
        for token in [None, Some("hfc_forged"), Some(ADMIN_TOKEN)] {
            for _ in 0..5 {
                let resp = app.post(path, token, json!({})).await;
                assert_eq!(
                    (resp.status.as_u16(), resp.code()),
                    (401, "unauthorized"),
                    "{path} {token:?}"
                );
            }
        }
    }

    // Ada's full budget is still hers.
    app.start_checkout(&ada, &cart).await.assert_status(201);
}

async fn a_rate_limit_of_zero_never_refuses(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            rate_limit_per_second: 0,
            ..Options::default()
        },
    )
    .await;
    app.new_product("hot-01", 900, 5).await;
    let sale = open_sale(&app, "hot-01", 5).await;
    let ada = app.new_customer("Ada").await;

    // Twice the burst the default limit would allow.
    for i in 0..80 {
        let resp = take_token(&app, &ada, &sale).await;
        assert!(
            matches!(resp.status.as_u16(), 200 | 201),
            "request {i}: {:?}",
            resp.body
        );
    }
}

/// Every route that reads a body, with the token it needs.
fn body_routes(cart: &str, checkout: &str) -> Vec<(Method, String, &'static str)> {
    vec![
        (Method::POST, "/v1/admin/customers".into(), "admin"),
        (Method::POST, "/v1/admin/products".into(), "admin"),
        (Method::PATCH, "/v1/admin/products/tea-01".into(), "admin"),
        (Method::POST, "/v1/admin/flash-sales".into(), "admin"),
        (Method::POST, "/v1/carts".into(), "customer"),
        (
            Method::PUT,
            format!("/v1/carts/{cart}/lines/tea-01"),
            "customer",
        ),
        (Method::POST, "/v1/checkouts".into(), "customer"),
        (
            Method::POST,
            format!("/v1/checkouts/{checkout}/heartbeat"),
            "customer",
        ),
        (
            Method::POST,
            format!("/v1/checkouts/{checkout}/cancel"),
            "customer",
        ),
        (
            Method::POST,
            format!("/v1/checkouts/{checkout}/complete"),
            "customer",
        ),
        (Method::POST, "/webhooks/stripe".into(), "none"),
        // Routes that read no body refuse a declared oversized one all the same.
        (Method::GET, "/v1/products".into(), "none"),
        (
            Method::DELETE,
            format!("/v1/carts/{cart}/lines/tea-01"),
            "customer",
        ),
    ]
}

async fn every_route_refuses_an_oversized_body_with_the_error_body(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    app.new_product("tea-01", 450, 10).await;
    let (ada, checkout, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let cart = app.new_cart(&ada).await;
    let before = app.inventory_snapshot().await;
    let huge = json!({ "name": "x".repeat(70 * 1024) }).to_string();

    for (method, path, who) in body_routes(&cart, &checkout) {
        let mut req = app
            .client
            .request(method.clone(), format!("{}{path}", app.base))
            .header("content-type", "application/json")
            .header("idempotency-key", "big-1")
            .header("stripe-signature", "t=1,v1=00")
            .body(huge.clone());
        match who {
            "admin" => req = req.bearer_auth(ADMIN_TOKEN),
            "customer" => req = req.bearer_auth(&ada.token),
            _ => {}
        }
        let resp = req.send().await.expect("the app answers");
        let status = resp.status().as_u16();
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let body: Value = resp.json().await.expect("a JSON body");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (413, Some("payload_too_large")),
            "{method} {path}: {body}"
        );
        assert!(content_type.starts_with("application/json"), "{path}");
    }

    assert_eq!(app.inventory_snapshot().await, before);
    let state = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await;
    assert_eq!(state.body["state"], "reserved");
}

/// Writes `request` on a fresh connection and reads until the server closes it (or 10 s pass):
/// `(status, JSON body or Null, closed by the server)`.
async fn raw_exchange(app: &TestApp, request: &[u8]) -> (u16, Value, bool) {
    let mut stream = TcpStream::connect(addr(app)).await.expect("connect");
    // A server that answers early may close before every byte is written; the answer is what
    // counts.
    let _ = stream.write_all(request).await;
    read_response(&mut stream).await
}

async fn read_response(stream: &mut TcpStream) -> (u16, Value, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            // A reset after the answer still ends the connection.
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    let text = String::from_utf8_lossy(&received).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, body, closed)
}

async fn a_chunked_body_over_the_limit_is_refused_with_the_error_body(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    app.new_product("tea-01", 450, 10).await;
    let before = app.inventory_snapshot().await;
    // 9 chunks of 8 KiB: over 64 KiB, and no Content-Length anywhere.
    let mut body = Vec::new();
    for _ in 0..9 {
        body.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        body.extend_from_slice(&[b' '; 8192]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");

    for (path, auth) in [
        ("/v1/admin/products", format!("Bearer {ADMIN_TOKEN}")),
        ("/webhooks/stripe", String::new()),
    ] {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: holdfast\r\ncontent-type: application/json\r\n\
             stripe-signature: t=1,v1=00\r\ntransfer-encoding: chunked\r\n"
        );
        if !auth.is_empty() {
            request.push_str(&format!("authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(&body);

        let (status, body, _) = raw_exchange(&app, &bytes).await;

        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (413, Some("payload_too_large")),
            "{path}: {body}"
        );
    }
    assert_eq!(app.inventory_snapshot().await, before);
}

async fn oversized_headers_are_refused(kind: StoreKind) {
    let app = spawn_app_with(kind, Options::default()).await;
    app.new_product("tea-01", 450, 10).await;
    let before = app.inventory_snapshot().await;
    let product = json!({"sku": "big-01", "name": "n", "price": {"amount": 1, "currency": "EUR"},
                         "stock": 1});

    // Over our limit: the JSON 431.
    let resp = app
        .client
        .post(format!("{}/v1/admin/products", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-padding", "a".repeat(holdfast::http::HEADER_LIMIT))
        .json(&product)
        .send()
        .await
        .expect("the app answers");
    assert_eq!(resp.status().as_u16(), 431);
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body["error"]["code"], "headers_too_large");

    // Many small headers add up the same way.
    let mut req = app
        .client
        .post(format!("{}/v1/admin/products", app.base))
        .bearer_auth(ADMIN_TOKEN);
    for i in 0..90 {
        req = req.header(format!("x-pad-{i}"), "b".repeat(200));
    }
    let resp = req.json(&product).send().await.expect("the app answers");
    assert_eq!(resp.status().as_u16(), 431);

    // Far over it, hyper refuses before any of our code runs; still a 431 and a closed
    // connection.
    let request = format!(
        "GET /v1/products HTTP/1.1\r\nhost: holdfast\r\nx-padding: {}\r\n\r\n",
        "c".repeat(100 * 1024)
    );
    let (status, _, closed) = raw_exchange(&app, request.as_bytes()).await;
    assert_eq!(status, 431);
    assert!(closed);

    // A normal request still goes through, and nothing was created.
    app.get("/v1/products", None).await.assert_status(200);
    assert_eq!(app.inventory_snapshot().await, before);
}

async fn a_client_that_withholds_its_body_gets_408_and_the_connection_is_closed(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            request_timeout_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 10).await;
    // Read from the store: the client's pooled connection idles past the 1 s header timeout
    // while the slow request waits, and the server may be closing it as it is reused.
    let before = app.store.inventory_audit().await.expect("the inventory");
    let head = format!(
        "POST /v1/admin/products HTTP/1.1\r\nhost: holdfast\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"sku\":\"slow-01\","
    );
    let mut stream = TcpStream::connect(addr(&app)).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write");

    // The rest of the body never comes.
    let (status, body, closed) = read_response(&mut stream).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );
    assert!(closed, "the server closes the connection");
    assert_eq!(
        app.store.inventory_audit().await.expect("the inventory"),
        before
    );
}

async fn a_client_that_withholds_its_headers_is_disconnected(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            request_timeout_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    let mut stream = TcpStream::connect(addr(&app)).await.expect("connect");
    stream
        .write_all(b"GET /v1/products HTTP/1.1\r\nhost: holdfast\r\n")
        .await
        .expect("write");

    // The blank line that ends the headers never comes.
    let (_, _, closed) = read_response(&mut stream).await;

    assert!(closed, "the server closes a connection whose headers stall");
    // A kept-alive connection that stays idle after its answer goes the same way.
    let (status, _, closed) =
        raw_exchange(&app, b"GET /healthz HTTP/1.1\r\nhost: holdfast\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(closed, "the server closes an idle connection");
    app.get("/healthz", None).await.assert_status(200);
}

/// With Redis configured, one customer's budget is one budget across instances: two instances
/// on one database and one Redis, a burst of requests spread over both, and only the burst of
/// one budget passes (each instance on its own would pass a burst each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_the_rate_limit_is_shared_by_every_instance() {
    // Arrange: 1 request per second, burst 2, on two instances.
    let redis = std::env::var("HOLDFAST_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let a = spawn_app_with(
        StoreKind::Postgres,
        Options {
            rate_limit_per_second: 1,
            redis: Some(redis),
            ..Options::default()
        },
    )
    .await;
    let b = a.spawn_sibling().await;
    let ada = a.new_customer("Ada").await;
    let nil = "00000000-0000-0000-0000-000000000000";
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));

    // Act: ten checkouts at once, five on each instance.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (client, base) = if i % 2 == 0 {
            (a.client.clone(), a.base.clone())
        } else {
            (b.client.clone(), b.base.clone())
        };
        let token = ada.token.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client
                .post(format!("{base}/v1/checkouts"))
                .bearer_auth(token)
                .json(&json!({ "cart_id": nil }))
                .send()
                .await
                .expect("request reaches the app")
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }

    // Assert: the shared burst of 2 passed (one more if the race outlasted a second's refill),
    // the rest were refused; separate budgets would have passed at least 4.
    let passed = statuses.iter().filter(|s| **s != 429).count();
    assert!((2..=3).contains(&passed), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 429 || *s == 404),
        "{statuses:?}"
    );
    b.stop().await;
    a.audit().await.assert_clean();
}

/// With Redis as gate and budget, a token request of a sale the instance knows takes its
/// budget inside the admission's own script call, from the same shared budget as every other
/// limited route: two instances, requests spread over both, only the burst passes, and the
/// customer's next checkout start is refused for the same budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_token_requests_take_the_shared_budget_in_the_gate_call() {
    // Arrange: 1 request per second, burst 2; both instances know the sale.
    let redis = std::env::var("HOLDFAST_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let a = spawn_app_with(
        StoreKind::Postgres,
        Options {
            rate_limit_per_second: 1,
            redis: Some(redis),
            ..Options::default()
        },
    )
    .await;
    let b = a.spawn_sibling().await;
    a.new_product("hot-01", 900, 10).await;
    let sale = open_sale(&a, "hot-01", 10).await;
    for app in [&a, &b] {
        app.get(&format!("/v1/admin/flash-sales/{sale}"), Some(ADMIN_TOKEN))
            .await
            .assert_status(200);
    }
    let ada = a.new_customer("Ada").await;

    // Act: six token requests, alternating instances, then a checkout start.
    let mut statuses = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..6 {
        let resp = take_token(if i % 2 == 0 { &a } else { &b }, &ada, &sale).await;
        statuses.push(resp.status.as_u16());
        if resp.status.as_u16() == 429 {
            refusals.push(resp);
        }
    }
    let start = a
        .post(
            "/v1/checkouts",
            Some(&ada.token),
            json!({ "cart_id": "00000000-0000-0000-0000-000000000000" }),
        )
        .await;

    // Assert: a grant and the holder's answer within the burst (one more if a second's refill
    // came in time), the rest refused with the contract's 429; the sale's figures untouched by
    // the refusals; the start refused for the same budget.
    assert_eq!(&statuses[..2], &[201, 200], "{statuses:?}");
    assert!(refusals.len() >= 3, "{statuses:?}");
    for refusal in &refusals {
        assert_eq!(
            refusal.body["error"]["code"], "rate_limited",
            "{:?}",
            refusal.body
        );
        assert!(refusal.headers.contains_key("retry-after"));
    }
    let figures = a
        .get(&format!("/v1/admin/flash-sales/{sale}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(figures.body["figures"]["holders"], 1, "{:?}", figures.body);
    start.assert_status(429);
    b.stop().await;
    a.audit().await.assert_clean();
}

/// The client stops waiting (`408`) while the charge is at the gateway; the request goes on
/// and records the payment, so the checkout does not sit in `charging` for recovery to find.
async fn a_payment_past_the_request_timeout_is_answered_408_and_still_recorded(kind: StoreKind) {
    // Arrange: workers off (the clock moves only when told), so only the request itself can
    // record the charge.
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            request_timeout_seconds: 1,
            manual_clock: true,
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    fake.hold();

    // Act
    let answered = app.complete(&ada, &checkout, "pm_card_visa", "late").await;
    fake.release();

    // Assert
    answered.assert_error(408, "request_timeout");
    let path = format!("/v1/orders/{order}");
    eventually(10, "the order is paid", || async {
        app.get(&path, Some(&ada.token)).await.body["status"] == "paid"
    })
    .await;
    // Its answer was stored too: the same key replays it once the request has finished.
    eventually(10, "the first answer is replayed", || async {
        let replay = app.complete(&ada, &checkout, "pm_card_visa", "late").await;
        replay.status.as_u16() == 200 && replay.body["state"] == "completed"
    })
    .await;
    let id = holdfast::domain::CheckoutId::parse(&checkout).expect("a checkout id");
    assert_eq!(fake.charges_for(id), 1);
    app.audit().await.assert_clean();
}
