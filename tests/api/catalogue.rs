//! Admin catalogue, optimistic concurrency on products, the public catalogue, health.

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::json;

use crate::both_stores;
use crate::helpers::{eventually, spawn_app, spawn_app_with, AssertClean, Options, ADMIN_TOKEN};

both_stores!(
    health_and_readiness_answer_without_a_token,
    an_admin_creates_a_customer_and_gets_a_token_once,
    an_admin_creates_a_product_that_the_public_catalogue_shows,
    a_duplicate_sku_is_a_conflict_and_changes_nothing,
    a_patch_needs_the_current_version_and_answers_a_new_etag,
    lists_page_with_a_cursor,
    the_catalogue_answers_304_until_a_checkout_moves_availability,
    catalogue_reads_take_no_connection_from_the_store_pool,
);

async fn health_and_readiness_answer_without_a_token(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let health = app.get("/healthz", None).await;
    health.assert_status(200);
    let ready = app.get("/readyz", None).await;
    ready.assert_status(200);
    assert_eq!(ready.body["store"], kind.as_str());
    let id = health.headers.get("x-request-id").expect("a request id");
    assert!(!id.is_empty());
}

async fn an_admin_creates_a_customer_and_gets_a_token_once(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let resp = app
        .admin_post("/v1/admin/customers", json!({"name": "Ada"}))
        .await;
    resp.assert_status(201);
    let token = resp.str("token");
    assert!(token.len() >= 40, "a long random token");
    assert!(!resp.str("id").is_empty());
    // The token works for customer routes.
    app.request(Method::POST, "/v1/carts", Some(&token), None)
        .await
        .assert_status(201);
    // Two customers never share a token.
    let other = app
        .admin_post("/v1/admin/customers", json!({"name": "Ada"}))
        .await;
    assert_ne!(other.str("token"), token);
}

async fn an_admin_creates_a_product_that_the_public_catalogue_shows(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let created = app.new_product("tea-01", 450, 7).await;
    assert_eq!(created.headers["etag"], "\"1\"");
    assert_eq!(
        created.body,
        json!({"sku": "tea-01", "name": "Product tea-01", "price": {"amount": 450, "currency": "EUR"},
               "stock": 7, "reserved": 0, "available": 7, "version": 1})
    );
    let public = app.get("/v1/products/tea-01", None).await;
    public.assert_status(200);
    assert_eq!(
        public.body,
        json!({"sku": "tea-01", "name": "Product tea-01", "price": {"amount": 450, "currency": "EUR"}, "available": 7})
    );
    app.get("/v1/products/nope", None)
        .await
        .assert_error(404, "product_not_found");
    app.get("/v1/products/bad%20sku", None)
        .await
        .assert_error(404, "product_not_found");
    app.audit().await.assert_clean();
}

async fn a_duplicate_sku_is_a_conflict_and_changes_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let before = app.inventory_snapshot().await;
    let dup = app
        .admin_post(
            "/v1/admin/products",
            json!({"sku": "tea-01", "name": "Other", "price": {"amount": 1, "currency": "EUR"}, "stock": 99}),
        )
        .await;
    dup.assert_error(409, "sku_taken");
    assert_eq!(app.inventory_snapshot().await, before);
}

