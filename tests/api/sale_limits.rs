//! Flash sales counted in units: a per-buyer limit on every sale, refunds that give
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
    a_restart_mid_sale_remembers_who_bought_and_who_holds,
    many_buyers_with_carts_above_the_limit_buy_exactly_the_units,
    buyers_racing_across_a_restart_buy_exactly_the_units,
    refunds_during_an_open_sale_go_to_buyers_racing_for_them,
    invalid_utf8_in_a_path_parameter_answers_the_json_error_body,
    an_order_cursor_above_the_largest_sequence_is_an_invalid_cursor,
    only_the_admission_index_makes_a_checkout_insert_admission_in_use,
    the_audit_finds_a_sale_that_sold_more_than_its_units,
    a_buyer_waiting_for_authentication_cancels_and_the_unit_goes_to_the_next_buyer,
    an_abandoned_authentication_in_a_sale_ends_with_the_sales_window,
    a_sale_line_added_while_checkouts_start_is_never_reserved_without_admission,
);

/// The service starts again on the same database: a new process for the gate. The embedded
/// shape's in-process gate starts empty; for the production shape the sale's Redis keys are
/// deleted too, as a `FLUSHALL` or a Redis restart without persistence would (only this
/// test's own prefix).
async fn restart(app: TestApp) -> TestApp {
    let again = app.spawn_sibling().await;
    if app.kind == StoreKind::Postgres {
        crate::gate::delete_keys(&app.settings.redis_key_prefix).await;
    }
    app.stop().await;
    again
}

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
        capture_method: Default::default(),
        id: holdfast::domain::CheckoutId::new(),
        order_id: holdfast::domain::OrderId::new(),
        customer_id: customer,
        cart_id: holdfast::domain::CartId::parse(&cart).expect("a cart id"),
        now: app.clock.now(),
        ttl: chrono::Duration::minutes(3),
        max_lifetime: chrono::Duration::minutes(30),
        flash_sale: None,
        flash_sale_units: 0,
        po_number: None,
        idempotency_key: None,
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

async fn a_restart_mid_sale_remembers_who_bought_and_who_holds(kind: StoreKind) {
    // Arrange: a 3-unit sale; Ada bought one, Bob holds a live checkout of one.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 10).await;
    let sale = open_sale(&app, "hot", 3, None).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let (cy, cy_cart) = app.buyer_with("Cy", &[("hot", 1)]).await;
    let (dee, _) = app.buyer_with("Dee", &[("hot", 1)]).await;
    buy(&app, &ada, &ada_cart, &sale).await;
    let bobs_token = take_token(&app, &bob, &sale).await.str("token");
    let bobs = checkout_with_token(&app, &bob, &bob_cart, &bobs_token).await;
    bobs.assert_status(201);

    // Act
    let app = restart(app).await;

    // Assert: Ada is not admitted again; Bob's checkout still holds its unit; one is left.
    take_token(&app, &ada, &sale)
        .await
        .assert_error(409, "sold_out");
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(
        figures["figures"],
        json!({ "holders": 1, "held": 1, "sold": 1 }),
        "{figures:?}"
    );
    buy(&app, &cy, &cy_cart, &sale).await;
    take_token(&app, &dee, &sale)
        .await
        .assert_error(409, "sold_out");
    let paid = app
        .complete(&bob, &bobs.str("id"), "pm_card_visa", "bob-pays")
        .await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 3, "{figures:?}");
    assert_eq!(app.stock_of("hot").await, (7, 0, 7));
    app.audit().await.assert_clean();
}

/// What one buyer of a race ended with.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Paid for this many units.
    Bought(u64),
    /// Refused at the gate: nothing was left.
    SoldOut,
}

