//! Fuzzing the JSON edge in process (promise 7): a few hundred generated bodies per route —
//! random bytes, random JSON, and valid bodies with a field swapped, added, dropped, cut short
//! or bit-flipped — go through the real router on SQLite. None may answer 5xx, every error is
//! the contract's body, and the promises still hold afterwards.
//!
//! The seed is printed with any failure; `HOLDFAST_FUZZ_SEED` replays it.

use axum::body::Body;
use axum::http::Request;
use holdfast::payments::signature;
use holdfast::store::StoreKind;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Map, Value};
use tower::ServiceExt as _;

use crate::helpers::{spawn_app, AssertClean, ADMIN_TOKEN, WEBHOOK_SECRET};

const BODIES_PER_ROUTE: usize = 200;

fn seed() -> u64 {
    std::env::var("HOLDFAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

/// Values chosen to hit edges: limits of integers, floats where integers belong, empty and
/// huge strings, control characters, nesting.
fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let pick = rng.gen_range(0..if depth == 0 { 8 } else { 10 });
    match pick {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!([0i64, -1, 1, 10_000, 10_001, i64::MAX, i64::MIN][rng.gen_range(0..7)]),
        3 => json!(rng.gen::<i64>()),
        4 => json!([0.5f64, -0.0, 1e308, 1.0, f64::MIN_POSITIVE][rng.gen_range(0..5)]),
        5 => json!(u64::MAX),
        6 => json!(
            [
                "",
                "EUR",
                "tea-01",
                "pm_card_visa",
                "../../etc/passwd",
                "\u{0}\u{1}\n",
                "é😀",
                "00000000-0000-0000-0000-000000000000",
            ][rng.gen_range(0..8)]
        ),
        7 => json!("x".repeat(rng.gen_range(0..5000))),
        8 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.gen_range(0..4) {
                let key = ["amount", "currency", "quantity", "sku", "id", "x"][rng.gen_range(0..6)];
                map.insert(key.to_owned(), random_json(rng, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// A body derived from a valid `template`.
fn random_body(rng: &mut StdRng, template: &Value) -> Vec<u8> {
    let valid = template.to_string().into_bytes();
    match rng.gen_range(0..10) {
        0 => (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
        1 => random_json(rng, 3).to_string().into_bytes(),
        2 => valid[..rng.gen_range(0..=valid.len())].to_vec(),
        3..=5 => {
            let mut body = template.clone();
            if let Some(map) = body.as_object_mut() {
                let keys: Vec<String> = map.keys().cloned().collect();
                if !keys.is_empty() {
                    let key = &keys[rng.gen_range(0..keys.len())];
                    map.insert(key.clone(), random_json(rng, 2));
                }
            }
            body.to_string().into_bytes()
        }
        6 => {
            let mut body = template.clone();
            if let Some(map) = body.as_object_mut() {
                let key =
                    ["price", "total", "amount", "admin", "reserved", ""][rng.gen_range(0..6)];
                map.insert(key.to_owned(), random_json(rng, 1));
            }
            body.to_string().into_bytes()
        }
        7 => {
            let mut body = template.clone();
            if let Some(map) = body.as_object_mut() {
                let keys: Vec<String> = map.keys().cloned().collect();
                if !keys.is_empty() {
                    map.remove(&keys[rng.gen_range(0..keys.len())]);
                }
            }
            body.to_string().into_bytes()
        }
        8 => {
            let mut bytes = valid;
            for _ in 0..rng.gen_range(1..4) {
                if !bytes.is_empty() {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.gen_range(0..8);
                }
            }
            bytes
        }
        _ => valid,
    }
}

fn content_type(rng: &mut StdRng) -> Option<&'static str> {
    match rng.gen_range(0..20) {
        0 => None,
        1 => Some("text/plain"),
        2 => Some("application/json; charset=utf-8"),
        3 => Some("application/merge-patch+json"),
        _ => Some("application/json"),
    }
}

struct Route {
    method: &'static str,
    path: String,
    token: Option<String>,
    template: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bodies_on_every_json_route_never_answer_5xx() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let app = spawn_app(StoreKind::Sqlite).await;
    app.new_product("tea-01", 450, 1_000).await;
    app.new_product("hot-01", 900, 10).await;
    // Sales the fuzzer opens go on a product of their own, so carts of tea-01 stay open to it.
    app.new_product("cup-01", 300, 1_000).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 10}),
        )
        .await;
    let sale = sale.str("id");
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let cart = app.new_cart(&ada).await;
    let admin = Some(ADMIN_TOKEN.to_owned());
    let customer = Some(ada.token.clone());
    let route = |method, path: String, token: &Option<String>, template| Route {
        method,
        path,
        token: token.clone(),
        template,
    };
    let event = crate::webhooks::event(
        "evt_fuzz",
        "payment_intent.succeeded",
        "pi_fuzz",
        Some(&checkout),
    );
    let routes = vec![
        route(
            "POST",
            "/v1/admin/customers".into(),
            &admin,
            json!({"name": "Fuzz"}),
        ),
        route(
            "POST",
            "/v1/admin/products".into(),
            &admin,
            json!({"sku": "fz-1", "name": "n", "price": {"amount": 100, "currency": "EUR"},
                   "stock": 5}),
        ),
        route(
            "PATCH",
            "/v1/admin/products/tea-01".into(),
            &admin,
            json!({"stock": 900, "price": {"amount": 450, "currency": "EUR"}}),
        ),
        route(
            "POST",
            "/v1/admin/flash-sales".into(),
            &admin,
            json!({"sku": "cup-01", "units": 1, "reservation_ttl_seconds": 60}),
        ),
        route(
            "POST",
            format!("/v1/admin/orders/{order}/refund"),
            &admin,
            json!({}),
        ),
        route(
            "POST",
            format!("/v1/admin/orders/{order}/shipments"),
            &admin,
            json!({}),
        ),
        route("POST", "/v1/carts".into(), &customer, json!({})),
        route(
            "PUT",
            format!("/v1/carts/{cart}/lines/tea-01"),
            &customer,
            json!({"quantity": 1}),
        ),
        route(
            "POST",
            "/v1/checkouts".into(),
            &customer,
            json!({"cart_id": cart}),
        ),
        route(
            "POST",
            format!("/v1/checkouts/{checkout}/heartbeat"),
            &customer,
            json!({}),
        ),
        route(
            "POST",
            format!("/v1/checkouts/{checkout}/complete"),
            &customer,
            json!({"payment_method": "pm_card_visa"}),
        ),
        route(
            "POST",
            format!("/v1/flash-sales/{sale}/tokens"),
            &customer,
            json!({}),
        ),
        route(
            "POST",
            format!("/v1/checkouts/{checkout}/cancel"),
            &customer,
            json!({}),
        ),
        route(
            "POST",
            "/webhooks/stripe".into(),
            &None,
            serde_json::from_str(&event).unwrap(),
        ),
    ];

    for route in &routes {
        for i in 0..BODIES_PER_ROUTE {
            let body = random_body(&mut rng, &route.template);
            let mut request = Request::builder()
                .method(route.method)
                .uri(&route.path)
                .header("if-match", "\"1\"")
                .header("idempotency-key", format!("fuzz-{}", rng.gen::<u32>()));
            if let Some(ct) = content_type(&mut rng) {
                request = request.header("content-type", ct);
            }
            if let Some(token) = &route.token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            if route.path == "/webhooks/stripe" {
                let now = chrono::Utc::now().timestamp();
                request = request.header(
                    "stripe-signature",
                    signature::sign(&body, WEBHOOK_SECRET, now),
                );
            }
            let request = request
                .body(Body::from(body.clone()))
                .expect("a well-formed request");

            let response = app
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("the router never fails");

            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("a body");
            let what = format!(
                "seed {seed}, {} {} body #{i}: {:?}",
                route.method,
                route.path,
                String::from_utf8_lossy(&body)
            );
            assert!(
                !status.is_server_error(),
                "{what} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            if status.is_client_error() {
                let answer: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| panic!("{what}: the error body is not JSON"));
                assert!(answer["error"]["code"].is_string(), "{what}: {answer}");
            }
        }
    }

    app.audit().await.assert_clean();
}
