//! Wholesale: companies and their buyers, ordering rules (minimum, case pack, maximum) refused
//! at the cart and checked again inside the reservation, volume tiers and company price lists
//! priced inside the reservation, on both stores, with the rules and prices raced against
//! running checkouts.

use std::sync::Arc;

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Barrier;

use crate::both_stores;
use crate::helpers::{
    spawn_app, spawn_app_with, AssertClean, Customer, Options, Resp, TestApp, ADMIN_TOKEN,
};

both_stores!(
    a_company_and_its_buyers_are_created_and_bad_input_changes_nothing,
    ordering_rules_and_tiers_are_validated_and_shown_on_product_views,
    a_cart_line_outside_the_rules_is_refused_with_the_rule_it_breaks,
    a_rule_changed_after_the_line_was_set_refuses_the_reservation_and_reserves_nothing,
    volume_tiers_and_company_prices_price_the_reservation_in_exact_minor_units,
    bad_company_prices_are_refused_and_change_nothing,
    the_catalogue_answers_a_buyer_the_prices_that_buyer_pays,
    a_po_number_reaches_the_order_and_its_fulfilment_event_and_a_company_may_require_one,
    a_required_po_number_is_checked_inside_grouped_reservations_too,
    an_order_on_account_is_invoiced_within_the_credit_limit_and_payments_give_credit_back,
    on_account_bad_input_gets_clear_errors_and_changes_nothing,
    an_overdue_invoice_blocks_further_orders_on_account,
    many_buyers_of_one_company_never_overdraw_its_credit_limit,
    the_audit_catches_credit_taken_without_an_invoice,
    the_audit_catches_an_invoice_voided_without_its_order_refunded,
    the_audit_catches_a_line_sold_outside_its_rules,
    a_rule_tightened_while_checkouts_run_never_reserves_a_line_outside_it,
    a_rule_tightened_while_grouped_checkouts_run_never_reserves_a_line_outside_it,
    a_price_list_changed_while_checkouts_run_prices_each_order_at_one_of_its_figures,
    refunding_an_order_on_account_gives_its_credit_back_voids_its_invoice_and_restocks,
    payments_recorded_while_orders_on_account_are_refunded_leave_no_credit_behind,
    a_buyer_sees_the_orders_of_every_buyer_of_the_company,
);

async fn company(app: &TestApp, body: Value) -> String {
    let resp = app.admin_post("/v1/admin/companies", body).await;
    resp.assert_status(201);
    resp.str("id")
}

async fn acme(app: &TestApp) -> String {
    company(
        app,
        json!({"name": "Acme Hotels", "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": 500_000}),
    )
    .await
}

pub(crate) async fn buyer_of(app: &TestApp, company_id: &str, name: &str) -> Customer {
    let resp = app
        .admin_post(
            "/v1/admin/customers",
            json!({"name": name, "company_id": company_id}),
        )
        .await;
    resp.assert_status(201);
    assert_eq!(resp.body["company_id"], company_id);
    Customer {
        token: resp.str("token"),
    }
}

/// A case-pack product: at least 12, by 6, at most 48, volume tiers from 24 and 48.
async fn case_product(app: &TestApp, sku: &str, stock: i64) {
    app.admin_post(
        "/v1/admin/products",
        json!({"sku": sku, "name": "Glasses, case", "price": {"amount": 450, "currency": "EUR"},
               "stock": stock, "min_quantity": 12, "increment": 6, "max_quantity": 48,
               "price_tiers": [{"min_quantity": 24, "amount": 400},
                               {"min_quantity": 48, "amount": 350}]}),
    )
    .await
    .assert_status(201);
}