/// One buyer's whole visit: a token, a checkout of the cart (cut down to what the gate says
/// the buyer may have when the cart is above it), and the payment.
async fn visit(app: &TestApp, customer: &Customer, cart: &str, sale: &str) -> Outcome {
    for _ in 0..50 {
        let token = take_token(app, customer, sale).await;
        match token.status.as_u16() {
            200 | 201 => {}
            409 if token.code() == "sold_out" => return Outcome::SoldOut,
            // The gate fails closed while a sale is (re)loaded: come back.
            503 => continue,
            other => panic!("token: {other} {:?}", token.body),
        }
        let started = checkout_with_token(app, customer, cart, &token.str("token")).await;
        match started.status.as_u16() {
            201 => {}
            409 if started.code() == "flash_sale_limit" => {
                let limit = started.body["error"]["details"][0]["limit"]
                    .as_i64()
                    .expect("a limit");
                assert!(
                    limit >= 1,
                    "a holder may always have its unit: {:?}",
                    started.body
                );
                app.set_line(customer, cart, "hot", limit)
                    .await
                    .assert_status(200);
                continue;
            }
            503 => continue,
            other => panic!("checkout: {other} {:?}", started.body),
        }
        let id = started.str("id");
        let paid = app
            .complete(customer, &id, "pm_card_visa", &format!("pay-{id}"))
            .await;
        assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
        let units = paid.body["total"]["amount"].as_u64().expect("a total") / 500;
        return Outcome::Bought(units);
    }
    panic!("a buyer was sent round more than 50 times");
}

/// Every buyer visits at once (released together by a barrier).
async fn race(app: &TestApp, sale: &str, buyers: &[(Customer, String)]) -> Vec<Outcome> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(buyers.len()));
    let visits = buyers.iter().map(|(customer, cart)| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            visit(app, customer, cart, sale).await
        }
    });
    futures::future::join_all(visits).await
}

fn units_bought(outcomes: &[Outcome]) -> u64 {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Bought(units) => *units,
            Outcome::SoldOut => 0,
        })
        .sum()
}

async fn many_buyers_with_carts_above_the_limit_buy_exactly_the_units(kind: StoreKind) {
    // Arrange: 10 units, at most 2 per buyer; 40 buyers each want 3.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 30).await;
    let sale = open_limited_sale(&app, "hot", 10, 2).await;
    let buyers = crate::helpers::buyers(&app, 40, &[("hot", 3)]).await;

    // Act
    let outcomes = race(&app, &sale, &buyers).await;

    // Assert: exactly the sale's units sold, nobody above the limit, and nobody refused
    // while a unit remained (the units add up to the sale).
    assert_eq!(units_bought(&outcomes), 10, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Outcome::SoldOut | Outcome::Bought(1 | 2))));
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(
        figures["figures"],
        json!({ "holders": 0, "held": 0, "sold": 10 })
    );
    assert_eq!(app.stock_of("hot").await, (20, 0, 20));
    app.audit().await.assert_clean();
}

async fn buyers_racing_across_a_restart_buy_exactly_the_units(kind: StoreKind) {
    // Arrange: 12 units, 1 per buyer; 5 buyers bought before the restart.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 12).await;
    let sale = open_sale(&app, "hot", 12, None).await;
    let early = crate::helpers::buyers(&app, 5, &[("hot", 1)]).await;
    assert_eq!(units_bought(&race(&app, &sale, &early).await), 5);
    let app = restart(app).await;
    let late = crate::helpers::buyers(&app, 30, &[("hot", 1)]).await;

    // Act: the early buyers try again while 30 new ones race for what is left.
    let everyone: Vec<_> = early.into_iter().chain(late).collect();
    let outcomes = race(&app, &sale, &everyone).await;

    // Assert
    assert!(
        outcomes[..5].iter().all(|o| *o == Outcome::SoldOut),
        "a buyer who bought before the restart is not admitted again: {outcomes:?}"
    );
    assert_eq!(units_bought(&outcomes), 7, "{outcomes:?}");
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["sold"], 12, "{figures:?}");
    assert_eq!(app.stock_of("hot").await, (0, 0, 0));
    app.audit().await.assert_clean();
}

