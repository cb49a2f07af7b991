//! Flash sales counted in units (issue 15): a per-buyer limit on every sale, refunds that give
//! units back to the sale, a gate rebuilt from the database after a restart or lost Redis
//! keys, and the governing sale decided on the lines the reservation really reserves.
//! PostgreSQL runs with the Redis gate, SQLite with the in-process gate.

use holdfast::store::StoreKind;
use serde_json::{json, Value};

use crate::both_stores;
use crate::flash_sale::{app_for, checkout_with_token, open_sale, take_token};
use crate::helpers::{AssertClean, Customer, Options, TestApp};
use crate::saga::{deliver_signed, refund_event};

both_stores!(
    one_token_buys_no_more_than_the_buyers_limit,
    a_buyer_may_buy_up_to_the_limit_over_several_checkouts_and_no_more,
    a_refunded_sale_unit_goes_to_the_next_buyer,
    a_refund_by_webhook_gives_the_unit_back_to_the_sale,
    a_sale_item_added_after_the_gate_decided_is_not_reserved_without_admission,
);

/// Opens a sale with a per-buyer limit; answers its id.
async fn open_limited_sale(app: &TestApp, sku: &str, units: i64, max_per_buyer: i64) -> String {
    let resp = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({ "sku": sku, "units": units, "max_per_buyer": max_per_buyer }),
        )
        .await;
    resp.assert_status(201);
    assert_eq!(resp.body["max_per_buyer"], max_per_buyer, "{:?}", resp.body);
    resp.str("id")
}

async fn sale_figures(app: &TestApp, sale: &str) -> Value {
    let resp = app
        .get(
            &format!("/v1/admin/flash-sales/{sale}"),
            Some(crate::helpers::ADMIN_TOKEN),
        )
        .await;
    resp.assert_status(200);
    resp.body
}

/// A buyer takes a token, checks out `cart` with it and pays: the paid checkout.
async fn buy(app: &TestApp, customer: &Customer, cart: &str, sale: &str) -> Value {
    let token = take_token(app, customer, sale).await;
    assert!(
        [200, 201].contains(&token.status.as_u16()),
        "{:?}",
        token.body
    );
    let started = checkout_with_token(app, customer, cart, &token.str("token")).await;
    started.assert_status(201);
    let id = started.str("id");
    let paid = app
        .complete(customer, &id, "pm_card_visa", &format!("pay-{id}"))
        .await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    paid.body
}

async fn one_token_buys_no_more_than_the_buyers_limit(kind: StoreKind) {
    // Arrange: a sale of 2 units (limit 1 by default) on a SKU with stock 10.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 10).await;
    let sale = open_sale(&app, "hot", 2, None).await;
    assert_eq!(sale_figures(&app, &sale).await["max_per_buyer"], 1);
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 10)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;

    // Act: Ada checks out the whole shelf with one token.
    let token = take_token(&app, &ada, &sale).await;
    token.assert_status(201);
    let refused = checkout_with_token(&app, &ada, &ada_cart, &token.str("token")).await;

    // Assert: refused, nothing reserved, and the details say what is allowed.
    refused.assert_error(409, "flash_sale_limit");
    assert_eq!(
        refused.body["error"]["details"],
        json!([{ "sku": "hot", "requested": 10, "limit": 1 }])
    );
    assert_eq!(app.stock_of("hot").await, (10, 0, 10));
    // With one unit in her cart she buys it; Bob buys the other; the sale counts both.
    app.set_line(&ada, &ada_cart, "hot", 1)
        .await
        .assert_status(200);
    buy(&app, &ada, &ada_cart, &sale).await;
    buy(&app, &bob, &bob_cart, &sale).await;
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 2, "{figures:?}");
    assert_eq!(app.stock_of("hot").await, (8, 0, 8));
    app.audit().await.assert_clean();
}

async fn a_buyer_may_buy_up_to_the_limit_over_several_checkouts_and_no_more(kind: StoreKind) {
    // Arrange: 3 units, at most 2 per buyer.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 10).await;
    let sale = open_limited_sale(&app, "hot", 3, 2).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 2)]).await;

    // Act + Assert: Ada buys one, then one more (her limit), then is refused.
    buy(&app, &ada, &ada_cart, &sale).await;
    let second_cart = app.new_cart(&ada).await;
    app.set_line(&ada, &second_cart, "hot", 2)
        .await
        .assert_status(200);
    let token = take_token(&app, &ada, &sale).await;
    token.assert_status(201);
    let over = checkout_with_token(&app, &ada, &second_cart, &token.str("token")).await;
    over.assert_error(409, "flash_sale_limit");
    assert_eq!(
        over.body["error"]["details"],
        json!([{ "sku": "hot", "requested": 2, "limit": 1 }])
    );
    app.set_line(&ada, &second_cart, "hot", 1)
        .await
        .assert_status(200);
    buy(&app, &ada, &second_cart, &sale).await;
    take_token(&app, &ada, &sale)
        .await
        .assert_error(409, "sold_out");
    // Bob wants 2 but only 1 is left: told exactly that, then buys the last one.
    let token = take_token(&app, &bob, &sale).await;
    token.assert_status(201);
    let over = checkout_with_token(&app, &bob, &bob_cart, &token.str("token")).await;
    over.assert_error(409, "flash_sale_limit");
    assert_eq!(
        over.body["error"]["details"],
        json!([{ "sku": "hot", "requested": 2, "limit": 1 }])
    );
    app.set_line(&bob, &bob_cart, "hot", 1)
        .await
        .assert_status(200);
    buy(&app, &bob, &bob_cart, &sale).await;
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 3, "{figures:?}");
    assert_eq!(app.stock_of("hot").await, (7, 0, 7));
    app.audit().await.assert_clean();
}

