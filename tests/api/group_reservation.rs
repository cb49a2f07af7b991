//! Group reservation (`--group-reservations`) keeps the plain path's promises: no oversell, no
//! undersell, all-or-nothing per checkout, and each request its own answer. The store is
//! driven directly with hand-built batches, and the service races real HTTP checkouts.

use std::sync::Arc;

use chrono::{Duration, Utc};
use holdfast::domain::{
    CartId, CartStatus, CheckoutId, CustomerId, CustomerName, FlashSale, FlashSaleId, NewFlashSale,
    OrderId, Quantity, Sku,
};
use holdfast::store::{NewCheckout, OpenSale, StoreError, StoreKind};
use serde_json::json;
use tokio::sync::Barrier;

use crate::both_stores;
use crate::helpers::{buyers, spawn_app_with, AssertClean, Customer, Options, Resp, TestApp};
use crate::inventory::{count, race_checkouts};

both_stores!(
    a_batch_grants_what_fits_in_arrival_order_and_answers_the_rest_like_the_plain_path,
    a_batch_that_cannot_commit_as_a_whole_answers_each_request_on_its_own,
    two_hundred_grouped_buyers_race_for_the_last_unit_and_exactly_one_wins,
    two_thousand_grouped_buyers_for_a_hundred_units_get_exactly_a_hundred,
    grouped_carts_with_the_same_skus_in_opposite_orders_get_all_lines_or_none,
    grouped_buyers_of_different_quantities_are_refused_only_when_short,
    cart_errors_inside_a_batch_are_the_plain_paths_errors,
    flash_sale_checkouts_are_reserved_under_grouping,
);

async fn grouped_app(kind: StoreKind, linger_us: u64) -> TestApp {
    spawn_app_with(
        kind,
        Options {
            group_linger_us: Some(linger_us),
            ..Options::default()
        },
    )
    .await
}

/// A customer with a cart of these lines, made through the store.
async fn store_buyer(app: &TestApp, name: &str, lines: &[(&str, i64)]) -> (CustomerId, CartId) {
    let token = holdfast::http::new_customer_token();
    let customer = app
        .store
        .create_customer(
            &CustomerName::parse(name).expect("a name"),
            &holdfast::http::token_hash(&token),
        )
        .await
        .expect("customer");
    let now = Utc::now();
    let cart = app.store.create_cart(customer.id, now).await.expect("cart");
    for (sku, quantity) in lines {
        app.store
            .set_cart_line(
                customer.id,
                cart.id,
                &Sku::parse(sku).expect("a sku"),
                Quantity::new(*quantity).expect("a quantity"),
                now,
            )
            .await
            .expect("line");
    }
    (customer.id, cart.id)
}

/// A reservation request; with a sale, admitted for one unit of it.
fn request(customer: CustomerId, cart: CartId, sale: Option<&FlashSale>) -> NewCheckout {
    NewCheckout {
        capture_method: Default::default(),
        id: CheckoutId::new(),
        order_id: OrderId::new(),
        customer_id: customer,
        cart_id: cart,
        now: Utc::now(),
        ttl: Duration::seconds(180),
        max_lifetime: Duration::seconds(1800),
        flash_sale: sale.map(|sale| sale.id),
        flash_sale_units: u32::from(sale.is_some()),
        po_number: None,
        open_sales: sale
            .map(|sale| OpenSale {
                id: sale.id,
                sku: sale.sku.clone(),
            })
            .into_iter()
            .collect(),
        idempotency_key: None,
    }
}

/// `(sku, requested, available)` of an `InsufficientStock` answer.
fn shortfalls(answer: &Result<holdfast::domain::Checkout, StoreError>) -> Vec<(String, u32, i64)> {
    match answer {
        Err(StoreError::InsufficientStock(short)) => short
            .iter()
            .map(|s| (s.sku.to_string(), s.requested, s.available))
            .collect(),
        other => panic!("expected insufficient stock, got {other:?}"),
    }
}

async fn cart_status(app: &TestApp, customer: CustomerId, cart: CartId) -> (CartStatus, usize) {
    let cart = app
        .store
        .cart(customer, cart)
        .await
        .expect("read cart")
        .expect("the cart exists");
    (cart.status, cart.lines.len())
}