async fn patch_product(app: &TestApp, sku: &str, body: Value) -> Resp {
    let current = app
        .get(&format!("/v1/admin/products/{sku}"), Some(ADMIN_TOKEN))
        .await;
    current.assert_status(200);
    let version = current.body["version"].as_i64().expect("a version");
    let resp = app
        .client
        .patch(format!("{}/v1/admin/products/{sku}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("If-Match", format!("\"{version}\""))
        .json(&body)
        .send()
        .await
        .expect("the app answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.expect("a JSON body");
    Resp {
        status,
        headers,
        body,
    }
}

async fn put_price(app: &TestApp, company_id: &str, sku: &str, body: Value) -> Resp {
    app.request(
        Method::PUT,
        &format!("/v1/admin/companies/{company_id}/prices/{sku}"),
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await
}

/// Companies and customers, for "nothing changed".
async fn counts(app: &TestApp) -> Vec<String> {
    crate::helpers::fetch_strings(
        app,
        "SELECT CAST((SELECT COUNT(*) FROM companies) AS TEXT) || '/' || \
         CAST((SELECT COUNT(*) FROM customers) AS TEXT)",
    )
    .await
}

async fn order_of(app: &TestApp, customer: &Customer, order_id: &str) -> Value {
    let order = app
        .get(&format!("/v1/orders/{order_id}"), Some(&customer.token))
        .await;
    order.assert_status(200);
    order.body
}

async fn a_company_and_its_buyers_are_created_and_bad_input_changes_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let id = company(
        &app,
        json!({"name": "Acme Hotels", "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": 500_000, "po_number_required": true}),
    )
    .await;
    let shown = app
        .get(&format!("/v1/admin/companies/{id}"), Some(ADMIN_TOKEN))
        .await;
    shown.assert_status(200);
    assert_eq!(shown.body["name"], "Acme Hotels");
    assert_eq!(shown.body["currency"], "EUR");
    assert_eq!(shown.body["payment_terms"], "net_30");
    assert_eq!(shown.body["credit_limit"], 500_000);
    assert_eq!(shown.body["po_number_required"], true);
    buyer_of(&app, &id, "Bea Buyer").await;
    let retail = app
        .admin_post("/v1/admin/customers", json!({"name": "Ada"}))
        .await;
    retail.assert_status(201);
    assert_eq!(retail.body["company_id"], Value::Null);

    let before = counts(&app).await;
    let good = json!({"name": "Beta", "currency": "EUR", "payment_terms": "net_15",
                      "credit_limit": 1000});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let cases = [
        (with("credit_limit", json!(-1)), "a negative credit limit"),
        (with("payment_terms", json!("net_45")), "unknown terms"),
        (with("currency", json!("euro")), "not a currency"),
        (with("name", json!("")), "a blank name"),
        (with("colour", json!("red")), "an unknown field"),
        (
            json!({"currency": "EUR", "payment_terms": "net_15", "credit_limit": 1}),
            "no name",
        ),
    ];
    for (body, what) in cases {
        let resp = app.admin_post("/v1/admin/companies", body).await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{what}");
    }
    app.admin_post(
        "/v1/admin/customers",
        json!({"name": "Cy", "company_id": uuid::Uuid::new_v4()}),
    )
    .await
    .assert_error(404, "company_not_found");
    let malformed = app
        .admin_post(
            "/v1/admin/customers",
            json!({"name": "Cy", "company_id": "not-an-id"}),
        )
        .await;
    assert_eq!(malformed.status.as_u16(), 422, "{:?}", malformed.body);
    app.get(
        &format!("/v1/admin/companies/{}", uuid::Uuid::new_v4()),
        Some(ADMIN_TOKEN),
    )
    .await
    .assert_error(404, "company_not_found");
    assert_eq!(
        counts(&app).await,
        before,
        "a refused request changed nothing"
    );
    // Only the admin opens companies.
    let bea = buyer_of(&app, &id, "Bea again").await;
    let forbidden = app
        .post("/v1/admin/companies", Some(&bea.token), good.clone())
        .await;
    assert_eq!(forbidden.status.as_u16(), 403);
}

async fn ordering_rules_and_tiers_are_validated_and_shown_on_product_views(kind: StoreKind) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 100).await;
    let admin = app
        .get("/v1/admin/products/glass-06", Some(ADMIN_TOKEN))
        .await;
    let public = app.get("/v1/products/glass-06", None).await;
    for view in [&admin.body, &public.body] {
        assert_eq!(view["min_quantity"], 12);
        assert_eq!(view["increment"], 6);
        assert_eq!(view["max_quantity"], 48);
        assert_eq!(
            view["price_tiers"],
            json!([{"min_quantity": 24, "amount": 400}, {"min_quantity": 48, "amount": 350}])
        );
    }
    // A plain product keeps the retail defaults.
    app.new_product("tea-01", 450, 10).await;
    let tea = app.get("/v1/products/tea-01", None).await;
    assert_eq!(
        tea.body,
        json!({"sku": "tea-01", "name": "Product tea-01",
               "price": {"amount": 450, "currency": "EUR"}, "available": 10}),
        "retail defaults are left out"
    );

    let base = json!({"sku": "bad-01", "name": "Bad", "price": {"amount": 100, "currency": "EUR"},
                      "stock": 5});
    let with = |extra: Value| {
        let mut body = base.clone();
        for (k, v) in extra.as_object().expect("an object") {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (with(json!({"min_quantity": 0})), "a zero minimum"),
        (with(json!({"increment": 0})), "a zero case pack"),
        (
            with(json!({"min_quantity": 10, "max_quantity": 5})),
            "max below min",
        ),
        (
            with(json!({"min_quantity": 10, "increment": 12, "max_quantity": 11})),
            "no quantity meets them",
        ),
        (
            with(json!({"max_quantity": 10_001})),
            "max past the line bound",
        ),
        (
            with(json!({"price_tiers": [{"min_quantity": 10, "amount": 90},
                                         {"min_quantity": 5, "amount": 95}]})),
            "tiers out of order",
        ),
        (
            with(json!({"price_tiers": [{"min_quantity": 10, "amount": -1}]})),
            "a negative tier",
        ),
        (
            with(json!({"price_tiers": [{"min_quantity": 1, "amount": 90}]})),
            "a tier at one unit",
        ),
        (
            with(json!({"price_tiers": [{"min_quantity": 10, "amount": 90, "x": 1}]})),
            "an unknown tier field",
        ),
    ];
    for (body, what) in cases {
        let resp = app.admin_post("/v1/admin/products", body).await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{what}");
    }
    app.get("/v1/admin/products/bad-01", Some(ADMIN_TOKEN))
        .await
        .assert_error(404, "product_not_found");

    // A patch leaving rules no quantity meets is refused as a whole.
    let before = app
        .get("/v1/admin/products/glass-06", Some(ADMIN_TOKEN))
        .await
        .body;
    for (body, what) in [
        (json!({"max_quantity": 6}), "max below the minimum"),
        (json!({"min_quantity": 50}), "min above the maximum"),
        (json!({"increment": 60}), "a case pack past the maximum"),
        (
            json!({"price_tiers": [{"min_quantity": 24, "amount": 1}, {"min_quantity": 24, "amount": 2}]}),
            "repeated tiers",
        ),
    ] {
        let resp = patch_product(&app, "glass-06", body).await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
    }
    let after = app
        .get("/v1/admin/products/glass-06", Some(ADMIN_TOKEN))
        .await
        .body;
    assert_eq!(before, after, "refused patches changed nothing");

    // A good patch changes the rules and removes the maximum with `null`.
    let patched = patch_product(
        &app,
        "glass-06",
        json!({"min_quantity": 6, "max_quantity": null, "price_tiers": []}),
    )
    .await;
    patched.assert_status(200);
    assert_eq!(patched.body["min_quantity"], 6);
    assert_eq!(patched.body["increment"], 6);
    assert!(
        patched.body.get("max_quantity").is_none(),
        "{:?}",
        patched.body
    );
    assert!(
        patched.body.get("price_tiers").is_none(),
        "{:?}",
        patched.body
    );
    let public = app.get("/v1/products/glass-06", None).await;
    assert_eq!(public.body["min_quantity"], 6);
}

async fn a_cart_line_outside_the_rules_is_refused_with_the_rule_it_breaks(kind: StoreKind) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 100).await;
    let ada = app.new_customer("Ada").await;
    let cart = app.new_cart(&ada).await;
    for (quantity, rule, allowed) in [
        (6, "min_quantity", 12),
        (13, "increment", 6),
        (54, "max_quantity", 48),
    ] {
        let resp = app.set_line(&ada, &cart, "glass-06", quantity).await;
        resp.assert_error(422, "ordering_rules");
        assert_eq!(
            resp.body["error"]["details"],
            json!([{"sku": "glass-06", "rule": rule, "quantity": quantity, "allowed": allowed}]),
            "{quantity}"
        );
    }
    let unchanged = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(unchanged.body["lines"], json!([]));
    let set = app.set_line(&ada, &cart, "glass-06", 18).await;
    set.assert_status(200);
    assert_eq!(
        set.body["lines"],
        json!([{"sku": "glass-06", "quantity": 18}])
    );
    // A refused change leaves the line as it was.
    app.set_line(&ada, &cart, "glass-06", 20)
        .await
        .assert_error(422, "ordering_rules");
    let kept = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(
        kept.body["lines"],
        json!([{"sku": "glass-06", "quantity": 18}])
    );
}

