//! The operator's view (`GET /v1/admin/ops`), the demo routes that exist only beside the
//! payment simulator, the `--demo` catalogue, and the pages served by the service itself.

use chrono::Utc;
use holdfast::domain::{FlashSaleId, NewFlashSale, Sku};
use holdfast::store::StoreKind;
use serde_json::json;

use crate::both_stores;
use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::helpers::{eventually, spawn_app, spawn_app_with, AssertClean, Options, ADMIN_TOKEN};

both_stores!(
    the_ops_view_counts_checkouts_orders_failures_and_flash_sales,
    a_demo_customer_can_shop_and_pass_3d_secure_on_the_simulator,
    the_demo_catalogue_is_seeded_once_into_an_empty_store,
    the_ops_view_follows_a_live_sale_and_shows_a_refund_among_the_compensations,
    the_ops_view_lists_a_refund_stripe_failed,
);

async fn the_ops_view_counts_checkouts_orders_failures_and_flash_sales(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    app.new_product("hot-01", 900, 10).await;
    let (ada, paid, _) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    app.complete(&ada, &paid, "pm_card_visa", "k1").await;
    let (bob, declined, _) = app.reserved_checkout("Bob", &[("tea-01", 2)]).await;
    app.complete(&bob, &declined, "pm_card_chargeDeclined", "k2")
        .await;
    let sale = NewFlashSale {
        id: FlashSaleId::new(),
        sku: Sku::parse("hot-01").unwrap(),
        units: 3,
        max_per_buyer: 1,
        starts_at: Utc::now(),
        ends_at: None,
        reservation_ttl: chrono::Duration::minutes(5),
    };
    app.store
        .create_flash_sale(&sale, Utc::now())
        .await
        .expect("a sale opens");

    let ops = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;

    ops.assert_status(200);
    let body = &ops.body;
    assert_eq!(body["checkouts_by_state"]["completed"], 1);
    assert_eq!(body["checkouts_by_state"]["payment_failed"], 1);
    assert_eq!(body["orders_by_status"]["paid"], 1);
    assert_eq!(body["orders_by_status"]["payment_failed"], 1);
    assert!(body["outbox"]["unpublished"].as_i64().is_some());
    let failures = body["recent_failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["checkout_id"], declined.as_str());
    assert_eq!(failures[0]["state"], "payment_failed");
    assert_eq!(failures[0]["decline_code"], "generic_decline");
    assert_eq!(
        failures[0]["total"],
        json!({"amount": 900, "currency": "EUR"})
    );
    let sales = body["flash_sales"].as_array().expect("sales");
    assert_eq!(sales.len(), 1);
    assert_eq!(sales[0]["sku"], "hot-01");
    assert_eq!(sales[0]["units"], 3);
    assert_eq!(
        (
            &sales[0]["tokens_held"],
            &sales[0]["in_checkout"],
            &sales[0]["sold"]
        ),
        (&json!(0), &json!(0), &json!(0))
    );
    // The operator's view is the admin's only.
    app.get("/v1/admin/ops", None)
        .await
        .assert_error(401, "unauthorized");
    app.get("/v1/admin/ops", Some(&ada.token))
        .await
        .assert_error(403, "forbidden");
    eventually(10, "the outbox drains", || async {
        app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await.body["outbox"]["unpublished"] == 0
    })
    .await;
    let drained = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;
    assert!(drained.body["outbox"]["oldest_unpublished_age_seconds"].is_null());
    app.audit().await.assert_clean();
}

async fn a_demo_customer_can_shop_and_pass_3d_secure_on_the_simulator(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;

    let made = app.post("/v1/demo/customers", None, json!({})).await;

    made.assert_status(201);
    let token = made.str("token");
    assert!(made.str("name").starts_with("Guest "));
    let guest = crate::helpers::Customer { token };
    let cart = app.new_cart(&guest).await;
    app.set_line(&guest, &cart, "tea-01", 1)
        .await
        .assert_status(200);
    let started = app.start_checkout(&guest, &cart).await;
    started.assert_status(201);
    let checkout = started.str("id");
    let pending = app
        .complete(&guest, &checkout, "pm_card_authenticationRequired", "k")
        .await;
    assert_eq!(pending.body["state"], "requires_action");
    let intent = pending.str("payment_intent_id");
    let path = format!("/v1/demo/payments/{intent}/authenticate");
    // Someone else's payment is not found, and nothing moves.
    let mallory = app.new_customer("Mallory").await;
    app.post(&path, Some(&mallory.token), json!({"succeed": true}))
        .await
        .assert_error(404, "payment_not_found");
    app.post(&path, None, json!({"succeed": true}))
        .await
        .assert_error(401, "unauthorized");
    app.post(&path, Some(&guest.token), json!({"succeed": "yes"}))
        .await
        .assert_error(422, "validation_failed");
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4));

    let passed = app
        .post(&path, Some(&guest.token), json!({"succeed": true}))
        .await;

    passed.assert_status(200);
    assert_eq!(passed.body["status"], "succeeded");
    let order_path = format!("/v1/orders/{}", started.str("order_id"));
    eventually(10, "the webhook pays the order", || async {
        app.get(&order_path, Some(&guest.token)).await.body["status"] == "paid"
    })
    .await;
    app.post(&path, Some(&guest.token), json!({"succeed": true}))
        .await
        .assert_error(409, "invalid_state");
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_routes_do_not_exist_with_a_real_payment_gateway() {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        StoreKind::Sqlite,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..Options::default()
        },
    )
    .await;
    let customer = app.new_customer("Ada").await;

    app.post("/v1/demo/customers", None, json!({}))
        .await
        .assert_error(404, "route_not_found");
    app.post(
        "/v1/demo/payments/pi_123/authenticate",
        Some(&customer.token),
        json!({"succeed": true}),
    )
    .await
    .assert_error(404, "route_not_found");
}

