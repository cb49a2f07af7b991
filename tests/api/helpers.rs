//! `spawn_app(StoreKind)`: the real application on 127.0.0.1:0 with a fresh database
//! (PostgreSQL: a uuid-named `CREATE DATABASE`; SQLite: a temp dir), plus typed helpers so a
//! test reads as its scenario. `TEST_LOG=1` shows the service's logs.

use std::sync::{Arc, Once};

use chrono::{TimeZone, Utc};
use clap::Parser as _;
use holdfast::audit::Report;
use holdfast::checkout::SagaSettings;
use holdfast::config::{Cli, Settings};
use holdfast::domain::{Clock, ManualClock, SystemClock};
use holdfast::outbox::{NatsConsumers, Relay};
use holdfast::payments::StripeSimulator;
use holdfast::startup::{Application, Overrides};
use holdfast::store::{Store, StoreKind};
use holdfast::workers::{ExpiryWorker, RecoveryWorker};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const WEBHOOK_SECRET: &str = "whsec_test_0123456789abcdef";

/// The server every PostgreSQL test database is created on.
pub fn postgres_base_url() -> String {
    std::env::var("HOLDFAST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".to_owned())
}

/// Creates an empty database with a unique name and returns its URL. Fails (never skips) when
/// PostgreSQL cannot be reached.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection as _;
    let base = postgres_base_url();
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/test"))
        .await
        .expect("PostgreSQL must be reachable for the test suite (see README)");
    let name = format!("hf_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    format!("{base}/{name}")
}

/// The NATS server with JetStream the suite publishes to.
pub fn nats_url() -> String {
    std::env::var("HOLDFAST_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            holdfast::telemetry::init(holdfast::config::LogFormat::Text);
        }
    });
}

#[derive(Clone)]
pub struct Options {
    pub ttl_seconds: u64,
    pub max_lifetime_seconds: u64,
    /// A clock that moves only when the test says so (workers are then off: tests tick them).
    pub manual_clock: bool,
    pub workers: bool,
    pub expiry_interval_ms: u64,
    /// Relay events to NATS on a stream and subject prefix of this test's own.
    pub nats: bool,
    /// The flash-sale gate on this Redis (with a key prefix of the test's own); `None` = in
    /// process.
    pub redis: Option<String>,
    /// `(api base, secret key)` of a Stripe-compatible server; `None` = the simulator.
    pub stripe: Option<(String, String)>,
    /// Saga pacing; tests default to short retries.
    pub saga: SagaSettings,
    pub lease_seconds: u64,
    /// Per-customer rate limit; `0` (the tests' default) switches it off, so races of thousands
    /// of requests are not throttled.
    pub rate_limit_per_second: u32,
    pub request_timeout_seconds: u64,
    /// Group reservation (`--group-reservations`) with this linger in microseconds; `None` =
    /// the plain path.
    pub group_linger_us: Option<u64>,
    /// `--stripe-webhook-secret` as given (several comma-separated while rotating); `None` =
    /// [`WEBHOOK_SECRET`].
    pub webhook_secrets: Option<String>,
    /// `--capture-method manual` when true.
    pub manual_capture: bool,
}

