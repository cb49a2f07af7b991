//! Who may do what (DESIGN §7): a customer reaches only their own carts, checkouts, orders and
//! admissions, and another customer's id answers exactly like one that does not exist (no
//! existence leak); admin routes need the admin token; no token or a malformed one is `401`.
//! Nothing any of these requests tries changes anything.

use holdfast::store::StoreKind;
use reqwest::header::HeaderValue;
use reqwest::Method;
use serde_json::{json, Value};

use crate::both_stores;
use crate::helpers::{
    fetch_strings, spawn_app, spawn_app_with, Customer, Options, Resp, TestApp, ADMIN_TOKEN,
};

both_stores!(
    another_customers_ids_answer_like_ids_that_do_not_exist_and_change_nothing,
    admin_routes_refuse_customers_and_anonymous_callers,
    customer_routes_refuse_missing_and_malformed_credentials,
    a_known_customer_token_costs_no_store_call_and_an_unknown_one_is_asked_every_time,
);

/// Everything the victim can see of their own things, for "nothing changed" assertions.
async fn victims_view(app: &TestApp, ada: &Customer, ids: &Ids) -> Vec<Value> {
    let mut seen = vec![app.inventory_snapshot().await];
    for path in [
        format!("/v1/carts/{}", ids.cart),
        format!("/v1/checkouts/{}", ids.checkout),
        format!("/v1/orders/{}", ids.order),
        "/v1/orders".to_owned(),
    ] {
        let resp = app.get(&path, Some(&ada.token)).await;
        resp.assert_status(200);
        seen.push(resp.body);
    }
    seen
}

struct Ids {
    cart: String,
    checkout: String,
    order: String,
    admission: String,
}

/// A customer's request with a body, on `path` with `id` filled in.
async fn send(app: &TestApp, who: &Customer, route: &Route, id: &str, key: &str) -> Resp {
    let path = route.path.replace("{id}", id);
    let mut body = route.body.clone();
    // Ids that travel in the body are swapped the same way.
    if let Some(object) = body.as_object_mut() {
        for value in object.values_mut() {
            if value == "{id}" {
                *value = json!(id);
            }
        }
    }
    let mut req = app
        .client
        .request(route.method.clone(), format!("{}{path}", app.base))
        .bearer_auth(&who.token)
        .header("idempotency-key", key);
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("the app answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.expect("a JSON body");
    Resp {
        status,
        headers,
        body,
    }
}

struct Route {
    method: Method,
    path: &'static str,
    body: Value,
    /// Which of the victim's ids goes where `{id}` stands.
    id: Which,
}

impl Route {
    /// What someone else's id, or nobody's, must answer: not found, except that another
    /// buyer's admission token is simply no admission.
    fn refusal(&self) -> u16 {
        match self.id {
            Which::Admission => 403,
            _ => 404,
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Cart,
    Checkout,
    Order,
    Admission,
}

impl Which {
    fn of(self, ids: &Ids) -> String {
        match self {
            Which::Cart => ids.cart.clone(),
            Which::Checkout => ids.checkout.clone(),
            Which::Order => ids.order.clone(),
            Which::Admission => ids.admission.clone(),
        }
    }

    /// An id of the same kind that belongs to nobody.
    fn unknown(self) -> String {
        match self {
            Which::Admission => "fst_0123456789abcdef0123456789abcdef".to_owned(),
            _ => uuid::Uuid::new_v4().to_string(),
        }
    }
}

fn customer_routes(mallorys_cart: &str) -> Vec<Route> {
    vec![
        Route {
            method: Method::GET,
            path: "/v1/carts/{id}",
            body: Value::Null,
            id: Which::Cart,
        },
        Route {
            method: Method::PUT,
            path: "/v1/carts/{id}/lines/tea-01",
            body: json!({"quantity": 3}),
            id: Which::Cart,
        },
        Route {
            method: Method::DELETE,
            path: "/v1/carts/{id}/lines/tea-01",
            body: Value::Null,
            id: Which::Cart,
        },
        Route {
            method: Method::POST,
            path: "/v1/checkouts",
            body: json!({"cart_id": "{id}"}),
            id: Which::Cart,
        },
        Route {
            method: Method::GET,
            path: "/v1/checkouts/{id}",
            body: Value::Null,
            id: Which::Checkout,
        },
        Route {
            method: Method::POST,
            path: "/v1/checkouts/{id}/heartbeat",
            body: Value::Null,
            id: Which::Checkout,
        },
        Route {
            method: Method::POST,
            path: "/v1/checkouts/{id}/cancel",
            body: Value::Null,
            id: Which::Checkout,
        },
        Route {
            method: Method::POST,
            path: "/v1/checkouts/{id}/complete",
            body: json!({"payment_method": "pm_card_visa"}),
            id: Which::Checkout,
        },
        Route {
            method: Method::GET,
            path: "/v1/orders/{id}",
            body: Value::Null,
            id: Which::Order,
        },
        // Another buyer's flash-sale admission, presented with one's own cart.
        Route {
            method: Method::POST,
            path: "/v1/checkouts",
            body: json!({"cart_id": mallorys_cart, "flash_sale_token": "{id}"}),
            id: Which::Admission,
        },
    ]
}

async fn another_customers_ids_answer_like_ids_that_do_not_exist_and_change_nothing(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    app.new_product("hot-01", 900, 5).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 5}),
        )
        .await;
    sale.assert_status(201);
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let (_, checkout, order) = {
        let other = app.new_cart(&ada).await;
        app.set_line(&ada, &other, "tea-01", 1)
            .await
            .assert_status(200);
        let started = app.start_checkout(&ada, &other).await;
        started.assert_status(201);
        (other, started.str("id"), started.str("order_id"))
    };
    let admission = app
        .request(
            Method::POST,
            &format!("/v1/flash-sales/{}/tokens", sale.str("id")),
            Some(&ada.token),
            None,
        )
        .await;
    admission.assert_status(201);
    let ids = Ids {
        cart,
        checkout,
        order,
        admission: admission.str("token"),
    };
    let (mallory, mallorys_cart) = app.buyer_with("Mallory", &[("hot-01", 1)]).await;
    let before = victims_view(&app, &ada, &ids).await;

    for (i, route) in customer_routes(&mallorys_cart).iter().enumerate() {
        let victims = route.id.of(&ids);
        let unknown = route.id.unknown();
        let what = format!("{} {}", route.method, route.path);

        let theirs = send(&app, &mallory, route, &victims, &format!("k-{i}-a")).await;
        let nobodys = send(&app, &mallory, route, &unknown, &format!("k-{i}-b")).await;

        assert_eq!(
            theirs.status.as_u16(),
            route.refusal(),
            "{what}: {:?}",
            theirs.body
        );
        assert_eq!(
            (theirs.status, &theirs.body),
            (nobodys.status, &nobodys.body),
            "{what}: another customer's id must answer like an unknown one"
        );
    }
    let list = app.get("/v1/orders", Some(&mallory.token)).await;
    assert_eq!(list.body["data"], json!([]), "Mallory sees no orders");

    assert_eq!(victims_view(&app, &ada, &ids).await, before);
}