async fn a_batch_grants_what_fits_in_arrival_order_and_answers_the_rest_like_the_plain_path(
    kind: StoreKind,
) {
    let app = grouped_app(kind, 0).await;
    app.new_product("a", 100, 3).await;
    app.new_product("b", 250, 1).await;
    app.new_product("c", 50, 1).await;
    let first = store_buyer(&app, "first", &[("a", 2)]).await;
    let short_a = store_buyer(&app, "short a", &[("a", 2), ("b", 1)]).await;
    let fits = store_buyer(&app, "fits", &[("b", 1), ("a", 1)]).await;
    let short_b = store_buyer(&app, "short b", &[("b", 1)]).await;
    let (stranger, _) = store_buyer(&app, "stranger", &[]).await;
    let empty = store_buyer(&app, "empty", &[]).await;
    let done = store_buyer(&app, "done", &[("c", 1)]).await;
    app.store
        .reserve_checkout(&request(done.0, done.1, None))
        .await
        .expect("the plain path reserves c");
    let batch = vec![
        request(first.0, first.1, None),
        request(short_a.0, short_a.1, None),
        request(fits.0, fits.1, None),
        request(short_b.0, short_b.1, None),
        request(stranger, first.1, None),
        request(empty.0, empty.1, None),
        request(done.0, done.1, None),
        request(first.0, first.1, None),
    ];

    let answers = app.store.reserve_checkouts(&batch).await;

    assert_eq!(answers.len(), batch.len());
    let granted = answers[0].as_ref().expect("the first fits");
    assert_eq!((granted.id, granted.total.amount()), (batch[0].id, 200));
    assert_eq!(shortfalls(&answers[1]), vec![("a".to_owned(), 2, 1)]);
    let granted = answers[2].as_ref().expect("one a and one b still fit");
    assert_eq!((granted.id, granted.total.amount()), (batch[2].id, 350));
    assert_eq!(shortfalls(&answers[3]), vec![("b".to_owned(), 1, 0)]);
    assert!(
        matches!(answers[4], Err(StoreError::NotFound("cart"))),
        "{:?}",
        answers[4]
    );
    assert!(
        matches!(answers[5], Err(StoreError::CartEmpty)),
        "{:?}",
        answers[5]
    );
    for late in [&answers[6], &answers[7]] {
        assert!(
            matches!(late, Err(StoreError::CartNotOpen(CartStatus::CheckingOut))),
            "{late:?}"
        );
    }
    assert_eq!(app.stock_of("a").await, (3, 3, 0));
    assert_eq!(app.stock_of("b").await, (1, 1, 0));
    assert_eq!(app.stock_of("c").await, (1, 1, 0));
    // Refused carts are exactly as they were; granted ones are checking out.
    for (customer, cart, lines) in [(short_a.0, short_a.1, 2), (short_b.0, short_b.1, 1)] {
        assert_eq!(
            cart_status(&app, customer, cart).await,
            (CartStatus::Open, lines)
        );
        let orders = app.store.list_orders(customer, None, 10).await.unwrap();
        assert!(orders.items.is_empty(), "a refused buyer has no order");
    }
    assert_eq!(
        cart_status(&app, first.0, first.1).await,
        (CartStatus::CheckingOut, 1)
    );
    let order = app
        .store
        .order(fits.0, batch[2].order_id)
        .await
        .unwrap()
        .expect("the granted checkout has its order");
    let lines: Vec<(String, u32, i64)> = order
        .lines
        .iter()
        .map(|l| (l.sku.to_string(), l.quantity.get(), l.unit_price.amount()))
        .collect();
    assert_eq!(
        lines,
        vec![("a".to_owned(), 1, 100), ("b".to_owned(), 1, 250)]
    );
    app.audit().await.assert_clean();
}

async fn a_batch_that_cannot_commit_as_a_whole_answers_each_request_on_its_own(kind: StoreKind) {
    let app = grouped_app(kind, 0).await;
    app.new_product("hot", 100, 5).await;
    let now = Utc::now();
    let sale = app
        .store
        .create_flash_sale(
            &NewFlashSale {
                id: FlashSaleId::new(),
                sku: Sku::parse("hot").unwrap(),
                units: 5,
                max_per_buyer: 1,
                starts_at: now - Duration::minutes(1),
                ends_at: None,
                reservation_ttl: Duration::seconds(60),
            },
            now,
        )
        .await
        .expect("sale");
    let (ada, first_cart) = store_buyer(&app, "ada", &[("hot", 1)]).await;
    let second_cart = app.store.create_cart(ada, now).await.expect("cart").id;
    app.store
        .set_cart_line(
            ada,
            second_cart,
            &Sku::parse("hot").unwrap(),
            Quantity::new(1).unwrap(),
            now,
        )
        .await
        .expect("line");
    let bob = store_buyer(&app, "bob", &[("hot", 1)]).await;
    // One admission may hold one live checkout: the second row breaks the batch's insert.
    let batch = vec![
        request(ada, first_cart, Some(&sale)),
        request(ada, second_cart, Some(&sale)),
        request(bob.0, bob.1, None),
    ];

    let answers = app.store.reserve_checkouts(&batch).await;

    let admitted = answers[..2].iter().filter(|a| a.is_ok()).count();
    let in_use = answers[..2]
        .iter()
        .filter(|a| matches!(a, Err(StoreError::AdmissionInUse)))
        .count();
    assert_eq!((admitted, in_use), (1, 1), "{answers:?}");
    let bobs = answers[2].as_ref().expect("bob's checkout is unaffected");
    assert_eq!(bobs.id, batch[2].id);
    assert_eq!(app.stock_of("hot").await, (5, 2, 3));
    app.audit().await.assert_clean();
}