/// Short retries so unknown outcomes resolve within a test's patience.
pub fn quick_saga() -> SagaSettings {
    SagaSettings {
        lease: chrono::Duration::seconds(5),
        retry_delays: vec![
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(50),
        ],
        retry_later: chrono::Duration::milliseconds(200),
        reconcile_after: chrono::Duration::milliseconds(300),
        fault: None,
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ttl_seconds: 180,
            max_lifetime_seconds: 1800,
            manual_clock: false,
            workers: true,
            expiry_interval_ms: 100,
            stripe: None,
            saga: quick_saga(),
            lease_seconds: 5,
            nats: false,
            redis: None,
            rate_limit_per_second: 0,
            request_timeout_seconds: 30,
            group_linger_us: None,
            webhook_secrets: None,
            manual_capture: false,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub kind: StoreKind,
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub manual_clock: Option<Arc<ManualClock>>,
    pub expiry: Arc<ExpiryWorker>,
    pub recovery: Arc<RecoveryWorker>,
    pub simulator: Option<StripeSimulator>,
    pub gateway: Arc<dyn holdfast::payments::PaymentGateway>,
    pub relay: Arc<Relay>,
    pub nats_consumers: Option<Arc<NatsConsumers>>,
    pub database_url: Option<String>,
    /// The router with its layers and state, for requests driven in process.
    pub router: axum::Router,
    saga: SagaSettings,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: Arc<TempDir>,
}

pub async fn spawn_app(kind: StoreKind) -> TestApp {
    spawn_app_with(kind, Options::default()).await
}

pub async fn spawn_app_with(kind: StoreKind, options: Options) -> TestApp {
    init_logs();
    let dir = Arc::new(TempDir::new().expect("temp dir"));
    let database_url = match kind {
        StoreKind::Postgres => Some(fresh_postgres_database().await),
        StoreKind::Sqlite => None,
    };
    let mut args = vec![
        "holdfast".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
        "--reservation-ttl-seconds".into(),
        options.ttl_seconds.to_string(),
        "--reservation-max-lifetime-seconds".into(),
        options.max_lifetime_seconds.to_string(),
        "--expiry-interval-ms".into(),
        options.expiry_interval_ms.to_string(),
        "--database-max-connections".into(),
        "8".into(),
        "--relay-interval-ms".into(),
        "50".into(),
        "--rate-limit-per-second".into(),
        options.rate_limit_per_second.to_string(),
        "--request-timeout-seconds".into(),
        options.request_timeout_seconds.to_string(),
    ];
    if options.manual_capture {
        args.extend(["--capture-method".to_owned(), "manual".to_owned()]);
    }
    if options.nats {
        let name = format!("hf_test_{}", uuid::Uuid::new_v4().simple());
        args.extend(["--nats-url".to_owned(), nats_url()]);
        args.extend(["--nats-stream".to_owned(), name.clone()]);
        args.extend(["--nats-subject-prefix".to_owned(), name]);
    }
    if let Some(url) = &database_url {
        args.extend(["--database-url".to_owned(), url.clone()]);
    }
    match options.group_linger_us {
        Some(linger) => args.extend([
            "--group-reservations".to_owned(),
            "--group-linger-us".to_owned(),
            linger.to_string(),
        ]),
        None => args.push("--group-reservations=false".to_owned()),
    }
    if let Some((base, key)) = &options.stripe {
        args.extend([
            "--stripe-api-base".to_owned(),
            base.clone(),
            "--stripe-secret-key".to_owned(),
            key.clone(),
        ]);
    }
    if let Some(url) = &options.redis {
        args.extend([
            "--redis-url".to_owned(),
            url.clone(),
            "--redis-key-prefix".to_owned(),
            format!("test:{}:", uuid::Uuid::new_v4().simple()),
        ]);
    }
    args.extend([
        "--stripe-webhook-secret".to_owned(),
        options
            .webhook_secrets
            .clone()
            .unwrap_or_else(|| WEBHOOK_SECRET.to_owned()),
        "--recovery-interval-ms".to_owned(),
        "100".to_owned(),
        "--lease-seconds".to_owned(),
        options.lease_seconds.to_string(),
    ]);
    let cli = Cli::try_parse_from(args).expect("test flags parse");
    let settings = Settings::from_flags(&cli.flags).expect("test settings are valid");
    let manual_clock = options.manual_clock.then(|| {
        Arc::new(ManualClock::new(
            Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap(),
        ))
    });
    let clock: Arc<dyn Clock> = match &manual_clock {
        Some(c) => c.clone(),
        None => Arc::new(SystemClock),
    };
    let workers = options.workers && !options.manual_clock;
    start(
        kind,
        settings,
        clock,
        manual_clock,
        workers,
        database_url,
        dir,
        options.saga,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn start(
    kind: StoreKind,
    settings: Settings,
    clock: Arc<dyn Clock>,
    manual_clock: Option<Arc<ManualClock>>,
    workers: bool,
    database_url: Option<String>,
    dir: Arc<TempDir>,
    saga: SagaSettings,
) -> TestApp {
    let app = Application::build_with(
        settings.clone(),
        Overrides {
            clock: clock.clone(),
            workers,
            saga: Some(saga.clone()),
        },
    )
    .await
    .expect("the application starts");
    let base = format!("http://{}", app.local_addr());
    let store = app.store();
    let expiry = app.expiry_worker();
    let recovery = app.recovery_worker();
    let simulator = app.simulator();
    let gateway = app.gateway();
    let relay = app.relay();
    let nats_consumers = app.nats_consumers();
    let router = app.router();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("http client"),
        kind,
        store,
        settings,
        clock,
        manual_clock,
        expiry,
        recovery,
        simulator,
        gateway,
        relay,
        nats_consumers,
        database_url,
        router,
        saga,
        stop: Some(stop),
        server: Some(server),
        _dir: dir,
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {:?}",
            self.body
        );
        self
    }

    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.code()),
            (status, code),
            "unexpected answer: {:?}",
            self.body
        );
    }

    pub fn str(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("field {field} missing in {:?}", self.body))
            .to_owned()
    }
}

