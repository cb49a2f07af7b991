//! Bad input and missing credentials: every answer is the contract's JSON error body with the
//! right status, and a rejected request changes nothing (promise 7). A store that stops
//! answering makes `/readyz` say so with the same body.

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::json;

use crate::both_stores;
use crate::helpers::{
    eventually, spawn_app, AssertClean, Customer, DatabaseOutage, TestApp, ADMIN_TOKEN,
};

both_stores!(
    missing_or_wrong_tokens_are_refused,
    malformed_bodies_get_the_error_body_and_change_nothing,
    unknown_routes_and_methods_get_the_error_body,
    bad_products_are_refused_and_change_nothing,
    every_json_route_refuses_malformed_mistyped_and_unknown_bodies_and_changes_nothing,
);

async fn missing_or_wrong_tokens_are_refused(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let ada = app.new_customer("Ada").await;
    let cases: [(Method, &str, Option<&str>, u16, &str); 8] = [
        (
            Method::GET,
            "/v1/admin/inventory",
            None,
            401,
            "unauthorized",
        ),
        (
            Method::GET,
            "/v1/admin/inventory",
            Some("wrong-token"),
            401,
            "unauthorized",
        ),
        (
            Method::GET,
            "/v1/admin/inventory",
            Some(&ada.token),
            403,
            "forbidden",
        ),
        (
            Method::POST,
            "/v1/admin/customers",
            Some(&ada.token),
            403,
            "forbidden",
        ),
        (Method::POST, "/v1/carts", None, 401, "unauthorized"),
        (
            Method::POST,
            "/v1/carts",
            Some("hfc_forged"),
            401,
            "unauthorized",
        ),
        // The admin token is not a customer token.
        (
            Method::POST,
            "/v1/carts",
            Some(ADMIN_TOKEN),
            401,
            "unauthorized",
        ),
        (Method::GET, "/v1/orders", None, 401, "unauthorized"),
    ];
    for (method, path, token, status, code) in cases {
        let resp = app.request(method.clone(), path, token, None).await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (status, code),
            "{method} {path} {token:?}"
        );
    }
    // A malformed Authorization header is a 401, never a 500.
    let resp = app
        .client
        .get(format!("{}/v1/orders", app.base))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value, String) {
    let mut req = app
        .client
        .request(method, format!("{}{path}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.json().await.expect("an error body is JSON");
    (status, body, ct)
}

async fn malformed_bodies_get_the_error_body_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let before = app.inventory_snapshot().await;
    let json_ct = Some("application/json");
    let huge = format!(
        r#"{{"sku":"big","name":"{}","price":{{"amount":1,"currency":"EUR"}},"stock":1}}"#,
        "x".repeat(70 * 1024)
    );
    // (content type, body, status, code, what)
    type Case<'a> = (Option<&'a str>, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (json_ct, b"{".to_vec(), 400, "invalid_json", "truncated JSON"),
        (json_ct, b"not json".to_vec(), 400, "invalid_json", "not JSON"),
        (json_ct, b"".to_vec(), 400, "invalid_json", "empty body"),
        (json_ct, b"[]".to_vec(), 422, "validation_failed", "an array"),
        (Some("text/plain"), br#"{"sku":"a"}"#.to_vec(), 415, "unsupported_media_type", "text/plain"),
        (None, br#"{"sku":"a"}"#.to_vec(), 415, "unsupported_media_type", "no content type"),
        (json_ct, huge.into_bytes(), 413, "payload_too_large", "over 64 KiB"),
        (json_ct, br#"{"sku":"x","name":"n","price":{"amount":1,"currency":"EUR"},"stock":1,"reserved":5}"#.to_vec(), 422, "validation_failed", "unknown field"),
        (json_ct, vec![0xff, 0xfe, 0x00], 400, "invalid_json", "binary garbage"),
    ];
    for (ct, body, status, code, what) in cases {
        let (got, body, content_type) =
            raw(&app, Method::POST, "/v1/admin/products", ct, body).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "{what}: a message");
        assert!(
            content_type.starts_with("application/json"),
            "{what}: {content_type}"
        );
    }
    assert_eq!(app.inventory_snapshot().await, before);
}

async fn unknown_routes_and_methods_get_the_error_body(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (status, body, ct) = raw(&app, Method::GET, "/v1/nothing-here", None, vec![]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("route_not_found"))
    );
    assert!(ct.starts_with("application/json"));
    let (status, body, ct) = raw(&app, Method::DELETE, "/v1/products", None, vec![]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(ct.starts_with("application/json"));
}

async fn bad_products_are_refused_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let before = app.inventory_snapshot().await;
    let price = json!({"amount": 100, "currency": "EUR"});
    let cases = [
        (
            json!({"sku": "", "name": "n", "price": price, "stock": 1}),
            "empty sku",
        ),
        (
            json!({"sku": "a b", "name": "n", "price": price, "stock": 1}),
            "space in sku",
        ),
        (
            json!({"sku": "x".repeat(65), "name": "n", "price": price, "stock": 1}),
            "long sku",
        ),
        (
            json!({"sku": "ok", "name": "", "price": price, "stock": 1}),
            "empty name",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": {"amount": -1, "currency": "EUR"}, "stock": 1}),
            "negative price",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": {"amount": 1.5, "currency": "EUR"}, "stock": 1}),
            "fractional price",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": {"amount": 1, "currency": "eur"}, "stock": 1}),
            "lower-case currency",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": {"amount": 1, "currency": "EURO"}, "stock": 1}),
            "long currency",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": 100, "stock": 1}),
            "price as a number",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": price, "stock": -1}),
            "negative stock",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": price, "stock": 1_000_000_001i64}),
            "huge stock",
        ),
        (
            json!({"sku": "ok", "name": "n", "price": price}),
            "missing stock",
        ),
    ];
    for (body, what) in cases {
        let resp = app.admin_post("/v1/admin/products", body).await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (422, "validation_failed"),
            "{what}: {:?}",
            resp.body
        );
    }
    let resp = app
        .admin_post("/v1/admin/customers", json!({"name": ""}))
        .await;
    resp.assert_error(422, "validation_failed");
    let resp = app
        .admin_post("/v1/admin/customers", json!({"name": "Ada", "admin": true}))
        .await;
    resp.assert_error(422, "validation_failed");
    assert_eq!(app.inventory_snapshot().await, before);
}

