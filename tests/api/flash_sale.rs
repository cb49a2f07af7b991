//! Flash sales end to end (DESIGN §5): the gate admits exactly as many buyers as units, refused
//! buyers never reach the database, abandoned and declined checkouts hand their units to the
//! next buyer, and Redis going away fails closed. PostgreSQL runs with the Redis gate, SQLite
//! with the in-process gate.

use std::sync::Arc;

use futures::stream::{self, StreamExt as _};
use holdfast::store::StoreKind;
use serde_json::{json, Value};
use tokio::sync::Barrier;

use crate::both_stores;
use crate::gate::DedicatedRedis;
use crate::helpers::{buyers, spawn_app_with, AssertClean, Customer, Options, Resp, TestApp};

both_stores!(
    five_thousand_token_requests_for_a_hundred_units_admit_exactly_a_hundred,
    five_thousand_buyers_for_a_hundred_units_make_exactly_a_hundred_paid_orders,
    a_flash_sale_item_needs_the_buyers_own_token,
    abandoned_and_declined_checkouts_hand_their_units_to_the_next_buyer,
    a_sale_cannot_offer_more_than_is_available,
    refused_buyers_are_answered_without_touching_the_database,
);

fn redis_url() -> String {
    std::env::var("HOLDFAST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub(crate) async fn app_for(kind: StoreKind, options: Options) -> TestApp {
    let redis = matches!(kind, StoreKind::Postgres).then(redis_url);
    spawn_app_with(kind, Options { redis, ..options }).await
}

pub(crate) async fn open_sale(
    app: &TestApp,
    sku: &str,
    units: i64,
    ttl_seconds: Option<i64>,
) -> String {
    let mut body = json!({ "sku": sku, "units": units });
    if let Some(ttl) = ttl_seconds {
        body["reservation_ttl_seconds"] = json!(ttl);
    }
    let resp = app.admin_post("/v1/admin/flash-sales", body).await;
    resp.assert_status(201);
    resp.str("id")
}

pub(crate) async fn take_token(app: &TestApp, customer: &Customer, sale: &str) -> Resp {
    app.request(
        reqwest::Method::POST,
        &format!("/v1/flash-sales/{sale}/tokens"),
        Some(&customer.token),
        None,
    )
    .await
}

pub(crate) async fn checkout_with_token(
    app: &TestApp,
    customer: &Customer,
    cart: &str,
    token: &str,
) -> Resp {
    app.post(
        "/v1/checkouts",
        Some(&customer.token),
        json!({ "cart_id": cart, "flash_sale_token": token }),
    )
    .await
}

/// Every buyer asks for a token of `sale` at once (released together by a barrier):
/// `(status, body)` of each answer.
async fn race_for_tokens(
    app: &TestApp,
    sale: &str,
    buyers: &[(Customer, String)],
) -> Vec<(u16, Value)> {
    let barrier = Arc::new(Barrier::new(buyers.len()));
    let tasks: Vec<_> = buyers
        .iter()
        .cloned()
        .map(|(customer, _)| {
            let (client, base, sale, barrier) = (
                app.client.clone(),
                app.base.clone(),
                sale.to_owned(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = client
                    .post(format!("{base}/v1/flash-sales/{sale}/tokens"))
                    .bearer_auth(&customer.token)
                    .send()
                    .await
                    .expect("request");
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    answers
}

/// Row counts of every table a buyer could write to.
async fn table_counts(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "customers",
        "carts",
        "cart_lines",
        "checkouts",
        "orders",
        "reservations",
        "idempotency_keys",
        "outbox",
    ] {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        let n: i64 = match app.kind {
            StoreKind::Postgres => {
                let pool = sqlx::PgPool::connect(app.database_url.as_deref().unwrap())
                    .await
                    .unwrap();
                sqlx::query_scalar(&sql).fetch_one(&pool).await.unwrap()
            }
            StoreKind::Sqlite => {
                let path = app.settings.data_dir.join("holdfast.db");
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .unwrap();
                sqlx::query_scalar(&sql).fetch_one(&pool).await.unwrap()
            }
        };
        counts.push(n);
    }
    counts
}

async fn five_thousand_token_requests_for_a_hundred_units_admit_exactly_a_hundred(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 100).await;
    let sale = open_sale(&app, "hot", 100, None).await;
    let all = buyers(&app, 5000, &[("hot", 1)]).await;
    let before = table_counts(&app).await;

    let answers = race_for_tokens(&app, &sale, &all).await;

    let granted = answers.iter().filter(|(s, _)| *s == 201).count();
    let sold_out = answers
        .iter()
        .filter(|(s, b)| *s == 409 && b["error"]["code"] == "sold_out")
        .count();
    let others: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 201 && *s != 409)
        .collect();
    assert_eq!(
        (granted, sold_out),
        (100, 4900),
        "other answers: {others:?}"
    );
    assert_eq!(
        table_counts(&app).await,
        before,
        "refused buyers wrote nothing to the database"
    );
    // A holder asking again gets the same token.
    let (holder, token) = all
        .iter()
        .zip(&answers)
        .find(|(_, (s, _))| *s == 201)
        .map(|(b, (_, body))| (b.0.clone(), body["token"].clone()))
        .unwrap();
    let again = take_token(&app, &holder, &sale).await;
    again.assert_status(200);
    assert_eq!(again.body["token"], token);
    let figures = app
        .get(
            &format!("/v1/admin/flash-sales/{sale}"),
            Some(crate::helpers::ADMIN_TOKEN),
        )
        .await;
    assert_eq!(
        figures.body["figures"],
        json!({"holders": 100, "held": 100, "sold": 0})
    );
}

async fn five_thousand_buyers_for_a_hundred_units_make_exactly_a_hundred_paid_orders(
    kind: StoreKind,
) {
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 100).await;
    let sale = open_sale(&app, "hot", 100, None).await;
    let all = buyers(&app, 5000, &[("hot", 1)]).await;

    let outcomes: Vec<String> = stream::iter(all)
        .map(|(customer, cart)| {
            let (app, sale) = (&app, &sale);
            async move {
                let token = take_token(app, &customer, sale).await;
                if token.status.as_u16() != 201 {
                    return token.code().to_owned();
                }
                let checkout =
                    checkout_with_token(app, &customer, &cart, &token.str("token")).await;
                if checkout.status.as_u16() != 201 {
                    return format!("checkout {}", checkout.code());
                }
                let paid = app
                    .complete(&customer, &checkout.str("id"), "pm_card_visa", "k")
                    .await;
                paid.body["state"].as_str().unwrap_or("?").to_owned()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;

    let completed = outcomes.iter().filter(|o| *o == "completed").count();
    let sold_out = outcomes.iter().filter(|o| *o == "sold_out").count();
    assert_eq!(
        (completed, sold_out),
        (100, 4900),
        "{:?}",
        outcomes
            .iter()
            .filter(|o| *o != "completed" && *o != "sold_out")
            .collect::<Vec<_>>()
    );
    assert_eq!(app.stock_of("hot").await, (0, 0, 0));
    let figures = app
        .get(
            &format!("/v1/admin/flash-sales/{sale}"),
            Some(crate::helpers::ADMIN_TOKEN),
        )
        .await;
    assert_eq!(
        figures.body["figures"],
        json!({"holders": 0, "held": 0, "sold": 100})
    );
    app.audit().await.assert_clean();
}

async fn a_flash_sale_item_needs_the_buyers_own_token(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 10).await;
    let sale = open_sale(&app, "hot", 5, None).await;
    let (ada, carts) = {
        let ada = app.new_customer("Ada").await;
        let first = app.new_cart(&ada).await;
        let second = app.new_cart(&ada).await;
        for cart in [&first, &second] {
            app.set_line(&ada, cart, "hot", 1).await.assert_status(200);
        }
        (ada, [first, second])
    };
    let (bob, bobs_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;

    app.start_checkout(&ada, &carts[0])
        .await
        .assert_error(403, "admission_required");
    let token = take_token(&app, &ada, &sale).await;
    token.assert_status(201);
    let token = token.str("token");
    checkout_with_token(&app, &bob, &bobs_cart, &token)
        .await
        .assert_error(403, "admission_required");
    checkout_with_token(&app, &ada, &carts[0], "fst_forged")
        .await
        .assert_error(403, "admission_required");
    let started = checkout_with_token(&app, &ada, &carts[0], &token).await;
    started.assert_status(201);
    // The sale's window (5 min) applies, not the default 3 min.
    let created = chrono::DateTime::parse_from_rfc3339(&started.str("created_at")).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(&started.str("expires_at")).unwrap();
    assert_eq!((expires - created).num_seconds(), 300);
    // One admission, one live checkout.
    checkout_with_token(&app, &ada, &carts[1], &token)
        .await
        .assert_error(409, "admission_in_use");
    assert_eq!(app.stock_of("hot").await, (10, 1, 9));
    app.audit().await.assert_clean();
}

async fn abandoned_and_declined_checkouts_hand_their_units_to_the_next_buyer(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 2).await;
    let sale = open_sale(&app, "hot", 2, Some(1)).await;
    let (ada, ada_cart) = app.buyer_with("Ada", &[("hot", 1)]).await;
    let (bob, bob_cart) = app.buyer_with("Bob", &[("hot", 1)]).await;
    let (cy, cy_cart) = app.buyer_with("Cy", &[("hot", 1)]).await;
    let (dee, dee_cart) = app.buyer_with("Dee", &[("hot", 1)]).await;

    // Ada abandons her checkout; Bob's card is declined.
    let ada_token = take_token(&app, &ada, &sale).await.str("token");
    checkout_with_token(&app, &ada, &ada_cart, &ada_token)
        .await
        .assert_status(201);
    let bob_token = take_token(&app, &bob, &sale).await.str("token");
    let bobs = checkout_with_token(&app, &bob, &bob_cart, &bob_token).await;
    take_token(&app, &cy, &sale)
        .await
        .assert_error(409, "sold_out");
    let declined = app
        .complete(&bob, &bobs.str("id"), "pm_card_chargeDeclined", "k")
        .await;
    assert_eq!(declined.body["state"], "payment_failed");

    // Bob's unit comes back at once: Cy takes it and pays.
    let cy_token = take_token(&app, &cy, &sale).await;
    cy_token.assert_status(201);
    let started = checkout_with_token(&app, &cy, &cy_cart, &cy_token.str("token")).await;
    started.assert_status(201);
    let paid = app
        .complete(&cy, &started.str("id"), "pm_card_visa", "k")
        .await;
    assert_eq!(paid.body["state"], "completed");

    // Ada's comes back when her 1 s window passes: Dee takes it and pays.
    take_token(&app, &dee, &sale)
        .await
        .assert_error(409, "sold_out");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let dee_token = loop {
        let answer = take_token(&app, &dee, &sale).await;
        if answer.status.as_u16() == 201 {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Ada's abandoned unit never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let started = checkout_with_token(&app, &dee, &dee_cart, &dee_token.str("token")).await;
    started.assert_status(201);
    let paid = app
        .complete(&dee, &started.str("id"), "pm_card_visa", "k")
        .await;
    assert_eq!(paid.body["state"], "completed");
    assert_eq!(app.stock_of("hot").await, (0, 0, 0));
    app.audit().await.assert_clean();
}

async fn a_sale_cannot_offer_more_than_is_available(kind: StoreKind) {
    let app = app_for(kind, Options::default()).await;
    app.new_product("hot", 500, 3).await;
    let resp = app
        .admin_post("/v1/admin/flash-sales", json!({"sku": "hot", "units": 4}))
        .await;
    resp.assert_error(409, "units_exceed_available");
    for (body, what) in [
        (json!({"sku": "hot", "units": 0}), "no units"),
        (
            json!({"sku": "hot", "units": 1, "reservation_ttl_seconds": 0}),
            "no window",
        ),
        (
            json!({"sku": "hot", "units": 1, "starts_at": "2030-01-01T00:00:00Z", "ends_at": "2029-01-01T00:00:00Z"}),
            "ends before it starts",
        ),
        (
            json!({"sku": "hot", "units": 1, "price": 1}),
            "unknown field",
        ),
    ] {
        let resp = app.admin_post("/v1/admin/flash-sales", body).await;
        assert_eq!(
            (resp.status.as_u16(), resp.code()),
            (422, "validation_failed"),
            "{what}"
        );
    }
    app.admin_post("/v1/admin/flash-sales", json!({"sku": "nope", "units": 1}))
        .await
        .assert_error(404, "product_not_found");
    let later = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot", "units": 1, "starts_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    later.assert_status(201);
    // Anyone may list the sales that are on or planned.
    let listed = app.get("/v1/flash-sales", None).await;
    listed.assert_status(200);
    assert_eq!(listed.body["data"][0]["id"], later.str("id").as_str());
    assert_eq!(listed.body["data"][0]["sku"], "hot");
    assert!(listed.body["data"][0].get("figures").is_none());
    // One live (or planned) sale per SKU.
    app.admin_post("/v1/admin/flash-sales", json!({"sku": "hot", "units": 1}))
        .await
        .assert_error(409, "flash_sale_exists");
    let ada = app.new_customer("Ada").await;
    take_token(&app, &ada, &later.str("id"))
        .await
        .assert_error(409, "sale_not_started");
    take_token(&app, &ada, "00000000-0000-0000-0000-000000000000")
        .await
        .assert_error(404, "flash_sale_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_sale_answers_503_and_never_oversells() {
    let mut redis = DedicatedRedis::start();
    redis.wait_until_ready().await;
    let app = spawn_app_with(
        StoreKind::Postgres,
        Options {
            redis: Some(redis.url()),
            ..Options::default()
        },
    )
    .await;
    app.new_product("hot", 500, 3).await;
    let sale = open_sale(&app, "hot", 3, None).await;
    let all = buyers(&app, 8, &[("hot", 1)]).await;
    let first = take_token(&app, &all[0].0, &sale).await;
    first.assert_status(201);

    redis.kill();
    let refused = take_token(&app, &all[1].0, &sale).await;
    refused.assert_error(503, "admission_unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    // A token holder cannot be checked either: the gate fails closed.
    checkout_with_token(&app, &all[0].0, &all[0].1, &first.str("token"))
        .await
        .assert_error(503, "admission_unavailable");

    redis.restart();
    redis.wait_until_ready().await;
    // The restarted Redis kept nothing, so the gate may admit again; the database's guard
    // still sells at most the 3 units.
    let mut sold = 0;
    for (customer, cart) in &all[1..] {
        let mut token = take_token(&app, customer, &sale).await;
        for _ in 0..50 {
            if token.status.as_u16() != 503 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            token = take_token(&app, customer, &sale).await;
        }
        if token.status.as_u16() != 201 {
            continue;
        }
        let started = checkout_with_token(&app, customer, cart, &token.str("token")).await;
        if started.status.as_u16() == 201 {
            let paid = app
                .complete(customer, &started.str("id"), "pm_card_visa", "k")
                .await;
            if paid.body["state"] == "completed" {
                sold += 1;
            }
        }
    }
    assert!((1..=3).contains(&sold), "sold {sold}");
    let (stock, _, _) = app.stock_of("hot").await;
    assert_eq!(stock + sold, 3, "every sold unit left stock exactly once");
    app.audit().await.assert_clean();
}

/// Promise of DESIGN §5: once the units are spoken for, a buyer hears `sold_out` from the gate
/// alone. The store counts every connection it takes from its pool; hundreds of refusals, all at
/// once, must not move that count. (Background workers are off, so nothing else touches it.)
async fn refused_buyers_are_answered_without_touching_the_database(kind: StoreKind) {
    // Arrange: ten units, ten holders, and 490 more buyers whose credentials the service has
    // already seen once (a first request authenticates against the store).
    let app = app_for(
        kind,
        Options {
            workers: false,
            ..Options::default()
        },
    )
    .await;
    app.new_product("hot", 500, 10).await;
    let sale = open_sale(&app, "hot", 10, None).await;
    let all = buyers(&app, 500, &[("hot", 1)]).await;
    let (holders, refused) = all.split_at(10);
    for (customer, _) in holders {
        take_token(&app, customer, &sale).await.assert_status(201);
    }
    for (customer, cart) in refused {
        app.get(&format!("/v1/carts/{cart}"), Some(&customer.token))
            .await
            .assert_status(200);
    }
    let before = app.store.acquisitions();

    // Act: every other buyer asks at once.
    let answers = race_for_tokens(&app, &sale, refused).await;
    let after = app.store.acquisitions();

    // Assert
    let sold_out = answers
        .iter()
        .filter(|(s, b)| *s == 409 && b["error"]["code"] == "sold_out")
        .count();
    assert_eq!(
        sold_out,
        refused.len(),
        "every refused buyer hears sold_out: {answers:?}"
    );
    assert_eq!(
        after,
        before,
        "{} refusals took {} connections from the store",
        refused.len(),
        after - before
    );
    // The count does move when the database is used, so the check above can fail.
    app.get(
        &format!("/v1/carts/{}", refused[0].1),
        Some(&refused[0].0.token),
    )
    .await
    .assert_status(200);
    assert!(app.store.acquisitions() > after);
    assert_eq!(app.stock_of("hot").await, (10, 0, 10));
    app.audit().await.assert_clean();
}