/// Every admin route, with a body it would accept.
fn admin_routes(order: &str, sale: &str) -> Vec<(Method, String, Value)> {
    let product = json!({"sku": "new-01", "name": "New", "price": {"amount": 1, "currency": "EUR"},
                         "stock": 1});
    vec![
        (
            Method::POST,
            "/v1/admin/customers".into(),
            json!({"name": "Eve"}),
        ),
        (Method::POST, "/v1/admin/products".into(), product),
        (Method::GET, "/v1/admin/products/tea-01".into(), Value::Null),
        (
            Method::PATCH,
            "/v1/admin/products/tea-01".into(),
            json!({"stock": 0}),
        ),
        (Method::GET, "/v1/admin/inventory".into(), Value::Null),
        (Method::GET, "/v1/admin/ops".into(), Value::Null),
        (
            Method::POST,
            format!("/v1/admin/orders/{order}/refund"),
            Value::Null,
        ),
        (
            Method::POST,
            format!("/v1/admin/orders/{order}/shipments"),
            Value::Null,
        ),
        (
            Method::POST,
            "/v1/admin/flash-sales".into(),
            json!({"sku": "tea-01", "units": 1}),
        ),
        (
            Method::GET,
            format!("/v1/admin/flash-sales/{sale}"),
            Value::Null,
        ),
    ]
}

/// Values of `Authorization` that carry no usable credential.
fn malformed_credentials() -> Vec<HeaderValue> {
    let mut values: Vec<HeaderValue> = [
        "Basic YWRtaW46cGFzc3dvcmQ=",
        "Bearer",
        "Bearer ",
        "Token abc",
        "bearer-abc",
        "Bearer \"quoted\"",
    ]
    .into_iter()
    .map(HeaderValue::from_static)
    .collect();
    values.push(HeaderValue::from_str(&format!("Bearer {}", "a".repeat(600))).unwrap());
    values.push(HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap());
    values
}