async fn a_rule_changed_after_the_line_was_set_refuses_the_reservation_and_reserves_nothing(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 100).await;
    app.new_product("tea-01", 450, 10).await;
    let (ada, cart) = app
        .buyer_with("Ada", &[("glass-06", 12), ("tea-01", 1)])
        .await;
    patch_product(&app, "glass-06", json!({"min_quantity": 24}))
        .await
        .assert_status(200);
    let before = app.inventory_snapshot().await;

    let refused = app.start_checkout(&ada, &cart).await;

    refused.assert_error(409, "rules_changed");
    assert_eq!(
        refused.body["error"]["details"],
        json!([{"sku": "glass-06", "rule": "min_quantity", "quantity": 12, "allowed": 24}])
    );
    assert_eq!(app.inventory_snapshot().await, before, "nothing reserved");
    let cart_now = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(cart_now.body["status"], "open");
    // The buyer mends the line and checks out.
    app.set_line(&ada, &cart, "glass-06", 24)
        .await
        .assert_status(200);
    let started = app.start_checkout(&ada, &cart).await;
    started.assert_status(201);
    // 24 glasses at the 24-unit tier (400) and one tea (450).
    assert_eq!(started.body["total"]["amount"], 24 * 400 + 450);
    assert_eq!(app.stock_of("glass-06").await, (100, 24, 76));
    app.audit().await.assert_clean();
}

async fn volume_tiers_and_company_prices_price_the_reservation_in_exact_minor_units(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 1000).await;
    app.new_product("tea-01", 999, 1000).await;
    let acme = acme(&app).await;
    let beta = company(
        &app,
        json!({"name": "Beta Bistros", "currency": "EUR", "payment_terms": "net_15",
               "credit_limit": 0}),
    )
    .await;
    // Acme: 15 % off glasses (on the tier price too), tea at a fixed 800 and 700 from 10.
    put_price(&app, &acme, "glass-06", json!({"percent_off": 15}))
        .await
        .assert_status(200);
    put_price(
        &app,
        &acme,
        "tea-01",
        json!({"amount": 800, "tiers": [{"min_quantity": 10, "amount": 700}]}),
    )
    .await
    .assert_status(200);
    let listed = app
        .get(
            &format!("/v1/admin/companies/{acme}/prices"),
            Some(ADMIN_TOKEN),
        )
        .await;
    listed.assert_status(200);
    assert_eq!(
        listed.body["data"],
        json!([{"sku": "glass-06", "percent_off": 15, "tiers": []},
               {"sku": "tea-01", "amount": 800,
                "tiers": [{"min_quantity": 10, "amount": 700}]}])
    );
    let cases: Vec<(Option<&str>, i64, i64, i64, i64)> = vec![
        // (company, glasses, teas, glass unit price, tea unit price)
        (None, 12, 1, 450, 999),
        (None, 30, 3, 400, 999),
        (None, 48, 1, 350, 999),
        // 450 less 15 % (67.5, rounded down to 67) = 383; 400 - 60 = 340; 350 - 52 = 298.
        (Some(&acme), 12, 1, 383, 800),
        (Some(&acme), 24, 10, 340, 700),
        (Some(&acme), 48, 9, 298, 800),
        // A company without a price list pays the catalogue's figures.
        (Some(&beta), 24, 1, 400, 999),
    ];
    for (i, (of, glasses, teas, glass_price, tea_price)) in cases.into_iter().enumerate() {
        let buyer = match of {
            Some(company_id) => buyer_of(&app, company_id, &format!("buyer {i}")).await,
            None => app.new_customer(&format!("retail {i}")).await,
        };
        let cart = app.new_cart(&buyer).await;
        for (sku, quantity) in [("glass-06", glasses), ("tea-01", teas)] {
            app.set_line(&buyer, &cart, sku, quantity)
                .await
                .assert_status(200);
        }
        let started = app.start_checkout(&buyer, &cart).await;
        started.assert_status(201);
        let total = glasses * glass_price + teas * tea_price;
        assert_eq!(started.body["total"]["amount"], total, "case {i}");
        let order = order_of(&app, &buyer, &started.str("order_id")).await;
        assert_eq!(order["total"]["amount"], total, "case {i}");
        assert_eq!(
            order["lines"],
            json!([
                {"sku": "glass-06", "quantity": glasses,
                 "unit_price": {"amount": glass_price, "currency": "EUR"},
                 "line_total": {"amount": glasses * glass_price, "currency": "EUR"}},
                {"sku": "tea-01", "quantity": teas,
                 "unit_price": {"amount": tea_price, "currency": "EUR"},
                 "line_total": {"amount": teas * tea_price, "currency": "EUR"}},
            ]),
            "case {i}"
        );
    }
    app.audit().await.assert_clean();
}

async fn bad_company_prices_are_refused_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    let acme = acme(&app).await;
    put_price(&app, &acme, "tea-01", json!({"amount": 400}))
        .await
        .assert_status(200);
    let list = || async {
        app.get(
            &format!("/v1/admin/companies/{acme}/prices"),
            Some(ADMIN_TOKEN),
        )
        .await
        .body
    };
    let before = list().await;
    for (body, what) in [
        (json!({}), "neither amount nor percent_off"),
        (json!({"amount": 1, "percent_off": 5}), "both"),
        (json!({"amount": -1}), "a negative amount"),
        (json!({"percent_off": 101}), "more than everything off"),
        (
            json!({"amount": 1, "tiers": [{"min_quantity": 5, "amount": 1}, {"min_quantity": 2, "amount": 1}]}),
            "tiers out of order",
        ),
        (json!({"amount": 1, "currency": "EUR"}), "an unknown field"),
    ] {
        let resp = put_price(&app, &acme, "tea-01", body).await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{what}");
    }
    put_price(&app, &acme, "nope-01", json!({"amount": 1}))
        .await
        .assert_error(404, "product_not_found");
    put_price(
        &app,
        &uuid::Uuid::new_v4().to_string(),
        "tea-01",
        json!({"amount": 1}),
    )
    .await
    .assert_error(404, "company_not_found");
    assert_eq!(list().await, before);
}

/// Buyers with a 12-glass line start their checkouts together while the admin raises the
/// minimum to 24: each checkout is either reserved under the old rule (before the change
/// committed) or refused with `rules_changed`; once the change is answered, every later
/// checkout is refused; what is reserved is exactly the granted lines.
async fn tightened_while_checkouts_run(app: TestApp) {
    const BUYERS: usize = 24;
    case_product(&app, "glass-06", 10_000).await;
    let mut carts = Vec::new();
    for i in 0..BUYERS + 4 {
        carts.push(app.buyer_with(&format!("b{i}"), &[("glass-06", 12)]).await);
    }
    let late = carts.split_off(BUYERS);
    let app = Arc::new(app);
    let barrier = Arc::new(Barrier::new(BUYERS + 1));
    let mut tasks = Vec::new();
    for (buyer, cart) in carts {
        let (app, barrier) = (app.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            app.start_checkout(&buyer, &cart).await
        }));
    }
    let admin = {
        let (app, barrier) = (app.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            patch_product(&app, "glass-06", json!({"min_quantity": 24})).await
        })
    };
    let mut granted = 0;
    for task in tasks {
        let resp = task.await.expect("a buyer task");
        match resp.status.as_u16() {
            201 => granted += 1,
            409 => assert_eq!(resp.code(), "rules_changed", "{:?}", resp.body),
            other => panic!("unexpected {other}: {:?}", resp.body),
        }
    }
    admin.await.expect("the admin task").assert_status(200);
    for (buyer, cart) in late {
        app.start_checkout(&buyer, &cart)
            .await
            .assert_error(409, "rules_changed");
    }
    let (_, reserved, _) = app.stock_of("glass-06").await;
    assert_eq!(
        reserved,
        12 * granted,
        "reserved is exactly the granted lines"
    );
    app.audit().await.assert_clean();
}