/// A customer as the tests see it.
#[derive(Debug, Clone)]
pub struct Customer {
    pub token: String,
}

impl TestApp {
    /// A second instance on the same database (PostgreSQL), with its own pool and workers.
    pub async fn spawn_sibling(&self) -> TestApp {
        let mut settings = self.settings.clone();
        settings.listen = "127.0.0.1:0".parse().expect("address");
        start(
            self.kind,
            settings,
            self.clock.clone(),
            self.manual_clock.clone(),
            self.manual_clock.is_none(),
            self.database_url.clone(),
            self._dir.clone(),
            self.saga.clone(),
        )
        .await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stops cleanly");
        }
    }

    pub fn advance(&self, by: chrono::Duration) {
        self.manual_clock
            .as_ref()
            .expect("the app was spawned with a manual clock")
            .advance(by);
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request reaches the app");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("read body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "body is not JSON ({status}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::POST, path, token, Some(body)).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> Resp {
        self.post(path, Some(ADMIN_TOKEN), body).await
    }

    pub async fn new_customer(&self, name: &str) -> Customer {
        let resp = self
            .admin_post("/v1/admin/customers", json!({ "name": name }))
            .await;
        resp.assert_status(201);
        Customer {
            token: resp.str("token"),
        }
    }

    pub async fn new_product(&self, sku: &str, price: i64, stock: i64) -> Resp {
        let resp = self
            .admin_post(
                "/v1/admin/products",
                json!({"sku": sku, "name": format!("Product {sku}"),
                       "price": {"amount": price, "currency": "EUR"}, "stock": stock}),
            )
            .await;
        resp.assert_status(201);
        resp
    }

    pub async fn new_cart(&self, customer: &Customer) -> String {
        let resp = self
            .request(Method::POST, "/v1/carts", Some(&customer.token), None)
            .await;
        resp.assert_status(201);
        resp.str("id")
    }

    pub async fn set_line(
        &self,
        customer: &Customer,
        cart: &str,
        sku: &str,
        quantity: i64,
    ) -> Resp {
        self.request(
            Method::PUT,
            &format!("/v1/carts/{cart}/lines/{sku}"),
            Some(&customer.token),
            Some(json!({ "quantity": quantity })),
        )
        .await
    }

    /// A customer with a cart holding these lines, ready to check out.
    pub async fn buyer_with(&self, name: &str, lines: &[(&str, i64)]) -> (Customer, String) {
        let customer = self.new_customer(name).await;
        let cart = self.new_cart(&customer).await;
        for (sku, quantity) in lines {
            self.set_line(&customer, &cart, sku, *quantity)
                .await
                .assert_status(200);
        }
        (customer, cart)
    }

    pub async fn start_checkout(&self, customer: &Customer, cart: &str) -> Resp {
        self.post(
            "/v1/checkouts",
            Some(&customer.token),
            json!({ "cart_id": cart }),
        )
        .await
    }

    /// `POST /v1/checkouts` for a cart, with an Idempotency-Key.
    pub async fn start_checkout_with_key(
        &self,
        customer: &Customer,
        cart: &str,
        key: &str,
    ) -> Resp {
        self.post_with_key("/v1/checkouts", customer, key, json!({ "cart_id": cart }))
            .await
    }

    /// A customer's `POST` with a JSON body and an Idempotency-Key.
    async fn post_with_key(&self, path: &str, customer: &Customer, key: &str, body: Value) -> Resp {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&customer.token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("request reaches the app");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.expect("a JSON body");
        Resp {
            status,
            headers,
            body,
        }
    }

    /// `POST /v1/checkouts/{id}/complete` with a payment method and an Idempotency-Key.
    pub async fn complete(
        &self,
        customer: &Customer,
        checkout: &str,
        payment_method: &str,
        key: &str,
    ) -> Resp {
        self.post_with_key(
            &format!("/v1/checkouts/{checkout}/complete"),
            customer,
            key,
            json!({ "payment_method": payment_method }),
        )
        .await
    }

    /// A customer with a reserved checkout of these lines: `(customer, checkout id, order id)`.
    pub async fn reserved_checkout(
        &self,
        name: &str,
        lines: &[(&str, i64)],
    ) -> (Customer, String, String) {
        let (customer, cart) = self.buyer_with(name, lines).await;
        let started = self.start_checkout(&customer, &cart).await;
        started.assert_status(201);
        (customer, started.str("id"), started.str("order_id"))
    }

    /// `(stock, reserved, available)` of a SKU from the admin inventory.
    pub async fn stock_of(&self, sku: &str) -> (i64, i64, i64) {
        let resp = self
            .get(&format!("/v1/admin/products/{sku}"), Some(ADMIN_TOKEN))
            .await;
        resp.assert_status(200);
        let n = |f: &str| resp.body[f].as_i64().expect("a number");
        (n("stock"), n("reserved"), n("available"))
    }

    /// Everything the admin can see of the inventory, for "nothing changed" assertions.
    pub async fn inventory_snapshot(&self) -> Value {
        let resp = self
            .get("/v1/admin/inventory?limit=500", Some(ADMIN_TOKEN))
            .await;
        resp.assert_status(200);
        resp.body
    }

    /// Every promise, promise 3 against the app's own gateway ledger, at the app's own time:
    /// an app on a manual clock lives elsewhere in time, and the checks of what is overdue
    /// must look from there.
    pub async fn audit(&self) -> Report {
        let options = holdfast::audit::AuditOptions {
            gateway: Some(self.gateway.as_ref()),
            now: self.clock.now(),
            ..Default::default()
        };
        holdfast::audit::run_with(self.store.as_ref(), options)
            .await
            .expect("the audit can read the store")
    }
}