async fn refunds_during_an_open_sale_go_to_buyers_racing_for_them(kind: StoreKind) {
    // Arrange: a 4-unit sale, sold out to 4 buyers.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 4).await;
    let sale = open_sale(&app, "hot", 4, None).await;
    let first = crate::helpers::buyers(&app, 4, &[("hot", 1)]).await;
    let mut orders = Vec::new();
    for (customer, cart) in &first {
        let paid = buy(&app, customer, cart, &sale).await;
        orders.push(paid["order_id"].as_str().expect("an order").to_owned());
    }
    let late = crate::helpers::buyers(&app, 20, &[("hot", 1)]).await;

    // Act: two orders are refunded while 20 buyers race for the sale.
    let refunds = async {
        for order in &orders[..2] {
            app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
                .await
                .assert_status(200);
        }
    };
    let (raced, ()) = tokio::join!(race(&app, &sale, &late), refunds);
    // Whoever was refused before a refund landed comes back once it has.
    let mut outcomes = raced;
    for (i, (customer, cart)) in late.iter().enumerate() {
        if outcomes[i] == Outcome::SoldOut {
            outcomes[i] = visit(&app, customer, cart, &sale).await;
        }
    }

    // Assert: exactly the two refunded units were sold again, and no more.
    assert_eq!(units_bought(&outcomes), 2, "{outcomes:?}");
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(
        figures["figures"],
        json!({ "holders": 0, "held": 0, "sold": 4 })
    );
    assert_eq!(app.stock_of("hot").await, (0, 0, 0));
    app.audit().await.assert_clean();
}

// Hostile-input gaps: path parameters, cursors, constraint mapping.

async fn invalid_utf8_in_a_path_parameter_answers_the_json_error_body(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    let ada = app.new_customer("Ada").await;
    let cart = app.new_cart(&ada).await;
    for (path, token) in [
        ("/v1/products/%FF", None),
        (
            "/v1/admin/products/%C3%28",
            Some(crate::helpers::ADMIN_TOKEN),
        ),
        ("/v1/checkouts/%FF", Some(ada.token.as_str())),
    ] {
        app.get(path, token).await.assert_error(400, "invalid_path");
    }
    app.set_line(&ada, &cart, "%FF", 1)
        .await
        .assert_error(400, "invalid_path");
}

async fn an_order_cursor_above_the_largest_sequence_is_an_invalid_cursor(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    let ada = app.new_customer("Ada").await;
    for cursor in ["9223372036854775808", "18446744073709551615", "-1"] {
        app.get(&format!("/v1/orders?cursor={cursor}"), Some(&ada.token))
            .await
            .assert_error(400, "invalid_cursor");
    }
    let ok = app
        .get("/v1/orders?cursor=9223372036854775807", Some(&ada.token))
        .await;
    ok.assert_status(200);
}

async fn only_the_admission_index_makes_a_checkout_insert_admission_in_use(kind: StoreKind) {
    // Arrange: a checkout reserved; a second request reuses its checkout id (any unique
    // violation but the admission index's).
    let app = app_for(kind, Options::default()).await;
    app.new_product("tea", 450, 5).await;
    let created = app
        .admin_post("/v1/admin/customers", json!({ "name": "Ada" }))
        .await;
    let ada = Customer {
        token: created.str("token"),
    };
    let customer = holdfast::domain::CustomerId::parse(&created.str("id")).expect("an id");
    let mut requests = Vec::new();
    for _ in 0..2 {
        let cart = app.new_cart(&ada).await;
        app.set_line(&ada, &cart, "tea", 1).await.assert_status(200);
        requests.push(holdfast::store::NewCheckout {
            capture_method: Default::default(),
            id: holdfast::domain::CheckoutId::new(),
            order_id: holdfast::domain::OrderId::new(),
            customer_id: customer,
            cart_id: holdfast::domain::CartId::parse(&cart).expect("a cart id"),
            now: app.clock.now(),
            ttl: chrono::Duration::minutes(3),
            max_lifetime: chrono::Duration::minutes(30),
            flash_sale: None,
            flash_sale_units: 0,
            po_number: None,
            idempotency_key: None,
            open_sales: Vec::new(),
        });
    }
    requests[1].id = requests[0].id;
    app.store
        .reserve_checkout(&requests[0])
        .await
        .expect("the first checkout");

    // Act
    let second = app.store.reserve_checkout(&requests[1]).await;

    // Assert: a failure, but not "this admission already holds a live checkout".
    assert!(
        matches!(second, Err(holdfast::store::StoreError::Database(_))),
        "{second:?}"
    );
    assert_eq!(app.stock_of("tea").await, (5, 1, 4));
    app.audit().await.assert_clean();
}