async fn a_rule_tightened_while_checkouts_run_never_reserves_a_line_outside_it(kind: StoreKind) {
    tightened_while_checkouts_run(spawn_app(kind).await).await;
}

async fn a_rule_tightened_while_grouped_checkouts_run_never_reserves_a_line_outside_it(
    kind: StoreKind,
) {
    let app = spawn_app_with(
        kind,
        Options {
            group_linger_us: Some(2_000),
            ..Options::default()
        },
    )
    .await;
    tightened_while_checkouts_run(app).await;
}

/// Buyers of one company start checkouts while the admin changes the company's price from 400
/// to 300: every order is priced whole at one figure or the other, its total exactly its
/// lines, and checkouts started after the change pay the new one.
async fn a_price_list_changed_while_checkouts_run_prices_each_order_at_one_of_its_figures(
    kind: StoreKind,
) {
    const BUYERS: usize = 24;
    let app = Arc::new(spawn_app(kind).await);
    app.new_product("tea-01", 450, 10_000).await;
    let acme = acme(&app).await;
    put_price(&app, &acme, "tea-01", json!({"amount": 400}))
        .await
        .assert_status(200);
    let mut carts = Vec::new();
    for i in 0..BUYERS + 1 {
        let buyer = buyer_of(&app, &acme, &format!("b{i}")).await;
        let cart = app.new_cart(&buyer).await;
        app.set_line(&buyer, &cart, "tea-01", 5)
            .await
            .assert_status(200);
        carts.push((buyer, cart));
    }
    let (late_buyer, late_cart) = carts.pop().expect("a late buyer");
    let barrier = Arc::new(Barrier::new(BUYERS + 1));
    let mut tasks = Vec::new();
    for (buyer, cart) in carts {
        let (app, barrier) = (app.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = app.start_checkout(&buyer, &cart).await;
            (buyer, started)
        }));
    }
    let admin = {
        let (app, barrier, acme) = (app.clone(), barrier.clone(), acme.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            put_price(&app, &acme, "tea-01", json!({"amount": 300})).await
        })
    };
    for task in tasks {
        let (buyer, started) = task.await.expect("a buyer task");
        started.assert_status(201);
        let order = order_of(&app, &buyer, &started.str("order_id")).await;
        let unit = order["lines"][0]["unit_price"]["amount"]
            .as_i64()
            .expect("a unit price");
        assert!(unit == 400 || unit == 300, "unit price {unit}");
        assert_eq!(order["total"]["amount"], unit * 5);
        assert_eq!(started.body["total"]["amount"], unit * 5);
    }
    admin.await.expect("the admin task").assert_status(200);
    let late = app.start_checkout(&late_buyer, &late_cart).await;
    late.assert_status(201);
    assert_eq!(late.body["total"]["amount"], 300 * 5);
    app.audit().await.assert_clean();
}

async fn the_catalogue_answers_a_buyer_the_prices_that_buyer_pays(kind: StoreKind) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 100).await;
    app.new_product("tea-01", 999, 10).await;
    let acme = acme(&app).await;
    put_price(
        &app,
        &acme,
        "glass-06",
        json!({"percent_off": 10, "tiers": [{"min_quantity": 36, "amount": 300}]}),
    )
    .await
    .assert_status(200);
    let bea = buyer_of(&app, &acme, "Bea").await;
    let ada = app.new_customer("Ada").await;

    let seen = app.get("/v1/products/glass-06", Some(&bea.token)).await;
    seen.assert_status(200);
    // 450 - 45 = 405 below 24; 400 - 40 = 360 from 24; the company's 300 from 36; from 48
    // the company's tier still wins.
    assert_eq!(
        seen.body["price"],
        json!({"amount": 405, "currency": "EUR"})
    );
    assert_eq!(
        seen.body["price_tiers"],
        json!([{"min_quantity": 24, "amount": 360}, {"min_quantity": 36, "amount": 300}])
    );
    let listed = app.get("/v1/products", Some(&bea.token)).await;
    listed.assert_status(200);
    assert_eq!(listed.body["data"][0], seen.body);
    assert_eq!(
        listed.body["data"][1]["price"]["amount"], 999,
        "no company price: list"
    );
    for who in [None, Some(ada.token.as_str()), Some(ADMIN_TOKEN)] {
        let public = app.get("/v1/products/glass-06", who).await;
        assert_eq!(public.body["price"]["amount"], 450, "{who:?}");
        assert_eq!(public.body["price_tiers"][0]["amount"], 400, "{who:?}");
    }
    app.get("/v1/products", Some("hfc_nobody"))
        .await
        .assert_error(401, "unauthorized");

    // What the buyer is shown is what the reservation charges, at every tier.
    for (quantity, unit) in [(12, 405), (24, 360), (36, 300), (48, 300)] {
        let cart = app.new_cart(&bea).await;
        app.set_line(&bea, &cart, "glass-06", quantity)
            .await
            .assert_status(200);
        let started = app.start_checkout(&bea, &cart).await;
        started.assert_status(201);
        assert_eq!(
            started.body["total"]["amount"],
            quantity * unit,
            "{quantity}"
        );
        app.post(
            &format!("/v1/checkouts/{}/cancel", started.str("id")),
            Some(&bea.token),
            json!({}),
        )
        .await
        .assert_status(200);
    }
    // A change of the list made here shows at once.
    put_price(&app, &acme, "glass-06", json!({"amount": 250}))
        .await
        .assert_status(200);
    let changed = app.get("/v1/products/glass-06", Some(&bea.token)).await;
    assert_eq!(changed.body["price"]["amount"], 250);
    assert!(
        changed.body.get("price_tiers").is_none(),
        "{:?}",
        changed.body
    );
}

async fn start_with_po(app: &TestApp, customer: &Customer, cart: &str, po: Option<&str>) -> Resp {
    let mut body = json!({ "cart_id": cart });
    if let Some(po) = po {
        body["po_number"] = json!(po);
    }
    app.post("/v1/checkouts", Some(&customer.token), body).await
}

async fn po_company(app: &TestApp) -> String {
    company(
        app,
        json!({"name": "Strict Ltd", "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": 100_000, "po_number_required": true}),
    )
    .await
}