async fn the_demo_catalogue_is_seeded_once_into_an_empty_store(kind: StoreKind) {
    let app = spawn_app(kind).await;

    let first = holdfast::demo::seed(app.store.as_ref(), Utc::now())
        .await
        .expect("seeding works");
    let second = holdfast::demo::seed(app.store.as_ref(), Utc::now())
        .await
        .expect("seeding again works");

    assert!(first.products >= 24 && first.flash_sale, "{first:?}");
    assert!(
        first.company.is_some() && second.company.is_none(),
        "{first:?}"
    );
    assert_eq!(second.products, 0, "a filled catalogue is left alone");
    // Seeded under the HTTP layer: the in-memory catalogue shows it within its staleness bound.
    crate::helpers::eventually(5, "the catalogue shows the seeded products", || async {
        let products = app.get("/v1/products?limit=500", None).await;
        products.body["data"].as_array().map(Vec::len) == Some(first.products)
    })
    .await;
    let products = app.get("/v1/products?limit=500", None).await;
    let data = products.body["data"].as_array().expect("products");
    assert_eq!(data.len(), first.products);
    assert!(data.iter().all(|p| p["price"]["currency"] == "EUR"));
    let single = app
        .get(
            &format!("/v1/products/{}", holdfast::demo::LAST_UNIT_SKU),
            None,
        )
        .await;
    assert_eq!(single.body["available"], 1);
    let ops = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        ops.body["flash_sales"][0]["sku"],
        holdfast::demo::FLASH_SALE_SKU
    );
    app.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_and_their_files_are_served_without_a_token() {
    let app = spawn_app(StoreKind::Sqlite).await;

    for (path, kind) in [
        ("/", "text/html"),
        ("/ops", "text/html"),
        ("/ui/style.css", "text/css"),
        ("/ui/common.js", "text/javascript"),
        ("/ui/shop.js", "text/javascript"),
        ("/ui/ops.js", "text/javascript"),
    ] {
        let resp = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("the app answers");
        assert_eq!(resp.status(), 200, "{path}");
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        if kind == "text/html" {
            let csp = resp.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(csp.contains("script-src 'self'"), "{csp}");
        }
        assert!(!resp.text().await.unwrap().is_empty(), "{path}");
    }
    app.get("/ui/../Cargo.toml", None).await.assert_status(404);
    app.get("/ui/secrets.txt", None)
        .await
        .assert_error(404, "not_found");
}