async fn a_patch_needs_the_current_version_and_answers_a_new_etag(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let patch = |if_match: Option<&'static str>, body: serde_json::Value| {
        let app = &app;
        async move {
            let mut req = app
                .client
                .patch(format!("{}/v1/admin/products/tea-01", app.base))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body);
            if let Some(v) = if_match {
                req = req.header("If-Match", v);
            }
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let etag = resp
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = resp.json().await.expect("json");
            (status, etag, body)
        }
    };

    let (status, _, body) = patch(None, json!({"stock": 9})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (428, Some("precondition_required"))
    );

    let (status, etag, body) = patch(Some("\"1\""), json!({"stock": 9, "name": "Green tea"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(etag.as_deref(), Some("\"2\""));
    assert_eq!(
        (body["stock"].as_i64(), body["version"].as_i64()),
        (Some(9), Some(2))
    );
    assert_eq!(body["name"], "Green tea");

    let before = app.inventory_snapshot().await;
    let (status, _, body) = patch(Some("\"1\""), json!({"stock": 1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (412, Some("version_mismatch"))
    );
    let (status, _, body) = patch(Some("seven"), json!({"stock": 1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_if_match"))
    );
    let (status, _, body) = patch(Some("\"2\""), json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    let (status, _, body) = patch(Some("\"2\""), json!({"stock": -1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    let (status, _, body) = patch(Some("\"2\""), json!({"reserved": 0})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    assert_eq!(
        app.inventory_snapshot().await,
        before,
        "rejected patches change nothing"
    );

    let (status, _, body) = patch(
        Some("\"2\""),
        json!({"price": {"amount": 500, "currency": "EUR"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["price"]["amount"], 500);
    app.audit().await.assert_clean();
}

async fn lists_page_with_a_cursor(kind: StoreKind) {
    let app = spawn_app(kind).await;
    for i in 0..5 {
        app.new_product(&format!("sku-{i}"), 100, 1).await;
    }
    let first = app.get("/v1/products?limit=2", None).await;
    first.assert_status(200);
    let skus = |r: &crate::helpers::Resp| -> Vec<String> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["sku"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(skus(&first), ["sku-0", "sku-1"]);
    let cursor = first.str("next_cursor");
    let second = app
        .get(&format!("/v1/products?limit=2&cursor={cursor}"), None)
        .await;
    assert_eq!(skus(&second), ["sku-2", "sku-3"]);
    let third = app
        .get(
            &format!("/v1/products?limit=2&cursor={}", second.str("next_cursor")),
            None,
        )
        .await;
    assert_eq!(skus(&third), ["sku-4"]);
    assert!(third.body["next_cursor"].is_null());

    let all = app.get("/v1/admin/inventory", Some(ADMIN_TOKEN)).await;
    assert_eq!(all.body["data"].as_array().unwrap().len(), 5);
    assert_eq!(
        all.body["data"][0],
        json!({"sku": "sku-0", "name": "Product sku-0", "price": {"amount": 100, "currency": "EUR"},
               "stock": 1, "reserved": 0, "available": 1, "version": 1})
    );
    app.get("/v1/products?limit=0", None)
        .await
        .assert_error(422, "validation_failed");
    app.get("/v1/products?limit=501", None)
        .await
        .assert_error(422, "validation_failed");
    app.get("/v1/products?limit=x", None)
        .await
        .assert_error(400, "invalid_query");
    app.get("/v1/products?colour=red", None)
        .await
        .assert_error(400, "invalid_query");
}

async fn get_if_none_match(
    app: &crate::helpers::TestApp,
    path: &str,
    etag: &str,
) -> (u16, String, String) {
    let resp = app
        .client
        .get(format!("{}{path}", app.base))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("request reaches the app");
    let status = resp.status().as_u16();
    let tag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, tag, resp.text().await.expect("body"))
}

async fn the_catalogue_answers_304_until_a_checkout_moves_availability(kind: StoreKind) {
    // Arrange
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await.assert_status(201);
    app.new_product("tea-02", 300, 9).await.assert_status(201);
    let one = app.get("/v1/products/tea-01", None).await;
    let one_tag = one.headers["etag"].to_str().expect("etag").to_owned();
    let list = app.get("/v1/products", None).await;
    let list_tag = list.headers["etag"].to_str().expect("etag").to_owned();
    assert_ne!(one_tag, list_tag);

    // Act + assert: unchanged is 304 with no body, for one product and for the list.
    let (status, tag, body) = get_if_none_match(&app, "/v1/products/tea-01", &one_tag).await;
    assert_eq!(
        (status, tag.as_str(), body.as_str()),
        (304, one_tag.as_str(), "")
    );
    let (status, _, body) = get_if_none_match(&app, "/v1/products", &list_tag).await;
    assert_eq!((status, body.as_str()), (304, ""));
    let (status, _, _) = get_if_none_match(&app, "/v1/products/tea-01", "\"other\", W/\"x\"").await;
    assert_eq!(status, 200, "another tag is not a match");

    // A checkout reserves two units: the next read shows them gone, under a new tag.
    app.reserved_checkout("Ada", &[("tea-01", 2)]).await;
    let (status, tag, body) = get_if_none_match(&app, "/v1/products/tea-01", &one_tag).await;
    assert_eq!(status, 200);
    assert_ne!(tag, one_tag);
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["available"], 3);
    let (status, _, body) = get_if_none_match(&app, "/v1/products", &list_tag).await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["data"][0]["available"], 3);
    assert_eq!(body["data"][1]["available"], 9);
    // The other product's tag did not move.
    let two = app.get("/v1/products/tea-02", None).await;
    let (status, _, _) = get_if_none_match(
        &app,
        "/v1/products/tea-02",
        two.headers["etag"].to_str().expect("etag"),
    )
    .await;
    assert_eq!(status, 304);
    app.audit().await.assert_clean();
}

async fn catalogue_reads_take_no_connection_from_the_store_pool(kind: StoreKind) {
    // Arrange: no workers, so nothing else reaches for the pool meanwhile.
    let app = spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    for i in 0..3 {
        app.new_product(&format!("tea-{i:02}"), 450, 5)
            .await
            .assert_status(201);
    }
    app.get("/v1/products", None).await.assert_status(200);
    let before = app.store.acquisitions();

    // Act
    for _ in 0..20 {
        app.get("/v1/products?limit=2", None)
            .await
            .assert_status(200);
        app.get("/v1/products/tea-01", None)
            .await
            .assert_status(200);
    }

    // Assert
    assert_eq!(app.store.acquisitions(), before);
    app.audit().await.assert_clean();
}

/// Two instances need a shared database: PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_on_one_instance_reaches_the_other_instance_catalogue() {
    // Arrange: two instances on one database; B has read the catalogue.
    let a = spawn_app(StoreKind::Postgres).await;
    a.new_product("tea-01", 450, 5).await.assert_status(201);
    let b = a.spawn_sibling().await;
    assert_eq!(
        b.get("/v1/products/tea-01", None).await.body["available"],
        5
    );

    // Act: A reserves.
    a.reserved_checkout("Ada", &[("tea-01", 2)]).await;

    // Assert: B's snapshot follows (notified, or at the latest at its next resync).
    eventually(5, "the other instance shows the reservation", || async {
        b.get("/v1/products/tea-01", None).await.body["available"] == 3
    })
    .await;
    b.stop().await;
    a.audit().await.assert_clean();
}
