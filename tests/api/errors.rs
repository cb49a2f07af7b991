//! Bad input and missing credentials: every answer is the contract's JSON error body with the
//! right status, and a rejected request changes nothing (promise 7).

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::json;

use crate::both_stores;
use crate::helpers::{spawn_app, TestApp, ADMIN_TOKEN};

both_stores!(
    missing_or_wrong_tokens_are_refused,
    malformed_bodies_get_the_error_body_and_change_nothing,
    unknown_routes_and_methods_get_the_error_body,
    bad_products_are_refused_and_change_nothing,
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