async fn two_hundred_grouped_buyers_race_for_the_last_unit_and_exactly_one_wins(kind: StoreKind) {
    let app = grouped_app(kind, 0).await;
    app.new_product("last-unit", 999, 1).await;
    let buyers = buyers(&app, 200, &[("last-unit", 1)]).await;

    let answers = race_checkouts(&app, buyers).await;

    assert_eq!(count(&answers, 201, None), 1, "exactly one winner");
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 199);
    for loser in answers.iter().filter(|r| r.status.as_u16() == 409) {
        assert_eq!(
            loser.body["error"]["details"],
            json!([{"sku": "last-unit", "requested": 1, "available": 0}])
        );
    }
    assert_eq!(app.stock_of("last-unit").await, (1, 1, 0));
    app.audit().await.assert_clean();
}

async fn two_thousand_grouped_buyers_for_a_hundred_units_get_exactly_a_hundred(kind: StoreKind) {
    let app = grouped_app(kind, 0).await;
    app.new_product("hot", 500, 100).await;
    let buyers = buyers(&app, 2000, &[("hot", 1)]).await;

    let answers = race_checkouts(&app, buyers).await;

    assert_eq!(count(&answers, 201, None), 100);
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 1900);
    assert_eq!(app.stock_of("hot").await, (100, 100, 0));
    // The checkouts really were grouped: batches (process-wide, so other tests only add to
    // both figures) carried more checkouts than there were batches.
    let (batches, grouped) = batch_figures(&app).await;
    assert!(
        grouped > batches,
        "{grouped} checkouts in {batches} batches"
    );
    app.audit().await.assert_clean();
}

/// `(batches, checkouts in them)` from the service's own metrics.
async fn batch_figures(app: &TestApp) -> (f64, f64) {
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let figure = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in the metrics"))
    };
    (
        figure("holdfast_reservation_batch_size_count"),
        figure("holdfast_reservation_batch_size_sum"),
    )
}

async fn grouped_carts_with_the_same_skus_in_opposite_orders_get_all_lines_or_none(
    kind: StoreKind,
) {
    let app = grouped_app(kind, 0).await;
    app.new_product("left", 100, 30).await;
    app.new_product("right", 100, 30).await;
    let mut all = buyers(&app, 40, &[("left", 1), ("right", 1)]).await;
    all.extend(buyers(&app, 40, &[("right", 1), ("left", 1)]).await);

    let answers = race_checkouts(&app, all).await;

    assert_eq!(count(&answers, 201, None), 30, "stock of 30 pairs");
    assert_eq!(count(&answers, 409, Some("insufficient_stock")), 50);
    for won in answers.iter().filter(|r| r.status.as_u16() == 201) {
        assert_eq!(won.body["total"]["amount"], 200, "both lines reserved");
    }
    assert_eq!(app.stock_of("left").await, (30, 30, 0));
    assert_eq!(app.stock_of("right").await, (30, 30, 0));
    app.audit().await.assert_clean();
}

async fn grouped_buyers_of_different_quantities_are_refused_only_when_short(kind: StoreKind) {
    let app = grouped_app(kind, 500).await;
    app.new_product("mix", 100, 20).await;
    let mut all: Vec<(u32, Customer, String)> = Vec::new();
    for quantity in [1u32, 3, 7] {
        for (customer, cart) in buyers(&app, 12, &[("mix", quantity)]).await {
            all.push((quantity, customer, cart));
        }
    }
    let quantities: Vec<u32> = all.iter().map(|(q, _, _)| *q).collect();
    let carts: Vec<(Customer, String)> = all
        .iter()
        .map(|(_, customer, cart)| (customer.clone(), cart.clone()))
        .collect();

    let answers = race_checkouts(&app, carts.clone()).await;

    assert_eq!(
        count(&answers, 201, None) + count(&answers, 409, Some("insufficient_stock")),
        answers.len(),
        "every answer is a reservation or a refusal for stock"
    );
    let granted: u32 = answers
        .iter()
        .zip(&quantities)
        .filter(|(r, _)| r.status.as_u16() == 201)
        .map(|(_, q)| *q)
        .sum();
    let (stock, reserved, available) = app.stock_of("mix").await;
    assert_eq!((stock, reserved), (20, i64::from(granted)));
    for ((answer, quantity), (customer, cart)) in answers.iter().zip(&quantities).zip(&carts) {
        if answer.status.as_u16() != 409 {
            continue;
        }
        let short = &answer.body["error"]["details"][0];
        assert_eq!(short["requested"], *quantity);
        assert!(short["available"].as_i64().unwrap() < i64::from(*quantity));
        // No undersell: units only ever went down during the race, so whatever is left at the
        // end was there when this buyer was refused.
        assert!(
            available < i64::from(*quantity),
            "a buyer of {quantity} was refused while {available} remain"
        );
        let cart = app
            .get(&format!("/v1/carts/{cart}"), Some(&customer.token))
            .await;
        assert_eq!(
            (
                cart.body["status"].as_str(),
                cart.body["lines"][0]["quantity"].as_u64()
            ),
            (Some("open"), Some(u64::from(*quantity))),
            "a refused cart is left as it was"
        );
    }
    app.audit().await.assert_clean();
}