async fn the_audit_finds_a_sale_that_sold_more_than_its_units(kind: StoreKind) {
    // Arrange: a 2-unit sale sold out, then its units cut to 1 under the store's feet.
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 5).await;
    let sale = open_sale(&app, "hot", 2, None).await;
    for (customer, cart) in crate::helpers::buyers(&app, 2, &[("hot", 1)]).await {
        buy(&app, &customer, &cart, &sale).await;
    }
    app.audit().await.assert_clean();
    crate::helpers::execute_sql(&app, &["UPDATE flash_sales SET units = 1".to_owned()]).await;

    // Act
    let report = app.audit().await;

    // Assert
    let violations: Vec<&String> = report.violations().collect();
    assert!(
        violations
            .iter()
            .any(|v| v.contains(&sale) && v.contains("2 units sold of 1")),
        "{report}"
    );
}

/// A sale buyer whose card asks for 3-D Secure: `(checkout id)` in `requires_action`.
async fn waiting_for_authentication(
    app: &TestApp,
    customer: &Customer,
    cart: &str,
    sale: &str,
) -> String {
    let token = take_token(app, customer, sale).await;
    token.assert_status(201);
    let started = checkout_with_token(app, customer, cart, &token.str("token")).await;
    started.assert_status(201);
    let id = started.str("id");
    let pending = app
        .complete(customer, &id, "pm_card_authenticationRequired", "3ds")
        .await;
    assert_eq!(
        pending.body["state"], "requires_action",
        "{:?}",
        pending.body
    );
    id
}

async fn a_buyer_waiting_for_authentication_cancels_and_the_unit_goes_to_the_next_buyer(
    kind: StoreKind,
) {
    // Arrange
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 1).await;
    let sale = open_sale(&app, "hot", 1, None).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let checkout = waiting_for_authentication(&app, &ada, &ada_cart, &sale).await;
    take_token(&app, &bob, &sale)
        .await
        .assert_error(409, "sold_out");

    // Act
    let cancelled = app
        .post(
            &format!("/v1/checkouts/{checkout}/cancel"),
            Some(&ada.token),
            json!({}),
        )
        .await;

    // Assert
    cancelled.assert_status(200);
    assert_eq!(cancelled.body["state"], "cancelled", "{:?}", cancelled.body);
    assert_eq!(app.stock_of("hot").await, (1, 0, 1));
    buy(&app, &bob, &bob_cart, &sale).await;
    app.audit().await.assert_clean();
}