async fn a_po_number_reaches_the_order_and_its_fulfilment_event_and_a_company_may_require_one(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    let strict = po_company(&app).await;
    let bea = buyer_of(&app, &strict, "Bea").await;
    let cart = app.new_cart(&bea).await;
    app.set_line(&bea, &cart, "tea-01", 2)
        .await
        .assert_status(200);
    let before = app.inventory_snapshot().await;
    start_with_po(&app, &bea, &cart, None)
        .await
        .assert_error(422, "po_number_required");
    for bad in ["", "   ", &"x".repeat(65), "a\u{0}b"] {
        let resp = start_with_po(&app, &bea, &cart, Some(bad)).await;
        assert_eq!(resp.status.as_u16(), 422, "{bad:?}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{bad:?}");
    }
    assert_eq!(app.inventory_snapshot().await, before, "nothing reserved");
    let open = app
        .get(&format!("/v1/carts/{cart}"), Some(&bea.token))
        .await;
    assert_eq!(open.body["status"], "open");

    let started = start_with_po(&app, &bea, &cart, Some(" PO-2026-0042 ")).await;
    started.assert_status(201);
    let order_id = started.str("order_id");
    let order = order_of(&app, &bea, &order_id).await;
    assert_eq!(order["po_number"], "PO-2026-0042");
    let listed = app.get("/v1/orders", Some(&bea.token)).await;
    assert_eq!(listed.body["data"][0]["po_number"], "PO-2026-0042");
    let paid = app
        .complete(&bea, &started.str("id"), "pm_card_visa", "po-pay-1")
        .await;
    paid.assert_status(200);
    assert_eq!(paid.body["state"], "completed");
    let payloads = crate::helpers::fetch_strings(
        &app,
        "SELECT payload FROM outbox WHERE topic = 'order.paid'",
    )
    .await;
    assert_eq!(payloads.len(), 1);
    let event: Value = serde_json::from_str(&payloads[0]).expect("a JSON payload");
    assert_eq!(event["order_id"], order_id.as_str());
    assert_eq!(event["po_number"], "PO-2026-0042");

    // A retail customer may give one too; without one the order simply has none.
    let (ada, ada_cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    let plain = app.start_checkout(&ada, &ada_cart).await;
    plain.assert_status(201);
    let order = order_of(&app, &ada, &plain.str("order_id")).await;
    assert!(order.get("po_number").is_none(), "{order:?}");
    app.audit().await.assert_clean();
}

async fn a_required_po_number_is_checked_inside_grouped_reservations_too(kind: StoreKind) {
    let app = Arc::new(
        spawn_app_with(
            kind,
            Options {
                group_linger_us: Some(20_000),
                ..Options::default()
            },
        )
        .await,
    );
    app.new_product("tea-01", 450, 100).await;
    let strict = po_company(&app).await;
    const BUYERS: usize = 8;
    let mut carts = Vec::new();
    for i in 0..BUYERS {
        let buyer = buyer_of(&app, &strict, &format!("b{i}")).await;
        let cart = app.new_cart(&buyer).await;
        app.set_line(&buyer, &cart, "tea-01", 1)
            .await
            .assert_status(200);
        carts.push((buyer, cart));
    }
    let barrier = Arc::new(Barrier::new(BUYERS));
    let tasks: Vec<_> = carts
        .into_iter()
        .enumerate()
        .map(|(i, (buyer, cart))| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let po = (i % 2 == 0).then(|| format!("PO-{i}"));
                (i, start_with_po(&app, &buyer, &cart, po.as_deref()).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, resp) = task.await.expect("a buyer task");
        if i % 2 == 0 {
            resp.assert_status(201);
        } else {
            resp.assert_error(422, "po_number_required");
        }
    }
    assert_eq!(app.stock_of("tea-01").await, (100, BUYERS as i64 / 2, 96));
    app.audit().await.assert_clean();
}

/// `POST /v1/checkouts/{id}/complete` with a body and a fresh Idempotency-Key.
async fn complete_with(app: &TestApp, customer: &Customer, checkout: &str, body: Value) -> Resp {
    let resp = app
        .client
        .post(format!("{}/v1/checkouts/{checkout}/complete", app.base))
        .bearer_auth(&customer.token)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&body)
        .send()
        .await
        .expect("the app answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.expect("a JSON body");
    Resp {
        status,
        headers,
        body,
    }
}

async fn on_account(app: &TestApp, customer: &Customer, checkout: &str) -> Resp {
    complete_with(app, customer, checkout, json!({"on_account": true})).await
}

/// A reserved checkout of these lines for `buyer`: `(checkout id, order id)`.
async fn reserved_for(app: &TestApp, buyer: &Customer, lines: &[(&str, i64)]) -> (String, String) {
    let cart = app.new_cart(buyer).await;
    for (sku, quantity) in lines {
        app.set_line(buyer, &cart, sku, *quantity)
            .await
            .assert_status(200);
    }
    let started = app.start_checkout(buyer, &cart).await;
    started.assert_status(201);
    (started.str("id"), started.str("order_id"))
}

async fn pay(app: &TestApp, invoice: &str, amount: i64) -> Resp {
    app.admin_post(
        &format!("/v1/admin/invoices/{invoice}/payments"),
        json!({ "amount": amount }),
    )
    .await
}

/// What the test's companies owe together (each test opens one company on terms).
async fn outstanding(app: &TestApp) -> i64 {
    let rows = crate::helpers::fetch_strings(
        app,
        "SELECT CAST(SUM(credit_outstanding) AS TEXT) FROM companies",
    )
    .await;
    rows[0].parse().expect("a number")
}

async fn an_order_on_account_is_invoiced_within_the_credit_limit_and_payments_give_credit_back(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 100).await;
    let acme = company(
        &app,
        json!({"name": "Acme", "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": 5000}),
    )
    .await;
    let bea = buyer_of(&app, &acme, "Bea").await;
    let cart = app.new_cart(&bea).await;
    app.set_line(&bea, &cart, "tea-01", 10)
        .await
        .assert_status(200);
    let started = start_with_po(&app, &bea, &cart, Some("PO-1")).await;
    started.assert_status(201);

    let placed = on_account(&app, &bea, &started.str("id")).await;

    placed.assert_status(200);
    assert_eq!(placed.body["state"], "completed");
    let invoice_id = placed.str("invoice_id");
    let order = order_of(&app, &bea, &started.str("order_id")).await;
    assert_eq!(order["status"], "awaiting_payment_on_terms");
    assert_eq!(order["invoice_id"], invoice_id.as_str());
    assert_eq!(
        app.stock_of("tea-01").await,
        (90, 0, 90),
        "the units are sold"
    );
    let invoice = app
        .get(
            &format!("/v1/admin/invoices/{invoice_id}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    invoice.assert_status(200);
    assert_eq!(
        invoice.body["amount"],
        json!({"amount": 4500, "currency": "EUR"})
    );
    assert_eq!(invoice.body["balance"], 4500);
    assert_eq!(invoice.body["status"], "open");
    assert_eq!(invoice.body["overdue"], false);
    assert_eq!(invoice.body["order_id"], started.str("order_id").as_str());
    let created = chrono::DateTime::parse_from_rfc3339(&invoice.str("created_at")).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339(&invoice.str("due_at")).unwrap();
    assert_eq!(due - created, chrono::Duration::days(30));
    let payloads = crate::helpers::fetch_strings(
        &app,
        "SELECT payload FROM outbox WHERE topic = 'order.paid'",
    )
    .await;
    assert_eq!(payloads.len(), 1, "one fulfilment event");
    let event: Value = serde_json::from_str(&payloads[0]).expect("a JSON payload");
    assert_eq!(event["on_account"], true);
    assert_eq!(event["invoice_id"], invoice_id.as_str());
    assert_eq!(event["po_number"], "PO-1");
    assert_eq!(outstanding(&app).await, 4500);

    // 1000 more would pass the 5000 limit: refused, nothing placed, the reservation still live.
    let (second, second_order) = reserved_for(&app, &bea, &[("tea-01", 3)]).await;
    let refused = on_account(&app, &bea, &second).await;
    refused.assert_error(409, "credit_limit_exceeded");
    assert_eq!(
        refused.body["error"]["details"],
        json!([{"limit": 5000, "outstanding": 4500, "requested": 1350}])
    );
    assert_eq!(app.stock_of("tea-01").await, (90, 3, 87));
    assert_eq!(outstanding(&app).await, 4500);
    assert_eq!(
        order_of(&app, &bea, &second_order).await["status"],
        "pending_payment"
    );

    // A partial payment gives that much credit back; then the second order fits.
    let part = pay(&app, &invoice_id, 2000).await;
    part.assert_status(200);
    assert_eq!(part.body["balance"], 2500);
    assert_eq!(part.body["status"], "open");
    assert_eq!(outstanding(&app).await, 2500);
    on_account(&app, &bea, &second).await.assert_status(200);
    assert_eq!(outstanding(&app).await, 3850);
    // Goods on account ship before the invoice is paid.
    let shipped = app
        .admin_post(
            &format!("/v1/admin/orders/{second_order}/shipments"),
            json!({}),
        )
        .await;
    shipped.assert_status(200);
    assert_eq!(shipped.body["status"], "fulfilled");
    pay(&app, &invoice_id, 2501)
        .await
        .assert_error(422, "payment_exceeds_balance");
    let whole = pay(&app, &invoice_id, 2500).await;
    whole.assert_status(200);
    assert_eq!(whole.body["status"], "paid");
    assert_eq!(
        order_of(&app, &bea, &started.str("order_id")).await["status"],
        "paid"
    );
    pay(&app, &invoice_id, 1)
        .await
        .assert_error(422, "payment_exceeds_balance");
    assert_eq!(outstanding(&app).await, 1350);
    app.audit().await.assert_clean();
}

async fn on_account_bad_input_gets_clear_errors_and_changes_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 100).await;
    let acme = acme(&app).await;
    let prepaid = company(
        &app,
        json!({"name": "Cash Co", "currency": "EUR", "payment_terms": "prepaid",
               "credit_limit": 100_000}),
    )
    .await;
    let bea = buyer_of(&app, &acme, "Bea").await;
    let (checkout, _) = reserved_for(&app, &bea, &[("tea-01", 1)]).await;
    let before = app.inventory_snapshot().await;
    for (body, what) in [
        (
            json!({"on_account": true, "payment_method": "pm_card_visa"}),
            "both",
        ),
        (json!({}), "neither"),
        (
            json!({"on_account": false}),
            "on_account false without a card",
        ),
        (json!({"on_account": "yes"}), "not a boolean"),
    ] {
        let resp = complete_with(&app, &bea, &checkout, body).await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
        assert_eq!(resp.code(), "validation_failed", "{what}");
    }
    for (name, company_id) in [("Ada", None), ("Cy", Some(prepaid.as_str()))] {
        let buyer = match company_id {
            Some(id) => buyer_of(&app, id, name).await,
            None => app.new_customer(name).await,
        };
        let (id, _) = reserved_for(&app, &buyer, &[("tea-01", 1)]).await;
        on_account(&app, &buyer, &id)
            .await
            .assert_error(422, "on_account_not_available");
    }
    assert_eq!(
        app.stock_of("tea-01").await,
        (100, 3, 97),
        "refused completions sold nothing"
    );
    assert_eq!(outstanding(&app).await, 0);
    // Another buyer's checkout is not found.
    let other = buyer_of(&app, &acme, "Dee").await;
    on_account(&app, &other, &checkout)
        .await
        .assert_error(404, "checkout_not_found");
    app.get(
        &format!("/v1/admin/invoices/{}", uuid::Uuid::new_v4()),
        Some(ADMIN_TOKEN),
    )
    .await
    .assert_error(404, "invoice_not_found");
    let placed = on_account(&app, &bea, &checkout).await;
    placed.assert_status(200);
    let invoice = placed.str("invoice_id");
    for (body, what) in [
        (json!({"amount": 0}), "zero"),
        (json!({"amount": -5}), "negative"),
        (json!({"amount": "10"}), "a string"),
        (json!({"amount": 10, "currency": "EUR"}), "an unknown field"),
    ] {
        let resp = app
            .admin_post(&format!("/v1/admin/invoices/{invoice}/payments"), body)
            .await;
        assert_eq!(resp.status.as_u16(), 422, "{what}: {:?}", resp.body);
    }
    let shown = app
        .get(&format!("/v1/admin/invoices/{invoice}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(
        shown.body["balance"], 450,
        "refused payments changed nothing"
    );
    assert_eq!(outstanding(&app).await, 450);
    assert_ne!(
        app.inventory_snapshot().await,
        before,
        "the placed order sold its unit"
    );
    app.audit().await.assert_clean();
}

async fn an_overdue_invoice_blocks_further_orders_on_account(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 100).await;
    let beta = company(
        &app,
        json!({"name": "Beta", "currency": "EUR", "payment_terms": "net_15",
               "credit_limit": 100_000}),
    )
    .await;
    let bea = buyer_of(&app, &beta, "Bea").await;
    let (first, _) = reserved_for(&app, &bea, &[("tea-01", 1)]).await;
    let invoice = on_account(&app, &bea, &first).await.str("invoice_id");
    app.advance(chrono::Duration::days(16));
    let shown = app
        .get(&format!("/v1/admin/invoices/{invoice}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(shown.body["overdue"], true);
    let (second, _) = reserved_for(&app, &bea, &[("tea-01", 1)]).await;
    on_account(&app, &bea, &second)
        .await
        .assert_error(409, "invoices_overdue");
    let ops = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;
    ops.assert_status(200);
    assert_eq!(ops.body["overdue_invoices"][0]["id"], invoice.as_str());
    assert_eq!(ops.body["overdue_invoices"][0]["balance"]["amount"], 450);
    pay(&app, &invoice, 450).await.assert_status(200);
    let ops = app.get("/v1/admin/ops", Some(ADMIN_TOKEN)).await;
    assert_eq!(ops.body["overdue_invoices"], json!([]));
    on_account(&app, &bea, &second).await.assert_status(200);
    // Workers are off on a manual clock: publish the two orders' events before the audit.
    app.relay.tick().await.expect("a relay tick");
    app.audit().await.assert_clean();
}

/// Buyers of one company complete on account at once against a limit that holds exactly five
/// of their orders: five are placed, every other is refused with `credit_limit_exceeded`, and
/// the company owes exactly its limit.
async fn many_buyers_of_one_company_never_overdraw_its_credit_limit(kind: StoreKind) {
    const BUYERS: usize = 16;
    let app = Arc::new(spawn_app(kind).await);
    app.new_product("tea-01", 450, 1000).await;
    let acme = company(
        &app,
        json!({"name": "Acme", "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": 5 * 4500}),
    )
    .await;
    let mut checkouts = Vec::new();
    for i in 0..BUYERS {
        let buyer = buyer_of(&app, &acme, &format!("b{i}")).await;
        let (id, _) = reserved_for(&app, &buyer, &[("tea-01", 10)]).await;
        checkouts.push((buyer, id));
    }
    let barrier = Arc::new(Barrier::new(BUYERS));
    let tasks: Vec<_> = checkouts
        .into_iter()
        .map(|(buyer, id)| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                on_account(&app, &buyer, &id).await
            })
        })
        .collect();
    let (mut placed, mut refused) = (0, 0);
    for task in tasks {
        let resp = task.await.expect("a buyer task");
        match resp.status.as_u16() {
            200 => placed += 1,
            409 => {
                assert_eq!(resp.code(), "credit_limit_exceeded", "{:?}", resp.body);
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", resp.body),
        }
    }
    assert_eq!((placed, refused), (5, BUYERS - 5));
    assert_eq!(outstanding(&app).await, 5 * 4500);
    app.audit().await.assert_clean();
}