async fn cart_errors_inside_a_batch_are_the_plain_paths_errors(kind: StoreKind) {
    // A linger long enough that requests sent together share a batch.
    let app = grouped_app(kind, 20_000).await;
    app.new_product("tea-01", 450, 5).await;
    let ada = app.new_customer("Ada").await;
    let empty = app.new_cart(&ada).await;
    let (bob, bobs_cart) = app.buyer_with("Bob", &[("tea-01", 1)]).await;
    let calls: Vec<(Customer, String)> = vec![
        (ada.clone(), empty),
        (ada.clone(), bobs_cart.clone()),
        (bob.clone(), bobs_cart.clone()),
        (bob.clone(), bobs_cart.clone()),
    ];
    let barrier = Arc::new(Barrier::new(calls.len()));
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|(customer, cart)| {
            let (base, client, barrier) = (app.base.clone(), app.client.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = client
                    .post(format!("{base}/v1/checkouts"))
                    .bearer_auth(&customer.token)
                    .json(&json!({ "cart_id": cart }))
                    .send()
                    .await
                    .expect("request");
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.json().await.expect("json body");
                Resp {
                    status,
                    headers,
                    body,
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }

    answers[0].assert_error(422, "cart_empty");
    answers[1].assert_error(404, "cart_not_found");
    let mut bobs: Vec<u16> = answers[2..].iter().map(|r| r.status.as_u16()).collect();
    bobs.sort_unstable();
    assert_eq!(bobs, vec![201, 409], "bob's cart checks out once");
    let again = answers[2..]
        .iter()
        .find(|r| r.status.as_u16() == 409)
        .expect("the second of bob's checkouts");
    again.assert_error(409, "cart_not_open");
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4));
    app.audit().await.assert_clean();
}

async fn flash_sale_checkouts_are_reserved_under_grouping(kind: StoreKind) {
    let app = grouped_app(kind, 0).await;
    app.new_product("drop", 1500, 10).await;
    let sale = app
        .admin_post("/v1/admin/flash-sales", json!({"sku": "drop", "units": 10}))
        .await;
    sale.assert_status(201);
    let sale = sale.str("id");
    let all = buyers(&app, 15, &[("drop", 1)]).await;
    let mut holders = Vec::new();
    for (customer, cart) in all {
        let token = app
            .request(
                reqwest::Method::POST,
                &format!("/v1/flash-sales/{sale}/tokens"),
                Some(&customer.token),
                None,
            )
            .await;
        match token.status.as_u16() {
            201 => holders.push((customer, cart, token.str("token"))),
            _ => token.assert_error(409, "sold_out"),
        }
    }
    assert_eq!(holders.len(), 10, "one admission per unit");
    let barrier = Arc::new(Barrier::new(holders.len()));
    let tasks: Vec<_> = holders
        .into_iter()
        .map(|(customer, cart, token)| {
            let (base, client, barrier) = (app.base.clone(), app.client.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = client
                    .post(format!("{base}/v1/checkouts"))
                    .bearer_auth(&customer.token)
                    .json(&json!({ "cart_id": cart, "flash_sale_token": token }))
                    .send()
                    .await
                    .expect("request");
                (
                    resp.status().as_u16(),
                    resp.text().await.unwrap_or_default(),
                )
            })
        })
        .collect();
    for task in tasks {
        let (status, body) = task.await.expect("task");
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(app.stock_of("drop").await, (10, 10, 0));
    let sales: Vec<String> = crate::helpers::fetch_strings(
        &app,
        "SELECT CAST(COUNT(flash_sale_id) AS TEXT) || '/' || \
         CAST(COUNT(DISTINCT flash_sale_id) AS TEXT) FROM checkouts",
    )
    .await;
    assert_eq!(sales, vec!["10/1"], "every checkout carries the sale");
    app.audit().await.assert_clean();
}