async fn call(
    app: &TestApp,
    method: &Method,
    path: &str,
    auth: Option<HeaderValue>,
    body: &Value,
) -> (u16, Value) {
    let mut req = app
        .client
        .request(method.clone(), format!("{}{path}", app.base))
        .header("if-match", "\"1\"")
        .header("idempotency-key", "authz");
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    if !body.is_null() {
        req = req.json(body);
    }
    let resp = req.send().await.expect("the app answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

async fn admin_routes_refuse_customers_and_anonymous_callers(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    app.new_product("hot-01", 900, 5).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 2}),
        )
        .await;
    sale.assert_status(201);
    let (ada, _, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let customer = HeaderValue::from_str(&format!("Bearer {}", ada.token)).unwrap();
    let before = app.inventory_snapshot().await;

    for (method, path, body) in admin_routes(&order, &sale.str("id")) {
        let (status, answer) = call(&app, &method, &path, Some(customer.clone()), &body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path} with a customer's token"
        );
        let (status, answer) = call(&app, &method, &path, None, &body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path} without a token"
        );
        for auth in malformed_credentials() {
            let (status, answer) = call(&app, &method, &path, Some(auth.clone()), &body).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {auth:?}"
            );
        }
    }

    assert_eq!(app.inventory_snapshot().await, before);
    let names = fetch_strings(&app, "SELECT name FROM customers").await;
    assert_eq!(names, vec!["Ada".to_owned()], "no customer was created");
    let sales = fetch_strings(&app, "SELECT CAST(COUNT(*) AS TEXT) FROM flash_sales").await;
    assert_eq!(sales, vec!["1".to_owned()], "no sale was opened");
    let order = app
        .get(&format!("/v1/orders/{order}"), Some(&ada.token))
        .await;
    assert_eq!(order.body["status"], "pending_payment");
}

async fn customer_routes_refuse_missing_and_malformed_credentials(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 10).await;
    app.new_product("hot-01", 900, 5).await;
    let (ada, cart) = app.buyer_with("Ada", &[("tea-01", 2)]).await;
    let (_, checkout, order) = app.reserved_checkout("Bea", &[("tea-01", 1)]).await;
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "hot-01", "units": 2}),
        )
        .await;
    let sale = sale.str("id");
    let ids = Ids {
        cart: cart.clone(),
        checkout,
        order,
        admission: String::new(),
    };
    let mut routes: Vec<(Method, String, Value)> = customer_routes(&cart)
        .into_iter()
        .map(|r| {
            let id = r.id.of(&ids);
            let body = if r.body.is_null() {
                r.body
            } else {
                serde_json::from_str(&r.body.to_string().replace("{id}", &id)).unwrap()
            };
            (r.method, r.path.replace("{id}", &id), body)
        })
        .collect();
    routes.push((Method::POST, "/v1/carts".into(), Value::Null));
    routes.push((Method::GET, "/v1/orders".into(), Value::Null));
    routes.push((
        Method::POST,
        format!("/v1/flash-sales/{sale}/tokens"),
        Value::Null,
    ));
    let before = app.inventory_snapshot().await;
    let admin = HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}")).unwrap();

    for (method, path, body) in &routes {
        let mut credentials = malformed_credentials();
        credentials.push(admin.clone());
        let (status, answer) = call(&app, method, path, None, body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path} without a token"
        );
        for auth in credentials {
            let (status, answer) = call(&app, method, path, Some(auth.clone()), body).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {auth:?}"
            );
        }
    }

    assert_eq!(app.inventory_snapshot().await, before);
    let cart = app
        .get(&format!("/v1/carts/{cart}"), Some(&ada.token))
        .await;
    assert_eq!(
        cart.body["lines"],
        json!([{"sku": "tea-01", "quantity": 2}])
    );
}

/// Tokens are never changed or revoked, so a customer found once by their token's digest is
/// remembered by each instance; a token nobody holds is not remembered (it is asked again, and
/// refused again), so the memory only ever holds real customers.
async fn a_known_customer_token_costs_no_store_call_and_an_unknown_one_is_asked_every_time(
    kind: StoreKind,
) {
    // Arrange: a route that answers from the path alone once the caller is known.
    let app = spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await;
    let ada = app.new_customer("Ada").await;
    let path = "/v1/carts/not-a-uuid";
    let first = app.store.acquisitions();
    app.get(path, Some(&ada.token))
        .await
        .assert_error(404, "cart_not_found");
    let known = app.store.acquisitions();

    // Act
    for _ in 0..10 {
        app.get(path, Some(&ada.token))
            .await
            .assert_error(404, "cart_not_found");
    }
    let after_known = app.store.acquisitions();
    let stranger = format!("hfc_{}", "x".repeat(43));
    for _ in 0..3 {
        app.get(path, Some(&stranger))
            .await
            .assert_error(401, "unauthorized");
    }

    // Assert
    assert_eq!(known - first, 1, "the first request looks the token up");
    assert_eq!(after_known, known, "a known token takes no connection");
    assert_eq!(
        app.store.acquisitions() - after_known,
        3,
        "an unknown token is looked up each time"
    );
}