pub trait AssertClean {
    fn assert_clean(&self);
}

impl AssertClean for Report {
    #[track_caller]
    fn assert_clean(&self) {
        assert!(self.is_clean(), "the audit found violations:\n{self}");
    }
}

/// Waits for a condition of the outside world, failing after `seconds`.
pub async fn eventually<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Runs a test body once per store: `both_stores!(name);` makes `name::postgres` and
/// `name::sqlite` from `async fn name(kind: StoreKind)`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(holdfast::store::StoreKind::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(holdfast::store::StoreKind::Sqlite).await
            }
        }
    )+};
}

/// Runs raw SQL on the app's database, under the store's feet (to corrupt rows on purpose).
pub async fn execute_sql(app: &TestApp, statements: &[String]) {
    match app.kind {
        StoreKind::Postgres => {
            let url = app
                .database_url
                .clone()
                .expect("a PostgreSQL app has a URL");
            let pool = sqlx::PgPool::connect(&url).await.expect("connect");
            for sql in statements {
                sqlx::query(sql)
                    .execute(&pool)
                    .await
                    .expect("statement runs");
            }
        }
        StoreKind::Sqlite => {
            let path = app.settings.data_dir.join("holdfast.db");
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .expect("open");
            for sql in statements {
                sqlx::query(sql)
                    .execute(&pool)
                    .await
                    .expect("statement runs");
            }
        }
    }
}