async fn the_audit_catches_credit_taken_without_an_invoice(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let acme = acme(&app).await;
    app.audit().await.assert_clean();

    crate::helpers::execute_sql(
        &app,
        &["UPDATE companies SET credit_outstanding = 700".to_owned()],
    )
    .await;

    let report = app.audit().await;
    assert!(!report.is_clean(), "{report}");
    let found: Vec<&String> = report.violations().collect();
    assert!(
        found
            .iter()
            .any(|v| v.contains(&acme) && v.contains("its invoices owe 0")),
        "{found:?}"
    );
}

async fn the_audit_catches_a_line_sold_outside_its_rules(kind: StoreKind) {
    let app = spawn_app(kind).await;
    case_product(&app, "glass-06", 100).await;
    let (ada, cart) = app.buyer_with("Ada", &[("glass-06", 12)]).await;
    app.start_checkout(&ada, &cart).await.assert_status(201);
    // A later rule change does not make the line wrong: it was sold under the old rule.
    patch_product(&app, "glass-06", json!({"min_quantity": 24}))
        .await
        .assert_status(200);
    app.audit().await.assert_clean();

    crate::helpers::execute_sql(&app, &["UPDATE order_lines SET quantity = 13".to_owned()]).await;

    let report = app.audit().await;
    let found: Vec<&String> = report.violations().collect();
    assert!(
        found
            .iter()
            .any(|v| v.contains("13 x glass-06 breaks its increment of 6")),
        "{found:?}"
    );
}

