//! Carts: own carts only, lines bounded, unknown SKUs refused; a checkout reserves exactly the
//! lines the cart held when it started.

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::json;

use crate::both_stores;
use crate::helpers::{spawn_app, AssertClean as _};

both_stores!(
    a_customer_builds_a_cart,
    another_customers_cart_is_not_found,
    cart_lines_refuse_bad_quantities_and_unknown_skus_and_change_nothing,
    a_post_without_a_documented_body_accepts_nothing_or_an_empty_object,
    removing_lines_answers_the_cart_as_it_is_and_a_held_cart_refuses_every_change,
    a_line_changed_while_the_checkout_starts_is_in_the_order_or_refused,
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

async fn removing_lines_answers_the_cart_as_it_is_and_a_held_cart_refuses_every_change(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 7).await;
    app.new_product("cup-02", 1200, 3).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let remove = |sku: &'static str| {
        let (app, token, cart) = (&app, ada.token.clone(), cart.clone());
        async move {
            app.request(
                Method::DELETE,
                &format!("/v1/carts/{cart}/lines/{sku}"),
                Some(&token),
                None,
            )
            .await
        }
    };

    // A SKU that is not in the cart, or not in the catalogue, removes nothing.
    for sku in ["cup-02", "no-such-sku"] {
        let resp = remove(sku).await;
        resp.assert_status(200);
        assert_eq!(
            resp.body["lines"],
            json!([{"sku": "tea-01", "quantity": 2}])
        );
    }
    let emptied = remove("tea-01").await;
    emptied.assert_status(200);
    assert_eq!(emptied.body["id"], cart.as_str());
    assert_eq!(emptied.body["lines"], json!([]));
    let got = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(got.body["lines"], json!([]));

    app.set_line(&ada, &cart, "cup-02", 1)
        .await
        .assert_status(200);
    app.start_checkout(&ada, &cart).await.assert_status(201);
    // Held by its checkout: the cart refuses every change, the unknown SKU included (the
    // cart's state is judged first), and stays as it was.
    for sku in ["cup-02", "tea-01", "no-such-sku"] {
        app.set_line(&ada, &cart, sku, 3)
            .await
            .assert_error(409, "cart_not_open");
        remove(sku).await.assert_error(409, "cart_not_open");
    }
    let held = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(
        held.body["lines"],
        json!([{"sku": "cup-02", "quantity": 1}])
    );
    app.audit().await.assert_clean();
}

/// A line change racing the checkout start of the same cart: it lands before the start (and is
/// reserved with the rest) or after it (`cart_not_open`), never half-way, so the order holds
/// exactly the lines the cart shows.
async fn a_line_changed_while_the_checkout_starts_is_in_the_order_or_refused(kind: StoreKind) {
    const ROUNDS: usize = 12;
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 1_000).await;
    app.new_product("cup-02", 1200, 1_000).await;
    let mut landed = [0usize; 2];
    for round in 0..ROUNDS {
        let (ada, cart) = app
            .buyer_with(&format!("Ada {round}"), &[("tea-01", 1)])
            .await;
        // Both requests are in flight together: which one the store takes first is the race.
        let change = async {
            if round % 2 == 0 {
                app.set_line(&ada, &cart, "cup-02", 2).await
            } else {
                app.request(
                    Method::DELETE,
                    &format!("/v1/carts/{cart}/lines/tea-01"),
                    Some(&ada.token),
                    None,
                )
                .await
            }
        };
        let (changed, started) = tokio::join!(change, app.start_checkout(&ada, &cart));

        let cart_now = app
            .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
            .await;
        match started.status.as_u16() {
            201 => {
                let order = app
                    .get(
                        &format!("/v1/orders/{}", started.str("order_id")),
                        Some(&ada.token),
                    )
                    .await;
                order.assert_status(200);
                let ordered: Vec<_> = order.body["lines"]
                    .as_array()
                    .expect("order lines")
                    .iter()
                    .map(|l| json!({"sku": l["sku"], "quantity": l["quantity"]}))
                    .collect();
                assert_eq!(json!(ordered), cart_now.body["lines"], "round {round}");
                match changed.status.as_u16() {
                    200 => landed[0] += 1,
                    _ => {
                        changed.assert_error(409, "cart_not_open");
                        landed[1] += 1;
                    }
                }
            }
            // The removal of the only line came first: nothing to check out.
            _ => {
                started.assert_error(422, "cart_empty");
                changed.assert_status(200);
                assert_eq!(cart_now.body["lines"], json!([]), "round {round}");
            }
        }
    }
    assert!(landed.iter().sum::<usize>() > 0, "some start was granted");
    app.audit().await.assert_clean();
}
