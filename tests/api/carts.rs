//! Carts: own carts only, lines bounded, unknown SKUs refused.

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::json;

use crate::both_stores;
use crate::helpers::spawn_app;

both_stores!(
    a_customer_builds_a_cart,
    another_customers_cart_is_not_found,
    cart_lines_refuse_bad_quantities_and_unknown_skus_and_change_nothing,
    a_post_without_a_documented_body_accepts_nothing_or_an_empty_object,
);

async fn a_customer_builds_a_cart(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    app.new_product("cup-02", 1200, 3).await;
    let ada = app.new_customer("Ada").await;
    let cart = app.new_cart(&ada).await;

    let resp = app.set_line(&ada, &cart, "tea-01", 2).await;
    resp.assert_status(200);
    app.set_line(&ada, &cart, "cup-02", 1)
        .await
        .assert_status(200);
    // Setting a line again replaces its quantity.
    app.set_line(&ada, &cart, "tea-01", 3)
        .await
        .assert_status(200);

    let got = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    got.assert_status(200);
    assert_eq!(got.body["id"], cart.as_str());
    assert_eq!(
        got.body["lines"],
        json!([{"sku": "cup-02", "quantity": 1}, {"sku": "tea-01", "quantity": 3}])
    );

    let removed = app
        .request(
            Method::DELETE,
            &format!("/v1/carts/{cart}/lines/cup-02"),
            Some(&ada.token),
            None,
        )
        .await;
    removed.assert_status(200);
    assert_eq!(
        removed.body["lines"],
        json!([{"sku": "tea-01", "quantity": 3}])
    );
}

async fn another_customers_cart_is_not_found(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let ada = app.new_customer("Ada").await;
    let bob = app.new_customer("Bob").await;
    let cart = app.new_cart(&ada).await;
    app.set_line(&ada, &cart, "tea-01", 1)
        .await
        .assert_status(200);

    app.get(&format!("/v1/carts/{cart}"), Some(&bob.token))
        .await
        .assert_error(404, "cart_not_found");
    app.set_line(&bob, &cart, "tea-01", 5)
        .await
        .assert_error(404, "cart_not_found");
    app.request(
        Method::DELETE,
        &format!("/v1/carts/{cart}/lines/tea-01"),
        Some(&bob.token),
        None,
    )
    .await
    .assert_error(404, "cart_not_found");
    app.start_checkout(&bob, &cart)
        .await
        .assert_error(404, "cart_not_found");
    // Ada's cart is untouched.
    let got = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(got.body["lines"], json!([{"sku": "tea-01", "quantity": 1}]));
    app.get("/v1/carts/not-a-uuid", Some(&ada.token))
        .await
        .assert_error(404, "cart_not_found");
}

async fn cart_lines_refuse_bad_quantities_and_unknown_skus_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    let ada = app.new_customer("Ada").await;
    let cart = app.new_cart(&ada).await;
    app.set_line(&ada, &cart, "tea-01", 2)
        .await
        .assert_status(200);
    let before = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    before.assert_status(200);

    let cases = [
        (json!({"quantity": 0}), 422, "validation_failed", "zero"),
        (
            json!({"quantity": -1}),
            422,
            "validation_failed",
            "negative",
        ),
        (
            json!({"quantity": 10001}),
            422,
            "validation_failed",
            "above the limit",
        ),
        (
            json!({"quantity": 1.5}),
            422,
            "validation_failed",
            "a fraction",
        ),
        (
            json!({"quantity": "2"}),
            422,
            "validation_failed",
            "a string",
        ),
        (
            json!({"quantity": 9223372036854775807i64}),
            422,
            "validation_failed",
            "i64 max",
        ),
        (json!({}), 422, "validation_failed", "missing"),
        (
            json!({"quantity": 1, "price": 1}),
            422,
            "validation_failed",
            "a client price",
        ),
    ];
    for (body, status, code, what) in cases {
        let resp = app
            .request(
                Method::PUT,
                &format!("/v1/carts/{cart}/lines/tea-01"),
                Some(&ada.token),
                Some(body),
            )
            .await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (status, code),
            "{what}: {:?}",
            resp.body
        );
    }
    app.set_line(&ada, &cart, "no-such-sku", 1)
        .await
        .assert_error(404, "product_not_found");
    app.set_line(&ada, &cart, "bad%2Fsku", 1)
        .await
        .assert_error(404, "product_not_found");
    let after = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(
        after.body, before.body,
        "rejected requests changed the cart"
    );
    assert_eq!(
        after.body["lines"],
        json!([{"sku": "tea-01", "quantity": 2}])
    );

    app.set_line(&ada, &cart, "tea-01", 10_000)
        .await
        .assert_status(200);

    let got = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(
        got.body["lines"],
        json!([{"sku": "tea-01", "quantity": 10000}])
    );
}

async fn a_post_without_a_documented_body_accepts_nothing_or_an_empty_object(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let ada = app.new_customer("Ada").await;
    app.request(Method::POST, "/v1/carts", Some(&ada.token), None)
        .await
        .assert_status(201);
    let resp = app.post("/v1/carts", Some(&ada.token), json!({})).await;
    resp.assert_status(201);
    assert_eq!(resp.body["lines"], json!([]));
    app.post("/v1/carts", Some(&ada.token), json!({"lines": []}))
        .await
        .assert_error(422, "validation_failed");
}