/// A company on net-30 terms in EUR with this credit limit.
async fn net_30(app: &TestApp, name: &str, credit_limit: i64) -> String {
    company(
        app,
        json!({"name": name, "currency": "EUR", "payment_terms": "net_30",
               "credit_limit": credit_limit}),
    )
    .await
}

/// An order of `quantity` x tea-01 placed on account by `buyer`: `(order id, invoice id)`.
async fn placed_on_account(app: &TestApp, buyer: &Customer, quantity: i64) -> (String, String) {
    let (checkout, order) = reserved_for(app, buyer, &[("tea-01", quantity)]).await;
    let placed = on_account(app, buyer, &checkout).await;
    placed.assert_status(200);
    (order, placed.str("invoice_id"))
}

async fn refund_order(app: &TestApp, order: &str) -> Resp {
    app.admin_post(&format!("/v1/admin/orders/{order}/refund"), json!({}))
        .await
}

async fn invoice_of(app: &TestApp, invoice: &str) -> Value {
    let resp = app
        .get(&format!("/v1/admin/invoices/{invoice}"), Some(ADMIN_TOKEN))
        .await;
    resp.assert_status(200);
    resp.body
}

async fn refunding_an_order_on_account_gives_its_credit_back_voids_its_invoice_and_restocks(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 100).await;
    let acme = net_30(&app, "Acme", 10_000).await;
    let bea = buyer_of(&app, &acme, "Bea").await;

    // Awaiting payment, partly paid: the open balance goes back to the company's credit.
    let (order, invoice) = placed_on_account(&app, &bea, 10).await;
    pay(&app, &invoice, 1000).await.assert_status(200);
    assert_eq!(outstanding(&app).await, 3500);
    assert_eq!(app.stock_of("tea-01").await, (90, 0, 90));

    let refunded = refund_order(&app, &order).await;

    refunded.assert_status(200);
    assert_eq!(refunded.body["status"], "refunded");
    assert_eq!(outstanding(&app).await, 0);
    let void = invoice_of(&app, &invoice).await;
    assert_eq!(void["status"], "void");
    assert_eq!(void["balance"], 0);
    assert_eq!(void["paid"], json!({"amount": 1000, "currency": "EUR"}));
    assert_eq!(void["overdue"], false);
    assert_eq!(
        app.stock_of("tea-01").await,
        (100, 0, 100),
        "the units are back"
    );
    assert_eq!(order_of(&app, &bea, &order).await["status"], "refunded");
    // A void invoice takes no payment, and the order is not refunded twice.
    pay(&app, &invoice, 1)
        .await
        .assert_error(422, "payment_exceeds_balance");
    refund_order(&app, &order)
        .await
        .assert_error(409, "invalid_order_state");
    assert_eq!(outstanding(&app).await, 0);
    assert_eq!(app.stock_of("tea-01").await, (100, 0, 100));

    // Paid in full on terms: nothing owed to release, the invoice is closed, the units back.
    let (paid_order, paid_invoice) = placed_on_account(&app, &bea, 4).await;
    pay(&app, &paid_invoice, 1800).await.assert_status(200);
    assert_eq!(order_of(&app, &bea, &paid_order).await["status"], "paid");
    let refunded = refund_order(&app, &paid_order).await;
    refunded.assert_status(200);
    assert_eq!(refunded.body["status"], "refunded");
    assert_eq!(invoice_of(&app, &paid_invoice).await["status"], "void");
    assert_eq!(outstanding(&app).await, 0);
    assert_eq!(app.stock_of("tea-01").await, (100, 0, 100));

    // Shipped goods are not refunded whole, as for an order paid by card.
    let (shipped, _) = placed_on_account(&app, &bea, 2).await;
    app.admin_post(&format!("/v1/admin/orders/{shipped}/shipments"), json!({}))
        .await
        .assert_status(200);
    refund_order(&app, &shipped)
        .await
        .assert_error(409, "invalid_order_state");
    assert_eq!(outstanding(&app).await, 900);
    app.audit().await.assert_clean();
}