async fn a_refunded_sale_unit_goes_to_the_next_buyer(kind: StoreKind) {
    // Arrange: a 1-unit sale; Ada buys and pays.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 1).await;
    let sale = open_sale(&app, "hot", 1, None).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let paid = buy(&app, &ada, &ada_cart, &sale).await;
    take_token(&app, &bob, &sale)
        .await
        .assert_error(409, "sold_out");

    // Act: the admin refunds Ada's order.
    let order = paid["order_id"].as_str().expect("an order id").to_owned();
    app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await
        .assert_status(200);

    // Assert: the unit is back on the shelf and in the sale; Bob buys it.
    assert_eq!(app.stock_of("hot").await, (1, 0, 1));
    buy(&app, &bob, &bob_cart, &sale).await;
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 1, "{figures:?}");
    app.audit().await.assert_clean();
}

async fn a_refund_by_webhook_gives_the_unit_back_to_the_sale(kind: StoreKind) {
    // Arrange
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 1).await;
    let sale = open_sale(&app, "hot", 1, None).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let paid = buy(&app, &ada, &ada_cart, &sale).await;
    let intent = paid["payment_intent_id"]
        .as_str()
        .expect("a paid checkout names its payment")
        .to_owned();

    // Act: Stripe reports a full refund, twice.
    for _ in 0..2 {
        let (status, _) =
            deliver_signed(&app, &refund_event("evt_refund_1", &intent, 500, 500)).await;
        assert_eq!(status, 200);
    }

    // Assert
    assert_eq!(app.stock_of("hot").await, (1, 0, 1));
    buy(&app, &bob, &bob_cart, &sale).await;
    take_token(&app, &ada, &sale)
        .await
        .assert_error(409, "sold_out");
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 1, "{figures:?}");
    app.audit().await.assert_clean();
}

async fn a_sale_item_added_after_the_gate_decided_is_not_reserved_without_admission(
    kind: StoreKind,
) {
    // Arrange: a cart of a normal SKU; the gate decided "no sale" on it. Then the sale SKU is
    // added before the reservation's transaction reads the lines (the store is called with the
    // decision the service made on the earlier snapshot).
    let app = app_for(kind, Options::default()).await;
    app.new_product("tea", 450, 5).await;
    app.new_product("hot", 500, 5).await;
    open_sale(&app, "hot", 2, None).await;
    let created = app
        .admin_post("/v1/admin/customers", json!({ "name": "Ada" }))
        .await;
    created.assert_status(201);
    let ada = Customer {
        token: created.str("token"),
    };
    let customer = holdfast::domain::CustomerId::parse(&created.str("id")).expect("an id");
    let cart = app.new_cart(&ada).await;
    app.set_line(&ada, &cart, "tea", 1).await.assert_status(200);
    let decided = holdfast::store::NewCheckout {
        id: holdfast::domain::CheckoutId::new(),
        order_id: holdfast::domain::OrderId::new(),
        customer_id: customer,
        cart_id: holdfast::domain::CartId::parse(&cart).expect("a cart id"),
        now: app.clock.now(),
        ttl: chrono::Duration::minutes(3),
        max_lifetime: chrono::Duration::minutes(30),
        flash_sale: None,
        flash_sale_units: 0,
        open_sales: app
            .store
            .current_flash_sales(app.clock.now())
            .await
            .expect("the sales")
            .into_iter()
            .map(|sale| holdfast::store::OpenSale {
                id: sale.id,
                sku: sale.sku,
            })
            .collect(),
    };
    app.set_line(&ada, &cart, "hot", 1).await.assert_status(200);

    // Act
    let reserved = app.store.reserve_checkout(&decided).await;

    // Assert: refused and rolled back; nothing of the sale SKU is held.
    assert!(
        matches!(
            reserved,
            Err(holdfast::store::StoreError::AdmissionRequired)
        ),
        "{reserved:?}"
    );
    assert_eq!(app.stock_of("hot").await, (5, 0, 5));
    assert_eq!(app.stock_of("tea").await, (5, 0, 5));
    // The customer's own request is still told to bring a token.
    app.start_checkout(&ada, &cart)
        .await
        .assert_error(403, "admission_required");
    app.audit().await.assert_clean();
}