/// A route that reads a JSON body, with a body it would accept.
struct JsonRoute {
    method: Method,
    path: String,
    token: Option<String>,
    valid: serde_json::Value,
}

/// Everything the admin and the customer can see, for "nothing changed" assertions.
async fn everything_visible(
    app: &TestApp,
    ada: &Customer,
    cart: &str,
    checkout: &str,
    sale: &str,
) -> Vec<serde_json::Value> {
    let admin = Some(ADMIN_TOKEN);
    let customer = Some(ada.token.as_str());
    let mut seen = vec![app.inventory_snapshot().await];
    for (path, token) in [
        ("/v1/admin/ops".to_owned(), admin),
        (format!("/v1/admin/flash-sales/{sale}"), admin),
        (format!("/v1/carts/{cart}"), customer),
        (format!("/v1/checkouts/{checkout}"), customer),
        ("/v1/orders".to_owned(), customer),
    ] {
        let resp = app.get(&path, token).await;
        resp.assert_status(200);
        seen.push(resp.body);
    }
    seen
}

async fn every_json_route_refuses_malformed_mistyped_and_unknown_bodies_and_changes_nothing(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    app.new_product("hot-01", 900, 5).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 2}),
        )
        .await;
    sale.assert_status(201);
    let sale = sale.str("id");
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let cart = app.new_cart(&ada).await;
    app.set_line(&ada, &cart, "tea-01", 2)
        .await
        .assert_status(200);
    let admin = Some(ADMIN_TOKEN.to_owned());
    let customer = Some(ada.token.clone());
    let route = |method: Method, path: String, token: &Option<String>, valid| JsonRoute {
        method,
        path,
        token: token.clone(),
        valid,
    };
    // Every route whose body is JSON, but the webhook: Stripe's events carry fields we do not
    // know by design, and its signature is checked first (tests/api/webhooks.rs).
    let routes = [
        route(
            Method::POST,
            "/v1/admin/customers".into(),
            &admin,
            json!({"name": "Bo"}),
        ),
        route(
            Method::POST,
            "/v1/admin/products".into(),
            &admin,
            json!({"sku": "new-01", "name": "New", "price": {"amount": 100, "currency": "EUR"},
                   "stock": 1}),
        ),
        route(
            Method::PATCH,
            "/v1/admin/products/tea-01".into(),
            &admin,
            json!({"stock": 20}),
        ),
        route(
            Method::POST,
            "/v1/admin/flash-sales".into(),
            &admin,
            json!({"sku": "tea-01", "units": 1}),
        ),
        route(
            Method::POST,
            format!("/v1/admin/orders/{order}/refund"),
            &admin,
            json!({}),
        ),
        route(
            Method::POST,
            format!("/v1/admin/orders/{order}/shipments"),
            &admin,
            json!({}),
        ),
        route(Method::POST, "/v1/carts".into(), &customer, json!({})),
        route(
            Method::PUT,
            format!("/v1/carts/{cart}/lines/tea-01"),
            &customer,
            json!({"quantity": 3}),
        ),
        route(
            Method::POST,
            "/v1/checkouts".into(),
            &customer,
            json!({"cart_id": cart}),
        ),
        route(
            Method::POST,
            format!("/v1/checkouts/{checkout}/heartbeat"),
            &customer,
            json!({}),
        ),
        route(
            Method::POST,
            format!("/v1/checkouts/{checkout}/cancel"),
            &customer,
            json!({}),
        ),
        route(
            Method::POST,
            format!("/v1/checkouts/{checkout}/complete"),
            &customer,
            json!({"payment_method": "pm_card_visa"}),
        ),
        route(
            Method::POST,
            format!("/v1/flash-sales/{sale}/tokens"),
            &customer,
            json!({}),
        ),
        route(Method::POST, "/v1/demo/customers".into(), &None, json!({})),
        route(
            Method::POST,
            "/v1/demo/payments/pi_none/authenticate".into(),
            &customer,
            json!({"succeed": true}),
        ),
    ];
    let before = everything_visible(&app, &ada, &cart, &checkout, &sale).await;

    for route in &routes {
        let mut unknown = route.valid.clone();
        unknown["unexpected"] = json!(1);
        // (content type, body, status, code, what)
        let cases = [
            (
                "application/json",
                b"{,}".to_vec(),
                400,
                "invalid_json",
                "malformed JSON",
            ),
            (
                "text/plain",
                route.valid.to_string().into_bytes(),
                415,
                "unsupported_media_type",
                "a body that is not declared JSON",
            ),
            (
                "application/json",
                unknown.to_string().into_bytes(),
                422,
                "validation_failed",
                "an unknown field",
            ),
        ];
        for (content_type, body, status, code, what) in cases {
            let mut req = app
                .client
                .request(route.method.clone(), format!("{}{}", app.base, route.path))
                .header("content-type", content_type)
                .header("if-match", "\"1\"")
                .header(
                    "idempotency-key",
                    format!("errors-{}", uuid::Uuid::new_v4()),
                )
                .body(body);
            if let Some(token) = &route.token {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.expect("request");
            let got = resp.status().as_u16();
            let answer: serde_json::Value = resp.json().await.expect("an error body is JSON");

            assert_eq!(
                (got, answer["error"]["code"].as_str()),
                (status, Some(code)),
                "{} {}, {what}: {answer}",
                route.method,
                route.path
            );
        }
    }

    assert_eq!(
        everything_visible(&app, &ada, &cart, &checkout, &sale).await,
        before,
        "a rejected request changed something"
    );
    app.audit().await.assert_clean();
}

// PostgreSQL only: a store that stops answering.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_503_while_the_database_refuses_connections() {
    let app = spawn_app(StoreKind::Postgres).await;
    app.get("/readyz", None).await.assert_status(200);

    // The database stops answering the app.
    let outage = DatabaseOutage::begin(&app).await;

    eventually(15, "/readyz notices", || async {
        app.get("/readyz", None).await.status.as_u16() == 503
    })
    .await;
    let resp = app.get("/readyz", None).await;
    resp.assert_error(503, "unavailable");
    assert!(resp.headers["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("application/json"));
    app.get("/healthz", None).await.assert_status(200);

    outage.end().await;
    eventually(15, "/readyz recovers", || async {
        app.get("/readyz", None).await.status.as_u16() == 200
    })
    .await;
}
