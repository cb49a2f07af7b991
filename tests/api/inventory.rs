//! Reservation never oversells or undersells (promises 1 and 2): races on the last unit,
//! all-or-nothing carts, expiry, heartbeat, cancel, two instances and two expiry workers on one
//! database. Every race ends with the audit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::Duration;
use holdfast::store::StoreKind;
use holdfast::workers::ExpiryWorker;
use reqwest::Method;
use serde_json::json;
use tokio::sync::Barrier;

use crate::both_stores;
use crate::helpers::{
    buyers, eventually, execute_sql, fetch_strings, spawn_app, spawn_app_with, AssertClean,
    Customer, DatabaseOutage, Options, TestApp, ADMIN_TOKEN,
};

both_stores!(
    a_checkout_reserves_every_line_and_creates_the_order,
    two_hundred_buyers_race_for_the_last_unit_and_exactly_one_wins,
    two_thousand_buyers_for_a_hundred_units_get_exactly_a_hundred,
    a_cart_with_one_short_line_reserves_nothing,
    carts_with_the_same_skus_in_opposite_orders_never_deadlock,
    a_checkout_needs_an_open_non_empty_cart_of_ones_own,
    heartbeats_keep_a_checkout_alive_until_its_maximum_lifetime,
    a_short_window_expires_and_the_units_come_back,
    cancel_releases_at_once_and_is_idempotent,
    stock_can_never_drop_below_what_is_reserved,
    the_audit_finds_a_corrupted_row,
    a_price_that_keeps_changing_is_a_clear_conflict_and_reserves_nothing,
    buyers_racing_cancellations_are_never_refused_while_units_are_free,
    the_audit_judges_what_is_overdue_by_the_apps_own_clock,
    every_stock_edit_is_recorded_and_stock_changed_behind_the_store_fails_the_audit,
);