async fn the_ops_view_follows_a_live_sale_and_shows_a_refund_among_the_compensations(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("hot-01", 900, 10).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 3}),
        )
        .await;
    sale.assert_status(201);
    let tokens = format!("/v1/flash-sales/{}/tokens", sale.str("id"));
    // Ada buys one unit with her token; Bob holds a token and has not checked out yet.
    let (ada, cart) = app.buyer_with("Ada", &[("hot-01", 1)]).await;
    let token = app.post(&tokens, Some(&ada.token), json!({})).await;
    token.assert_status(201);
    let started = app
        .post(
            "/v1/checkouts",
            Some(&ada.token),
            json!({"cart_id": cart, "flash_sale_token": token.str("token")}),
        )
        .await;
    started.assert_status(201);
    let paid = app
        .complete(&ada, &started.str("id"), "pm_card_visa", "ops-sale")
        .await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    let bob = app.new_customer("Bob").await;
    app.post(&tokens, Some(&bob.token), json!({}))
        .await
        .assert_status(201);

    let during = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;

    during.assert_status(200);
    let sales = during.body["flash_sales"].as_array().expect("sales");
    assert_eq!(sales.len(), 1, "{sales:?}");
    assert_eq!(sales[0]["sold"], 1, "{sales:?}");
    assert_eq!(sales[0]["tokens_held"], 1, "Bob's token: {sales:?}");
    assert_eq!(sales[0]["in_checkout"], 0, "{sales:?}");

    // A refund is a compensation the operator sees.
    app.admin_post(
        &format!("/v1/admin/orders/{}/refund", started.str("order_id")),
        json!({}),
    )
    .await
    .assert_status(200);
    let after = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;
    let failures = after.body["recent_failures"].as_array().expect("failures");
    assert!(
        failures
            .iter()
            .any(|f| f["checkout_id"] == started.str("id").as_str() && f["state"] == "refunded"),
        "{failures:?}"
    );
    assert_eq!(after.body["orders_by_status"]["refunded"], 1);
    app.audit().await.assert_clean();
}

async fn the_ops_view_lists_a_refund_stripe_failed(kind: StoreKind) {
    let fake = FakeStripe::start().await;
    let app = spawn_app_with(
        kind,
        Options {
            stripe: Some((fake.base_url(), SECRET_KEY.to_owned())),
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, refused, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let paid = app.complete(&ada, &refused, "pm_card_visa", "k1").await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    let (bob, kept, _) = app.reserved_checkout("Bob", &[("tea-01", 1)]).await;
    let paid = app.complete(&bob, &kept, "pm_card_visa", "k2").await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    fake.answer_refunds_with(Some("failed"));
    app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await
        .assert_status(200);

    let ops = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;

    ops.assert_status(200);
    let failures = ops.body["recent_failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "only the failed refund: {failures:?}");
    assert_eq!(failures[0]["checkout_id"], refused.as_str());
    assert_eq!(failures[0]["order_id"], order.as_str());
    assert_eq!(failures[0]["state"], "completed");
    assert_eq!(failures[0]["refund_status"], "failed");
    assert_eq!(failures[0]["refund_due"], false);
    assert!(
        failures[0]["refund_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("re_")),
        "{failures:?}"
    );
    assert_eq!(ops.body["orders_by_status"]["paid"], 2);
    app.audit().await.assert_clean();
}