/// Runs a query under the store's feet and returns its first column as text (to look at what
/// the store really keeps).
pub async fn fetch_strings(app: &TestApp, sql: &str) -> Vec<String> {
    match app.kind {
        StoreKind::Postgres => {
            let url = app
                .database_url
                .clone()
                .expect("a PostgreSQL app has a URL");
            let pool = sqlx::PgPool::connect(&url).await.expect("connect");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("query runs")
        }
        StoreKind::Sqlite => {
            let path = app.settings.data_dir.join("holdfast.db");
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .expect("open");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("query runs")
        }
    }
}

/// Makes `n` customers each with a cart holding `lines`, directly through the store (fast
/// set-up); the race itself goes over HTTP.
pub async fn buyers(app: &TestApp, n: usize, lines: &[(&str, u32)]) -> Vec<(Customer, String)> {
    use futures::stream::{self, StreamExt as _};
    use holdfast::domain::{CustomerName, Quantity, Sku};
    let lines: Vec<(Sku, Quantity)> = lines
        .iter()
        .map(|(s, q)| {
            (
                Sku::parse(s).unwrap(),
                Quantity::new(i64::from(*q)).unwrap(),
            )
        })
        .collect();
    stream::iter(0..n)
        .map(|i| {
            let lines = lines.clone();
            async move {
                let token = holdfast::http::new_customer_token();
                let customer = app
                    .store
                    .create_customer(
                        &CustomerName::parse(&format!("buyer {i}")).unwrap(),
                        &holdfast::http::token_hash(&token),
                    )
                    .await
                    .expect("customer");
                let now = chrono::Utc::now();
                let cart = app.store.create_cart(customer.id, now).await.expect("cart");
                for (sku, q) in &lines {
                    app.store
                        .set_cart_line(customer.id, cart.id, sku, *q, now)
                        .await
                        .expect("line");
                }
                (Customer { token }, cart.id.to_string())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// A child process (the built binary) that is killed if the test ends without stopping it, so
/// a failing test leaves no server behind holding its port and its database.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The app's PostgreSQL database refusing it: every session of the database is ended and no new
/// one is let in until [`DatabaseOutage::end`] (cheaper than dropping the database, which waits
/// for a checkpoint).
pub struct DatabaseOutage {
    admin: sqlx::PgConnection,
    name: String,
}

impl DatabaseOutage {
    pub async fn begin(app: &TestApp) -> DatabaseOutage {
        use sqlx::Connection as _;
        let url = app
            .database_url
            .clone()
            .expect("a PostgreSQL app has a URL");
        let name = url.rsplit('/').next().expect("a database name").to_owned();
        let mut admin = sqlx::PgConnection::connect(&format!("{}/test", postgres_base_url()))
            .await
            .expect("connect to the server");
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .execute(&mut admin)
            .await
            .expect("refuse connections");
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .execute(&mut admin)
        .await
        .expect("terminate the app's connections");
        DatabaseOutage { admin, name }
    }

    pub async fn end(mut self) {
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(&mut self.admin)
        .await
        .expect("let connections in again");
    }
}