/// Each order's whole balance is paid while the order is refunded: whichever commits first,
/// the refund succeeds, the company owes nothing, every invoice is void and every unit back.
async fn payments_recorded_while_orders_on_account_are_refunded_leave_no_credit_behind(
    kind: StoreKind,
) {
    const ORDERS: usize = 8;
    let app = Arc::new(spawn_app(kind).await);
    app.new_product("tea-01", 450, 100).await;
    let acme = net_30(&app, "Acme", 100_000).await;
    let bea = buyer_of(&app, &acme, "Bea").await;
    let mut placed = Vec::new();
    for _ in 0..ORDERS {
        placed.push(placed_on_account(&app, &bea, 2).await);
    }
    assert_eq!(outstanding(&app).await, ORDERS as i64 * 900);
    let barrier = Arc::new(Barrier::new(2 * ORDERS));
    let mut tasks = Vec::new();
    for (order, invoice) in &placed {
        let (app1, barrier1, order) = (app.clone(), barrier.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            barrier1.wait().await;
            ("refund", refund_order(&app1, &order).await)
        }));
        let (app2, barrier2, invoice) = (app.clone(), barrier.clone(), invoice.clone());
        tasks.push(tokio::spawn(async move {
            barrier2.wait().await;
            ("payment", pay(&app2, &invoice, 900).await)
        }));
    }
    let mut payments = 0;
    for task in tasks {
        let (what, resp) = task.await.expect("a task");
        match (what, resp.status.as_u16()) {
            ("refund", 200) => assert_eq!(resp.body["status"], "refunded"),
            ("payment", 200) => payments += 1,
            ("payment", 422) => assert_eq!(resp.code(), "payment_exceeds_balance"),
            (what, other) => panic!("{what}: unexpected {other}: {:?}", resp.body),
        }
    }
    assert!(payments <= ORDERS);
    assert_eq!(outstanding(&app).await, 0);
    for (_, invoice) in &placed {
        assert_eq!(invoice_of(&app, invoice).await["status"], "void");
    }
    assert_eq!(app.stock_of("tea-01").await, (100, 0, 100));
    app.audit().await.assert_clean();
}

async fn a_buyer_sees_the_orders_of_every_buyer_of_the_company(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 100).await;
    let acme = acme(&app).await;
    let other = net_30(&app, "Other Co", 100_000).await;
    let bea = buyer_of(&app, &acme, "Bea").await;
    let cal = buyer_of(&app, &acme, "Cal").await;
    let dan = buyer_of(&app, &other, "Dan").await;
    let (eve, eve_cart) = app.buyer_with("Eve", &[("tea-01", 1)]).await;
    let (_, bea_order) = reserved_for(&app, &bea, &[("tea-01", 1)]).await;
    let (_, cal_order) = reserved_for(&app, &cal, &[("tea-01", 2)]).await;
    let (_, dan_order) = reserved_for(&app, &dan, &[("tea-01", 3)]).await;
    let eve_started = app.start_checkout(&eve, &eve_cart).await;
    eve_started.assert_status(201);
    let eve_order = eve_started.str("order_id");

    let listed = |resp: Resp| -> Vec<String> {
        resp.assert_status(200);
        resp.body["data"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|o| o["id"].as_str().expect("an id").to_owned())
            .collect()
    };
    for buyer in [&bea, &cal] {
        assert_eq!(
            listed(app.get("/v1/orders", Some(&buyer.token)).await),
            vec![bea_order.clone(), cal_order.clone()]
        );
    }
    // Pages of a company's orders follow each other.
    let first = app.get("/v1/orders?limit=1", Some(&bea.token)).await;
    let cursor = first.body["next_cursor"]
        .as_str()
        .expect("a cursor")
        .to_owned();
    assert_eq!(listed(first), vec![bea_order.clone()]);
    assert_eq!(
        listed(
            app.get(
                &format!("/v1/orders?limit=1&cursor={cursor}"),
                Some(&bea.token)
            )
            .await
        ),
        vec![cal_order.clone()]
    );
    let cal_seen_by_bea = order_of(&app, &bea, &cal_order).await;
    assert_eq!(cal_seen_by_bea["lines"][0]["quantity"], 2);
    assert_eq!(
        order_of(&app, &cal, &bea_order).await["id"],
        bea_order.as_str()
    );
    // Another company's buyer and a retail customer see their own only, and nothing else.
    assert_eq!(
        listed(app.get("/v1/orders", Some(&dan.token)).await),
        vec![dan_order.clone()]
    );
    assert_eq!(
        listed(app.get("/v1/orders", Some(&eve.token)).await),
        vec![eve_order.clone()]
    );
    for (who, order) in [
        (&dan, &bea_order),
        (&bea, &dan_order),
        (&eve, &bea_order),
        (&bea, &eve_order),
    ] {
        app.get(&format!("/v1/orders/{order}"), Some(&who.token))
            .await
            .assert_error(404, "order_not_found");
    }
    app.audit().await.assert_clean();
}

async fn the_audit_catches_an_invoice_voided_without_its_order_refunded(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 100).await;
    let acme = net_30(&app, "Acme", 10_000).await;
    let bea = buyer_of(&app, &acme, "Bea").await;
    let (order, invoice) = placed_on_account(&app, &bea, 2).await;
    pay(&app, &invoice, 900).await.assert_status(200);
    app.audit().await.assert_clean();

    crate::helpers::execute_sql(&app, &["UPDATE invoices SET status = 'void'".to_owned()]).await;

    let report = app.audit().await;
    let found: Vec<&String> = report.violations().collect();
    assert!(
        found
            .iter()
            .any(|v| v.contains(&acme) && v.contains("1 invoices void without their order")),
        "{found:?}"
    );
    assert_eq!(order_of(&app, &bea, &order).await["status"], "paid");
}
