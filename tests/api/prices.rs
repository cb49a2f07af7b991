//! Prices come from the catalogue, never from the client (promise 6): a price, total or amount
//! slipped into a cart, checkout or payment body is refused with `422 validation_failed` and
//! changes nothing, and what is charged is the catalogue's figure.

use holdfast::domain::CheckoutId;
use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::{json, Value};

use crate::both_stores;
use crate::helpers::{fetch_strings, spawn_app, Customer, TestApp};

both_stores!(client_supplied_prices_totals_and_amounts_are_refused_and_change_nothing);

async fn send(
    app: &TestApp,
    ada: &Customer,
    method: Method,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let resp = app
        .client
        .request(method, format!("{}{path}", app.base))
        .bearer_auth(&ada.token)
        .header("idempotency-key", uuid::Uuid::new_v4().to_string())
        .json(body)
        .send()
        .await
        .expect("the app answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

/// What a forged price could have moved: stock, the open cart, the reserved checkout, the
/// number of carts, the charges.
async fn snapshot(app: &TestApp, ada: &Customer, cart: &str, checkout: &str) -> Vec<Value> {
    let ledger = app.simulator.as_ref().expect("the simulator").ledger();
    vec![
        app.inventory_snapshot().await,
        app.get(&format!("/v1/carts/{cart}"), Some(&ada.token))
            .await
            .body,
        app.get(&format!("/v1/checkouts/{checkout}"), Some(&ada.token))
            .await
            .body,
        json!(fetch_strings(app, "SELECT CAST(COUNT(*) AS TEXT) FROM carts").await),
        json!(ledger.succeeded_for(CheckoutId::parse(checkout).unwrap())),
    ]
}

async fn client_supplied_prices_totals_and_amounts_are_refused_and_change_nothing(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let checkout = {
        let other = app.new_cart(&ada).await;
        app.set_line(&ada, &other, "tea-01", 1)
            .await
            .assert_status(200);
        let started = app.start_checkout(&ada, &other).await;
        started.assert_status(201);
        started.str("id")
    };
    let before = snapshot(&app, &ada, &cart, &checkout).await;
    let cheap = json!({"amount": 1, "currency": "EUR"});
    let line = format!("/v1/carts/{cart}/lines/tea-01");
    let complete = format!("/v1/checkouts/{checkout}/complete");
    let visa = "pm_card_visa";
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": 1, "price": cheap}),
            "line price",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": 1, "unit_price": cheap}),
            "line unit price",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": 1, "line_total": cheap}),
            "line total",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": 1, "amount": 1}),
            "line amount",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": cheap}),
            "quantity as money",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": 1.5}),
            "fractional quantity",
        ),
        (
            Method::PUT,
            line.clone(),
            json!({"quantity": "1"}),
            "quantity as text",
        ),
        (
            Method::POST,
            "/v1/carts".into(),
            json!({"lines": [{"sku": "tea-01", "quantity": 1, "price": cheap}]}),
            "new cart with priced lines",
        ),
        (
            Method::POST,
            "/v1/carts".into(),
            json!({"total": cheap}),
            "new cart with a total",
        ),
        (
            Method::POST,
            "/v1/checkouts".into(),
            json!({"cart_id": cart, "total": cheap}),
            "checkout total",
        ),
        (
            Method::POST,
            "/v1/checkouts".into(),
            json!({"cart_id": cart, "amount": 1}),
            "checkout amount",
        ),
        (
            Method::POST,
            "/v1/checkouts".into(),
            json!({"cart_id": cart, "price": cheap}),
            "checkout price",
        ),
        (
            Method::POST,
            "/v1/checkouts".into(),
            json!({"cart_id": cart, "currency": "USD"}),
            "checkout currency",
        ),
        (
            Method::POST,
            "/v1/checkouts".into(),
            json!({"cart_id": cart, "lines": [{"sku": "tea-01", "quantity": 2, "unit_price": cheap}]}),
            "checkout lines",
        ),
        (
            Method::POST,
            complete.clone(),
            json!({"payment_method": visa, "amount": 1}),
            "payment amount",
        ),
        (
            Method::POST,
            complete.clone(),
            json!({"payment_method": visa, "total": cheap}),
            "payment total",
        ),
        (
            Method::POST,
            complete.clone(),
            json!({"payment_method": visa, "currency": "usd"}),
            "payment currency",
        ),
        (
            Method::POST,
            complete.clone(),
            json!({"payment_method": visa, "amount_received": 450}),
            "payment amount received",
        ),
        (
            Method::POST,
            format!("/v1/checkouts/{checkout}/heartbeat"),
            json!({"total": cheap}),
            "heartbeat total",
        ),
        (
            Method::POST,
            format!("/v1/checkouts/{checkout}/cancel"),
            json!({"amount": 0}),
            "cancel amount",
        ),
    ];

    for (method, path, body, what) in cases {
        let (status, answer) = send(&app, &ada, method, &path, &body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("validation_failed")),
            "{what}: {answer}"
        );
    }

    assert_eq!(snapshot(&app, &ada, &cart, &checkout).await, before);
    // The honest payment is charged the catalogue's price.
    let paid = app.complete(&ada, &checkout, visa, "honest").await;
    assert_eq!(paid.body["state"], "completed");
    assert_eq!(
        paid.body["total"],
        json!({"amount": 450, "currency": "EUR"})
    );
}