async fn an_abandoned_authentication_in_a_sale_ends_with_the_sales_window(kind: StoreKind) {
    // Arrange: a sale with a 60 s window; Ada leaves her 3-D Secure step open.
    let app = app_for(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    app.new_product("hot", 500, 1).await;
    let sale = open_sale(&app, "hot", 1, Some(60)).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let checkout = waiting_for_authentication(&app, &ada, &ada_cart, &sale).await;

    // Act: the sale's window passes (not the 30-minute lifetime) and recovery looks.
    app.advance(chrono::Duration::seconds(61));
    app.recovery.tick().await.expect("recovery tick");

    // Assert: her payment is cancelled and the unit is Bob's.
    let state = app
        .get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
        .await
        .str("state");
    assert_eq!(state, "cancelled");
    assert_eq!(app.stock_of("hot").await, (1, 0, 1));
    buy(&app, &bob, &bob_cart, &sale).await;
    app.audit().await.assert_clean();
}

async fn a_sale_line_added_while_checkouts_start_is_never_reserved_without_admission(
    kind: StoreKind,
) {
    // Arrange: 40 buyers with a cart of a plain SKU, no token; a sale on `hot`.
    let app = app_for(kind, Options::default()).await;
    app.new_product("tea", 450, 100).await;
    app.new_product("hot", 500, 100).await;
    open_sale(&app, "hot", 50, None).await;
    let buyers = crate::helpers::buyers(&app, 40, &[("tea", 1)]).await;

    // Act: each starts a checkout while the sale's SKU is put in the same cart, at once.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2 * buyers.len()));
    let races = buyers.iter().map(|(customer, cart)| {
        let barrier = barrier.clone();
        let app = &app;
        async move {
            let start = async {
                barrier.wait().await;
                app.start_checkout(customer, cart).await
            };
            let add = async {
                barrier.wait().await;
                app.set_line(customer, cart, "hot", 1).await
            };
            tokio::join!(start, add)
        }
    });
    let answers = futures::future::join_all(races).await;

    // Assert: every checkout either reserved the plain SKU alone or was told to bring a
    // token; nothing of `hot` is held.
    for (started, added) in &answers {
        match started.status.as_u16() {
            201 => {}
            403 => assert_eq!(started.code(), "admission_required"),
            other => panic!("checkout: {other} {:?}", started.body),
        }
        assert!(
            [200, 409].contains(&added.status.as_u16()),
            "line: {:?}",
            added.body
        );
    }
    assert_eq!(app.stock_of("hot").await, (100, 0, 100));
    let reserved = answers
        .iter()
        .filter(|(started, _)| started.status.as_u16() == 201)
        .count();
    let tea = app.stock_of("tea").await;
    assert_eq!(tea.1, i64::try_from(reserved).expect("a count"), "{tea:?}");
    app.audit().await.assert_clean();
}

// PostgreSQL only (the database outage helper): the Redis gate loses the sale while the
// database cannot be read.

/// The gate does not know the sale and cannot be rebuilt while the database refuses
/// connections: token requests fail closed (`503 admission_unavailable`), nobody is admitted;
/// once the database answers again the gate is rebuilt and admission works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_fails_closed_while_it_cannot_be_rebuilt_from_the_database() {
    let app = app_for(StoreKind::Postgres, Options::default()).await;
    app.new_product("hot-01", 900, 10).await;
    let sale = open_sale(&app, "hot-01", 2, None).await;
    let (ada, bob) = (app.new_customer("Ada").await, app.new_customer("Bob").await);
    // Both are known to the service (their tokens are cached), so only the gate's rebuild
    // needs the database.
    for customer in [&ada, &bob] {
        app.get("/v1/orders", Some(&customer.token))
            .await
            .assert_status(200);
    }
    crate::gate::delete_keys(&app.settings.redis_key_prefix).await;
    let outage = crate::helpers::DatabaseOutage::begin(&app).await;

    for customer in [&ada, &bob] {
        take_token(&app, customer, &sale)
            .await
            .assert_error(503, "admission_unavailable");
    }

    outage.end().await;
    crate::helpers::eventually(15, "the database answers again", || async {
        app.get("/readyz", None).await.status.as_u16() == 200
    })
    .await;
    take_token(&app, &ada, &sale).await.assert_status(201);
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(figures["figures"]["holders"], 1, "only Ada's: {figures:?}");
    take_token(&app, &bob, &sale).await.assert_status(201);
    app.audit().await.assert_clean();
}

/// Redis loses the sale's keys while the service runs (a `FLUSHALL` of this test's own
/// prefix): the next call finds the sale unknown and the gate is loaded from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_lost_mid_sale_are_rebuilt_from_the_database() {
    // Arrange: a 3-unit sale on the Redis gate; Ada bought one, Bob holds a checkout.
    let app = app_for(StoreKind::Postgres, Options::default()).await;
    app.new_product("hot", 500, 10).await;
    let sale = open_sale(&app, "hot", 3, None).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let (cy, cy_cart) = app.buyer_with("Cy", &[("hot", 1)]).await;
    buy(&app, &ada, &ada_cart, &sale).await;
    let token = take_token(&app, &bob, &sale).await.str("token");
    checkout_with_token(&app, &bob, &bob_cart, &token)
        .await
        .assert_status(201);

    // Act
    crate::gate::delete_keys(&app.settings.redis_key_prefix).await;

    // Assert: the same instance rebuilds the sale as the database records it.
    let figures = sale_figures(&app, &sale).await;
    assert_eq!(
        figures["figures"],
        json!({ "holders": 1, "held": 1, "sold": 1 }),
        "{figures:?}"
    );
    take_token(&app, &ada, &sale)
        .await
        .assert_error(409, "sold_out");
    buy(&app, &cy, &cy_cart, &sale).await;
    let (dee, _) = app.buyer_with("Dee", &[("hot", 1)]).await;
    take_token(&app, &dee, &sale)
        .await
        .assert_error(409, "sold_out");
    app.audit().await.assert_clean();
}