/// Releases every buyer's checkout at once and returns the answers.
pub(crate) async fn race_checkouts(
    app: &TestApp,
    buyers: Vec<(Customer, String)>,
) -> Vec<crate::helpers::Resp> {
    let barrier = Arc::new(Barrier::new(buyers.len()));
    let app = Arc::new(app_handle(app));
    let tasks: Vec<_> = buyers
        .into_iter()
        .map(|(customer, cart)| {
            let barrier = barrier.clone();
            let app = app.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                app.start_checkout(&customer, &cart).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

/// A cheap clone of what a racing task needs to call the app.
fn app_handle(app: &TestApp) -> Handle {
    Handle {
        base: app.base.clone(),
        client: app.client.clone(),
    }
}

struct Handle {
    base: String,
    client: reqwest::Client,
}

impl Handle {
    async fn start_checkout(&self, customer: &Customer, cart: &str) -> crate::helpers::Resp {
        let resp = self
            .client
            .post(format!("{}/v1/checkouts", self.base))
            .bearer_auth(&customer.token)
            .json(&json!({ "cart_id": cart }))
            .send()
            .await
            .expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.expect("json body");
        crate::helpers::Resp {
            status,
            headers,
            body,
        }
    }
}

pub(crate) fn count(answers: &[crate::helpers::Resp], status: u16, code: Option<&str>) -> usize {
    answers
        .iter()
        .filter(|r| r.status.as_u16() == status && code.is_none_or(|c| r.code() == c))
        .count()
}

async fn a_checkout_reserves_every_line_and_creates_the_order(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    app.new_product("cup-02", 1200, 2).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 3), ("cup-02", 2)]).await;

    let resp = app.start_checkout(&ada, &cart).await;
    resp.assert_status(201);
    assert_eq!(resp.body["state"], "reserved");
    assert_eq!(
        resp.body["total"],
        json!({"amount": 3 * 450 + 2 * 1200, "currency": "EUR"})
    );
    let expires = chrono::DateTime::parse_from_rfc3339(&resp.str("expires_at")).expect("RFC 3339");
    let created = chrono::DateTime::parse_from_rfc3339(&resp.str("created_at")).expect("RFC 3339");
    assert_eq!(expires - created, Duration::seconds(180));
    assert!(resp.str("expires_at").ends_with('Z'));

    assert_eq!(app.stock_of("tea-01").await, (5, 3, 2));
    assert_eq!(app.stock_of("cup-02").await, (2, 2, 0));
    let order = app
        .get(
            &format!("/v1/orders/{}", resp.str("order_id")),
            Some(&ada.token),
        )
        .await;
    order.assert_status(200);
    assert_eq!(order.body["status"], "pending_payment");
    assert_eq!(
        order.body["lines"],
        json!([
            {"sku": "cup-02", "quantity": 2, "unit_price": {"amount": 1200, "currency": "EUR"}, "line_total": {"amount": 2400, "currency": "EUR"}},
            {"sku": "tea-01", "quantity": 3, "unit_price": {"amount": 450, "currency": "EUR"}, "line_total": {"amount": 1350, "currency": "EUR"}},
        ])
    );
    // The price is frozen: a later catalogue change does not touch the order.
    let patched = app
        .client
        .patch(format!("{}/v1/admin/products/tea-01", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("If-Match", "\"1\"")
        .json(&json!({"price": {"amount": 999, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status().as_u16(), 200);
    let order = app
        .get(
            &format!("/v1/orders/{}", resp.str("order_id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(order.body["total"]["amount"], 3750);
    let listed = app.get("/v1/orders", Some(&ada.token)).await;
    assert_eq!(listed.body["data"][0]["id"], resp.str("order_id").as_str());
    let checkout = app
        .get(
            &format!("/v1/checkouts/{}", resp.str("id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(checkout.body["state"], "reserved");
    // While the checkout is live the cart cannot change.
    app.set_line(&ada, &cart, "tea-01", 1)
        .await
        .assert_error(409, "cart_not_open");
    app.audit().await.assert_clean();
}

async fn two_hundred_buyers_race_for_the_last_unit_and_exactly_one_wins(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("last-unit", 999, 1).await;
    let buyers = buyers(&app, 200, &[("last-unit", 1)]).await;

    let answers = race_checkouts(&app, buyers).await;

    assert_eq!(count(&answers, 201, None), 1, "exactly one winner");
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 199);
    let loser = answers.iter().find(|r| r.status.as_u16() == 409).unwrap();
    assert_eq!(
        loser.body["error"]["details"],
        json!([{"sku": "last-unit", "requested": 1, "available": 0}])
    );
    assert_eq!(app.stock_of("last-unit").await, (1, 1, 0));
    app.audit().await.assert_clean();
}

async fn two_thousand_buyers_for_a_hundred_units_get_exactly_a_hundred(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("hot", 500, 100).await;
    let buyers = buyers(&app, 2000, &[("hot", 1)]).await;

    let answers = race_checkouts(&app, buyers).await;

    assert_eq!(count(&answers, 201, None), 100);
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 1900);
    assert_eq!(app.stock_of("hot").await, (100, 100, 0));
    app.audit().await.assert_clean();
}

async fn a_cart_with_one_short_line_reserves_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("a", 100, 10).await;
    app.new_product("b", 100, 1).await;
    let (ada, cart) = app.buyer_with("Ada", &[("a", 2), ("b", 2)]).await;
    let before = app.inventory_snapshot().await;

    let resp = app.start_checkout(&ada, &cart).await;

    resp.assert_error(409, "insufficient_stock");
    assert_eq!(
        resp.body["error"]["details"],
        json!([{"sku": "b", "requested": 2, "available": 1}])
    );
    assert_eq!(app.inventory_snapshot().await, before, "nothing reserved");
    assert_eq!(
        app.get("/v1/orders", Some(&ada.token)).await.body["data"],
        json!([])
    );
    // The cart stays open: the customer can fix it and try again.
    app.set_line(&ada, &cart, "b", 1).await.assert_status(200);
    app.start_checkout(&ada, &cart).await.assert_status(201);
    app.audit().await.assert_clean();
}

async fn carts_with_the_same_skus_in_opposite_orders_never_deadlock(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("left", 100, 30).await;
    app.new_product("right", 100, 30).await;
    let mut all = buyers(&app, 40, &[("left", 1), ("right", 1)]).await;
    all.extend(buyers(&app, 40, &[("right", 1), ("left", 1)]).await);

    let answers = race_checkouts(&app, all).await;

    let won = count(&answers, 201, None);
    assert_eq!(won, 30, "stock of 30 pairs");
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 50);
    assert_eq!(app.stock_of("left").await, (30, 30, 0));
    assert_eq!(app.stock_of("right").await, (30, 30, 0));
    app.audit().await.assert_clean();
}

async fn a_checkout_needs_an_open_non_empty_cart_of_ones_own(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let ada = app.new_customer("Ada").await;
    let empty = app.new_cart(&ada).await;
    app.start_checkout(&ada, &empty)
        .await
        .assert_error(422, "cart_empty");

    let (bob, cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    app.start_checkout(&ada, &cart)
        .await
        .assert_error(404, "cart_not_found");
    app.start_checkout(&bob, &cart).await.assert_status(201);
    app.start_checkout(&bob, &cart)
        .await
        .assert_error(409, "cart_not_open");
    app.post(
        "/v1/checkouts",
        Some(&bob.token),
        json!({"cart_id": "nope"}),
    )
    .await
    .assert_error(404, "cart_not_found");
    app.post("/v1/checkouts", Some(&bob.token), json!({}))
        .await
        .assert_error(422, "validation_failed");
    app.post(
        "/v1/checkouts",
        Some(&bob.token),
        json!({"cart_id": cart, "total": 1}),
    )
    .await
    .assert_error(422, "validation_failed");
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4));
    app.audit().await.assert_clean();
}

async fn heartbeats_keep_a_checkout_alive_until_its_maximum_lifetime(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 60,
            max_lifetime_seconds: 150,
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let started = app.start_checkout(&ada, &cart).await;
    started.assert_status(201);
    let id = started.str("id");
    let created = chrono::DateTime::parse_from_rfc3339(&started.str("created_at")).unwrap();
    let heartbeat = |app: &TestApp| {
        let path = format!("/v1/checkouts/{id}/heartbeat");
        let token = ada.token.clone();
        let app = app_handle(app);
        async move {
            let resp = app
                .client
                .post(format!("{}{path}", app.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };

    // 50 s in: a heartbeat pushes expiry to now + 60 s, past the original window.
    app.advance(Duration::seconds(50));
    let (status, body) = heartbeat(&app).await;
    assert_eq!(status, 200, "{body}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, Duration::seconds(110));
    // At 100 s the original window is long gone but the checkout lives.
    app.advance(Duration::seconds(50));
    assert!(app.expiry.tick().await.unwrap().checkouts.is_empty());
    let (status, body) = heartbeat(&app).await;
    assert_eq!(status, 200, "{body}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires - created,
        Duration::seconds(150),
        "capped at the maximum lifetime"
    );

    // Past the maximum lifetime the heartbeat cannot help and the worker releases it.
    app.advance(Duration::seconds(51));
    let (status, body) = heartbeat(&app).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("checkout_expired"))
    );
    let released = app.expiry.tick().await.unwrap();
    assert_eq!(released.checkouts.len(), 1);
    assert_eq!(released.units, 2);
    assert!(
        app.expiry.tick().await.unwrap().checkouts.is_empty(),
        "released once"
    );
    let (status, body) = heartbeat(&app).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("checkout_expired"))
    );
    assert_eq!(
        app.get(&format!("/v1/checkouts/{id}"), Some(&ada.token))
            .await
            .body["state"],
        "expired"
    );
    assert_eq!(app.stock_of("tea-01").await, (5, 0, 5));
    app.audit().await.assert_clean();
}

async fn a_short_window_expires_and_the_units_come_back(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 1).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    let started = app.start_checkout(&ada, &cart).await;
    started.assert_status(201);
    assert_eq!(app.stock_of("tea-01").await, (1, 1, 0));

    // The running expiry worker releases it within a few seconds of expires_at.
    eventually(10, "the unit comes back", || async {
        app.stock_of("tea-01").await == (1, 0, 1)
    })
    .await;

    let checkout = app
        .get(
            &format!("/v1/checkouts/{}", started.str("id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(checkout.body["state"], "expired");
    let order = app
        .get(
            &format!("/v1/orders/{}", started.str("order_id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(order.body["status"], "cancelled");
    // The cart is open again, and the next buyer can have the unit.
    let (bob, bobs_cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    app.start_checkout(&bob, &bobs_cart)
        .await
        .assert_status(201);
    app.audit().await.assert_clean();
    // Shutdown stops the server and its expiry worker cleanly.
    app.stop().await;
}

async fn the_audit_judges_what_is_overdue_by_the_apps_own_clock(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 60,
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 1).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    app.start_checkout(&ada, &cart).await.assert_status(201);

    // Long past its window and the audit's grace, by the app's clock, with nobody releasing it.
    app.advance(Duration::minutes(10));
    let report = app.audit().await;

    assert!(
        report
            .violations()
            .any(|v| v.contains("reserved, expired at") && v.contains("never released")),
        "{report}"
    );
    while !app.expiry.tick().await.expect("tick").checkouts.is_empty() {}
    app.audit().await.assert_clean();
}

async fn cancel_releases_at_once_and_is_idempotent(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 3).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 3)]).await;
    let started = app.start_checkout(&ada, &cart).await;
    let id = started.str("id");
    let bob = app.new_customer("Bob").await;
    app.request(
        Method::POST,
        &format!("/v1/checkouts/{id}/cancel"),
        Some(&bob.token),
        None,
    )
    .await
    .assert_error(404, "checkout_not_found");
    assert_eq!(app.stock_of("tea-01").await, (3, 3, 0));

    let cancelled = app
        .request(
            Method::POST,
            &format!("/v1/checkouts/{id}/cancel"),
            Some(&ada.token),
            None,
        )
        .await;
    cancelled.assert_status(200);
    assert_eq!(cancelled.body["state"], "cancelled");
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3));
    let again = app
        .request(
            Method::POST,
            &format!("/v1/checkouts/{id}/cancel"),
            Some(&ada.token),
            None,
        )
        .await;
    again.assert_status(200);
    assert_eq!(app.stock_of("tea-01").await, (3, 0, 3), "released once");
    app.request(
        Method::POST,
        &format!("/v1/checkouts/{id}/heartbeat"),
        Some(&ada.token),
        None,
    )
    .await
    .assert_error(409, "invalid_state");
    let order = app
        .get(
            &format!("/v1/orders/{}", started.str("order_id")),
            Some(&ada.token),
        )
        .await;
    assert_eq!(order.body["status"], "cancelled");
    app.audit().await.assert_clean();
}

async fn stock_can_never_drop_below_what_is_reserved(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 4)]).await;
    app.start_checkout(&ada, &cart).await.assert_status(201);
    let patch = |stock: i64, version: &'static str| {
        app.client
            .patch(format!("{}/v1/admin/products/tea-01", app.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("If-Match", version)
            .json(&json!({ "stock": stock }))
            .send()
    };
    let resp = patch(3, "\"1\"").await.unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "stock_below_reserved");
    assert_eq!(app.stock_of("tea-01").await, (5, 4, 1));
    let resp = patch(4, "\"1\"").await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(app.stock_of("tea-01").await, (4, 4, 0));
    app.audit().await.assert_clean();
}

async fn every_stock_edit_is_recorded_and_stock_changed_behind_the_store_fails_the_audit(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    app.start_checkout(&ada, &cart).await.assert_status(201);
    let before = chrono::Utc::now().timestamp_millis();

    let resp = app
        .client
        .patch(format!("{}/v1/admin/products/tea-01", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("If-Match", "\"1\"")
        .json(&json!({ "stock": 8 }))
        .send()
        .await
        .expect("request");

    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["etag"], "\"2\"");
    let after = chrono::Utc::now().timestamp_millis();
    let rows = fetch_strings(
        &app,
        "SELECT a.actor || ' ' || a.reason || ' ' || CAST(a.old_stock AS TEXT) || ' ' || \
         CAST(a.new_stock AS TEXT) || ' ' || CAST(a.at AS TEXT) \
         FROM stock_adjustments a JOIN products p ON p.id = a.product_id \
         WHERE p.sku = 'tea-01' ORDER BY a.id",
    )
    .await;
    assert_eq!(rows.len(), 2, "the creation and the edit: {rows:?}");
    let edit: Vec<&str> = rows[1].split(' ').collect();
    assert_eq!(&edit[..4], ["admin", "admin_edit", "5", "8"], "{rows:?}");
    let at: i64 = edit[4].parse().expect("milliseconds");
    assert!(
        (before..=after).contains(&at),
        "{before} <= {at} <= {after}"
    );
    assert_eq!(app.stock_of("tea-01").await, (8, 2, 6));
    app.audit().await.assert_clean();

    // A unit that appears without an adjustment: the stock history no longer adds up.
    execute_sql(
        &app,
        &["UPDATE products SET stock = stock + 1 WHERE sku = 'tea-01'".to_owned()],
    )
    .await;
    let report = app.audit().await;

    assert!(
        report
            .violations()
            .any(|v| v.contains("tea-01: stock 9 but adjustments 8 minus sold 0 = 8")),
        "{report}"
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.arg("audit")
        .arg("--data-dir")
        .arg(&app.settings.data_dir);
    if let Some(url) = &app.database_url {
        cmd.arg("--database-url").arg(url);
    }
    let out = cmd.output().expect("run holdfast audit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("stock 9 but adjustments 8"), "{stdout}");
}

async fn the_audit_finds_a_corrupted_row(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    app.start_checkout(&ada, &cart).await.assert_status(201);
    app.audit().await.assert_clean();

    // Reserved units nobody holds: the kind of drift a hand-rolled checkout produces.
    let corrupt = "UPDATE products SET reserved = reserved + 1 WHERE sku = 'tea-01'";
    match kind {
        StoreKind::Postgres => {
            let url = app.database_url.clone().unwrap();
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query(corrupt).execute(&pool).await.unwrap();
        }
        StoreKind::Sqlite => {
            let path = app.settings.data_dir.join("holdfast.db");
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            sqlx::query(corrupt).execute(&pool).await.unwrap();
        }
    }
    let report = app.audit().await;
    assert!(!report.is_clean());
    assert!(
        report
            .violations()
            .any(|v| v.contains("tea-01") && v.contains("live reservations hold 2")),
        "{report}"
    );

    // The command says so too, with exit code 1, against the live store.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.arg("audit")
        .arg("--data-dir")
        .arg(&app.settings.data_dir);
    if let Some(url) = &app.database_url {
        cmd.arg("--database-url").arg(url);
    }
    let out = cmd.output().expect("run holdfast audit");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL  1 no oversell"));
}

async fn a_price_that_keeps_changing_is_a_clear_conflict_and_reserves_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    // Every attempt moves the price after reading it and before its guarded update (the
    // reservation rows are written in between), inside the attempt's own transaction.
    let install = match kind {
        StoreKind::Postgres => vec![
            "CREATE FUNCTION move_price() RETURNS trigger AS $$ BEGIN \
             UPDATE products SET price_amount = price_amount + 1 WHERE id = NEW.product_id; \
             RETURN NEW; END $$ LANGUAGE plpgsql"
                .to_owned(),
            "CREATE TRIGGER moving_price AFTER INSERT ON reservations \
             FOR EACH ROW EXECUTE FUNCTION move_price()"
                .to_owned(),
        ],
        StoreKind::Sqlite => vec!["CREATE TRIGGER moving_price AFTER INSERT ON reservations \
             BEGIN UPDATE products SET price_amount = price_amount + 1 \
             WHERE id = NEW.product_id; END"
            .to_owned()],
    };
    execute_sql(&app, &install).await;
    let before = app.inventory_snapshot().await;

    let resp = app.start_checkout(&ada, &cart).await;

    resp.assert_error(409, "price_changed");
    assert_eq!(app.inventory_snapshot().await, before, "nothing changed");
    let open = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(open.body["status"], "open");
    execute_sql(
        &app,
        &["DROP TRIGGER moving_price ON reservations".to_owned()]
            .into_iter()
            .map(|sql| match kind {
                StoreKind::Postgres => sql,
                StoreKind::Sqlite => "DROP TRIGGER moving_price".to_owned(),
            })
            .collect::<Vec<_>>(),
    )
    .await;
    let started = app.start_checkout(&ada, &cart).await;
    started.assert_status(201);
    assert_eq!(started.body["total"]["amount"], 450);
    app.audit().await.assert_clean();
}

async fn buyers_racing_cancellations_are_never_refused_while_units_are_free(kind: StoreKind) {
    const UNITS: usize = 20;
    let app = spawn_app(kind).await;
    app.new_product("hot", 500, UNITS as i64).await;
    let holders = buyers(&app, UNITS, &[("hot", 1)]).await;
    let held = race_checkouts(&app, holders.clone()).await;
    assert_eq!(count(&held, 201, None), UNITS);
    let newcomers = buyers(&app, UNITS, &[("hot", 1)]).await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(2 * UNITS));
    let handle = Arc::new(app_handle(&app));

    // Every holder cancels while as many newcomers check out. A newcomer refused before the
    // last cancel may simply have been early; one refused by an attempt that began after every
    // unit came back was refused while stock was free.
    let cancels: Vec<_> = holders
        .into_iter()
        .zip(&held)
        .map(|((holder, _), answer)| {
            let (barrier, handle, cancelled) = (barrier.clone(), handle.clone(), cancelled.clone());
            let id = answer.str("id");
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = handle
                    .client
                    .post(format!("{}/v1/checkouts/{id}/cancel", handle.base))
                    .bearer_auth(&holder.token)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status().as_u16(), 200, "cancel");
                cancelled.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    let checkouts: Vec<_> = newcomers
        .into_iter()
        .map(|(customer, cart)| {
            let (barrier, handle, cancelled) = (barrier.clone(), handle.clone(), cancelled.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut answers = Vec::new();
                loop {
                    let all_back = cancelled.load(Ordering::SeqCst) == UNITS;
                    let resp = handle.start_checkout(&customer, &cart).await;
                    let again = resp.code() == "insufficient_stock" && !all_back;
                    answers.push(resp);
                    if !again {
                        return answers;
                    }
                    // Pacing, not synchronisation: the outcome is decided by the loop above.
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    for task in cancels {
        task.await.expect("cancel task");
    }
    let mut finals = Vec::new();
    for task in checkouts {
        let mut answers = task.await.expect("checkout task");
        for answer in &answers {
            assert!(
                answer.status.as_u16() == 201 || answer.code() == "insufficient_stock",
                "only a reservation or a real shortfall: {:?}",
                answer.body
            );
        }
        finals.push(answers.pop().expect("at least one answer"));
    }

    assert_eq!(
        count(&finals, 201, None),
        UNITS,
        "every newcomer got a unit"
    );
    assert_eq!(app.stock_of("hot").await, (UNITS as i64, UNITS as i64, 0));
    app.audit().await.assert_clean();
}

// PostgreSQL only: several instances and workers on one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_sell_each_unit_once() {
    let first = spawn_app(StoreKind::Postgres).await;
    let second = first.spawn_sibling().await;
    first.new_product("hot", 500, 10).await;
    let all = buyers(&first, 200, &[("hot", 1)]).await;
    let barrier = Arc::new(Barrier::new(all.len()));
    let handles = [Arc::new(app_handle(&first)), Arc::new(app_handle(&second))];
    let tasks: Vec<_> = all
        .into_iter()
        .enumerate()
        .map(|(i, (customer, cart))| {
            let app = handles[i % 2].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                app.start_checkout(&customer, &cart).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(count(&answers, 201, None), 10);
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 190);
    assert_eq!(second.stock_of("hot").await, (10, 10, 0));
    first.audit().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_expiry_workers_release_each_reservation_exactly_once() {
    let app = spawn_app_with(
        StoreKind::Postgres,
        Options {
            ttl_seconds: 60,
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    app.new_product("hot", 500, 300).await;
    let all = buyers(&app, 300, &[("hot", 1)]).await;
    let answers = race_checkouts(&app, all).await;
    assert_eq!(count(&answers, 201, None), 300);
    app.advance(Duration::seconds(61));

    // Two workers on two separate pools, as two instances would have.
    let other = holdfast::store::PgStore::connect(app.database_url.as_deref().unwrap(), 4)
        .await
        .unwrap();
    let workers = [
        Arc::new(ExpiryWorker::new(app.store.clone(), app.clock.clone())),
        Arc::new(ExpiryWorker::new(Arc::new(other), app.clock.clone())),
    ];
    let runs: Vec<_> = workers
        .iter()
        .map(|w| {
            let w = w.clone();
            tokio::spawn(async move {
                let (mut checkouts, mut units) = (0, 0);
                loop {
                    let released = w.tick().await.expect("tick");
                    if released.checkouts.is_empty() {
                        return (checkouts, units);
                    }
                    checkouts += released.checkouts.len();
                    units += released.units;
                }
            })
        })
        .collect();
    let mut total = (0, 0);
    for r in runs {
        let (c, u) = r.await.unwrap();
        total = (total.0 + c, total.1 + u);
    }
    assert_eq!(total, (300, 300), "each reservation released exactly once");
    assert_eq!(app.stock_of("hot").await, (300, 0, 300));
    app.audit().await.assert_clean();
}

// PostgreSQL only: a price that moves between reading the cart and locking the row.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_changed_while_checking_out_is_charged_at_the_new_price() {
    let app = spawn_app(StoreKind::Postgres).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let url = app
        .database_url
        .clone()
        .expect("a PostgreSQL app has a URL");
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    // Hold the row with a price change in flight: the checkout reads the old price, then its
    // guarded update waits for this transaction.
    let mut change = admin.begin().await.expect("begin");
    sqlx::query("UPDATE products SET price_amount = 500 WHERE sku = 'tea-01'")
        .execute(&mut *change)
        .await
        .expect("price change");
    let checkout = {
        let (base, client, token) = (app.base.clone(), app.client.clone(), ada.token.clone());
        tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/v1/checkouts"))
                .bearer_auth(token)
                .json(&json!({ "cart_id": cart }))
                .send()
                .await
                .expect("request");
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.expect("json"),
            )
        })
    };
    eventually(10, "the checkout waits on the product row", || {
        let admin = admin.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%hf_reserve_checkouts%'",
            )
            .fetch_one(&admin)
            .await
            .expect("activity");
            waiting > 0
        }
    })
    .await;
    change.commit().await.expect("commit the new price");

    let (status, body) = checkout.await.expect("task");

    assert_eq!(status, 201, "{body}");
    assert_eq!(body["total"]["amount"], 1000, "charged at the new price");
    assert_eq!(app.stock_of("tea-01").await, (5, 2, 3));
    app.audit().await.assert_clean();
}

// PostgreSQL only: the verdict is read under the row lock, so a guarded update that still
// misses is a broken row, never a refusal.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_misses_a_locked_row_with_room_refuses_no_one_and_writes_nothing() {
    let app = spawn_app(StoreKind::Postgres).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    // The reservation's guarded update always misses although the row has room and its lock
    // is held: what only a broken row (or a store bug) could make it see.
    execute_sql(
        &app,
        &[
            "CREATE FUNCTION miss_the_guard() RETURNS trigger AS $$ BEGIN \
             IF NEW.reserved > OLD.reserved \
                AND position('hf_reserve_checkouts' IN current_query()) > 0 THEN \
               RETURN NULL; \
             END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                .to_owned(),
            "CREATE TRIGGER missing_guard BEFORE UPDATE ON products \
             FOR EACH ROW EXECUTE FUNCTION miss_the_guard()"
                .to_owned(),
        ],
    )
    .await;
    let before = app.inventory_snapshot().await;

    let resp = app.start_checkout(&ada, &cart).await;

    resp.assert_error(500, "internal");
    assert_eq!(app.inventory_snapshot().await, before, "nothing changed");
    let open = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(open.body["status"], "open");
    app.audit().await.assert_clean();
}

// PostgreSQL only: the expiry worker through a database outage.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_worker_keeps_releasing_after_the_database_dropped_its_connections() {
    let app = spawn_app_with(
        StoreKind::Postgres,
        Options {
            ttl_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("tea-01", 450, 2).await;
    let (ada, adas_cart) = app.buyer_with("Ada", &[("tea-01", 1)]).await;
    let first = app.start_checkout(&ada, &adas_cart).await;
    first.assert_status(201);

    // An outage: every connection of the app's database is killed, and no new one is let in
    // until the worker has failed at least once.
    let outage = DatabaseOutage::begin(&app).await;
    eventually(20, "the expiry worker meets the outage", || async {
        app.expiry.failed_ticks() > 0
    })
    .await;
    outage.end().await;

    // The worker is still running: what expired during the outage and what expires after it
    // both come back.
    let (bob, bobs_cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    let later = app.start_checkout(&bob, &bobs_cart).await;
    later.assert_status(201);
    eventually(20, "both units come back", || async {
        app.stock_of("tea-01").await == (2, 0, 2)
    })
    .await;
    for (customer, checkout) in [(&ada, &first), (&bob, &later)] {
        let got = app
            .get(
                &format!("/v1/checkouts/{}", checkout.str("id")),
                Some(&customer.token),
            )
            .await;
        assert_eq!(got.body["state"], "expired");
    }
    app.audit().await.assert_clean();
}
