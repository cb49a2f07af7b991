//! Crash tests with the real binary: promises 3, 4 and 5 across a SIGKILL.
//!
//! Each test runs `holdfast serve` as a child process on a PostgreSQL database of its own,
//! charging through the fake Stripe server in the test process and relaying events to a NATS
//! stream of its own. It kills the process with SIGKILL, starts it again on the same database
//! and proves that recovery finishes every checkout: one charge per paid checkout in the
//! gateway's ledger, stock that adds up with nothing left reserved, one `order.paid` message
//! per paid order on the stream, and a clean audit (in process and `holdfast audit`).
//!
//! The fault-point tests stop the process at one phase boundary of the saga
//! (`HOLDFAST_FAULT_POINT`) and kill it once every checkout has reached it, so each checkout
//! is cut exactly there. The last test kills a process at a random moment of a burst.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use holdfast::audit::AuditOptions;
use holdfast::domain::CheckoutId;
use holdfast::faults::{self, FaultPoint};
use holdfast::payments::{StripeGateway, Timeouts};
use holdfast::store::{OutboxStore as _, PgStore};
use rand::Rng as _;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::Row as _;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::helpers::{fresh_postgres_database, nats_url, AssertClean as _, ADMIN_TOKEN};

const SKU: &str = "crash-01";
const PRICE: i64 = 1250;
const BUYERS: usize = 5;

/// How long an instance owns a checkout it is charging: recovery takes over this long after
/// the kill.
const LEASE_SECONDS: u64 = 2;

/// Every checkout must be settled this long after the restart.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// Events claimed by the killed process's relay come back when the relay's own lease (30 s)
/// runs out, so publication gets longer than the saga.
const PUBLISH_WITHIN: Duration = Duration::from_secs(60);

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    request: Duration::from_secs(10),
};

macro_rules! crash_at {
    ($($name:ident => $point:expr),+ $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            a_process_killed_at_a_fault_point_is_finished_by_its_successor($point).await
        }
    )+};
}

crash_at!(
    a_process_killed_after_charging_is_recorded_and_before_the_gateway_call_charges_each_checkout_once_after_restart
        => FaultPoint::AfterBeginCharge,
    a_process_killed_after_the_gateway_charged_and_before_the_outcome_is_recorded_completes_each_checkout_without_a_second_charge
        => FaultPoint::AfterGatewayCall,
    a_process_killed_after_the_success_is_recorded_publishes_one_order_paid_event_per_order_after_restart
        => FaultPoint::AfterRecordSuccess,
);

async fn a_process_killed_at_a_fault_point_is_finished_by_its_successor(point: FaultPoint) {
    // Arrange: a process that stops at `point`, a product and five buyers with checkouts.
    let deployment = Deployment::new(180).await;
    let mut first = deployment.start(Some(point)).await;
    let stock = 40;
    deployment.new_product(stock).await;
    let mut buyers = Vec::with_capacity(BUYERS);
    for i in 0..BUYERS {
        let quantity = i as i64 % 3 + 1;
        let mut buyer = deployment.buyer(&format!("Buyer {i}"), quantity).await;
        buyer.checkout = Some(deployment.start_checkout(&buyer).await);
        buyers.push(buyer);
    }

    // Act: every buyer completes at once; kill the process when every checkout has reached
    // the fault point; start it again without one.
    let in_flight: Vec<JoinHandle<()>> = buyers
        .iter()
        .map(|buyer| deployment.complete_in_background(buyer))
        .collect();
    first
        .wait_for_line(&faults::marker(point), BUYERS, Duration::from_secs(20))
        .await;
    let status = first.kill();
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "the process died of SIGKILL"
    );
    for request in in_flight {
        // The requests fail with the connection; their answers are lost, as a client's are.
        let _ = request.await;
    }
    let db = deployment.db().await;
    let at_kill = db.checkouts().await;
    let expected_state = match point {
        FaultPoint::AfterBeginCharge | FaultPoint::AfterGatewayCall => "charging",
        FaultPoint::AfterRecordSuccess => "completed",
        other => unreachable!("no visa crash test stops at {}", other.as_str()),
    };
    let expected_charges = usize::from(point != FaultPoint::AfterBeginCharge);
    for checkout in &at_kill {
        assert_eq!(
            (
                checkout.state.as_str(),
                deployment.fake.charges_for(checkout.id)
            ),
            (expected_state, expected_charges),
            "at the kill, checkout {} is where {} leaves it",
            checkout.id,
            point.as_str()
        );
    }
    assert_eq!(at_kill.len(), BUYERS);
    let second = deployment.start(None).await;

    // Assert
    let states = deployment.wait_until_settled(&buyers, &second).await;
    assert!(
        states.iter().all(|s| s == "completed"),
        "every checkout paid with pm_card_visa ends completed: {states:?}"
    );
    for buyer in &buyers {
        let checkout = buyer.checkout();
        assert_eq!(
            deployment.fake.charges_for(checkout.id),
            1,
            "checkout {} was charged exactly once",
            checkout.id
        );
    }
    let sold: i64 = buyers.iter().map(|b| b.quantity).sum();
    assert_eq!(
        deployment.inventory().await,
        (stock - sold, 0),
        "(stock, reserved): every unit sold is gone from stock, nothing stays reserved"
    );
    let paid: Vec<Uuid> = buyers.iter().map(|b| b.checkout().order_id).collect();
    deployment.assert_one_event_per_paid_order(&db, &paid).await;
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_at_a_random_moment_of_a_burst_leaves_every_checkout_paid_once_or_released(
) {
    // Arrange: a plain process (no fault point), reservations that expire after 5 s, sixteen
    // buyers with carts of one to three units.
    let deployment = Deployment::new(5).await;
    let first = deployment.start(None).await;
    let stock = 100;
    deployment.new_product(stock).await;
    let (quantities, kill_after) = {
        let mut rng = rand::thread_rng();
        let quantities: Vec<i64> = (0..16).map(|_| rng.gen_range(1..=3)).collect();
        let kill_after = rng.gen_range(1..quantities.len());
        (quantities, kill_after)
    };
    let mut buyers = Vec::with_capacity(quantities.len());
    for (i, quantity) in quantities.into_iter().enumerate() {
        buyers.push(
            deployment
                .buyer(&format!("Burst buyer {i}"), quantity)
                .await,
        );
    }
    eprintln!("the process is killed once the gateway has seen {kill_after} requests");

    // Act: every buyer checks out and completes at once; the process dies once the gateway
    // has seen `kill_after` requests, whatever else is in flight.
    let burst: Vec<JoinHandle<()>> = buyers
        .iter()
        .map(|buyer| deployment.check_out_in_background(buyer))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while deployment.fake.requests() < kill_after {
        assert!(
            Instant::now() < deadline,
            "the burst never reached the gateway {kill_after} times\n{}",
            first.tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = first.kill();
    assert_eq!(status.signal(), Some(SIGKILL));
    for buyer in burst {
        let _ = buyer.await;
    }
    let db = deployment.db().await;
    let mut at_kill: HashMap<String, usize> = HashMap::new();
    for checkout in db.checkouts().await {
        *at_kill.entry(checkout.state).or_default() += 1;
    }
    eprintln!("checkouts by state at the kill: {at_kill:?}");
    let second = deployment.start(None).await;

    // Assert: every checkout that exists is terminal (recovered or expired), whatever the
    // clients heard.
    let deadline = Instant::now() + SETTLE_WITHIN;
    let checkouts = loop {
        let checkouts = db.checkouts().await;
        if checkouts.iter().all(|c| c.is_terminal()) {
            break checkouts;
        }
        assert!(
            Instant::now() < deadline,
            "checkouts still open after the restart: {:?}\n{}",
            checkouts
                .iter()
                .filter(|c| !c.is_terminal())
                .collect::<Vec<_>>(),
            second.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!checkouts.is_empty(), "the burst created checkouts");
    let mut sold = 0;
    let mut paid = Vec::new();
    for checkout in &checkouts {
        let charges = deployment.fake.charges_for(checkout.id);
        match checkout.state.as_str() {
            "completed" => {
                assert_eq!(charges, 1, "checkout {} charged once", checkout.id);
                sold += checkout.units;
                paid.push(checkout.order_id);
            }
            "expired" => assert_eq!(
                charges, 0,
                "an expired checkout {} never moved money",
                checkout.id
            ),
            other => panic!("checkout {} ended {other}", checkout.id),
        }
    }
    eprintln!(
        "{} checkouts: {} completed, {} expired",
        checkouts.len(),
        paid.len(),
        checkouts.len() - paid.len()
    );
    assert_eq!(
        deployment.inventory().await,
        (stock - sold, 0),
        "(stock, reserved): units of paid checkouts sold, every other unit back"
    );
    deployment.assert_one_event_per_paid_order(&db, &paid).await;
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

/// The signal number of SIGKILL.
const SIGKILL: i32 = 9;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A buyer as the test drives it over HTTP.
struct Buyer {
    token: String,
    cart: String,
    quantity: i64,
    checkout: Option<StartedCheckout>,
}

impl Buyer {
    fn checkout(&self) -> &StartedCheckout {
        self.checkout
            .as_ref()
            .expect("the buyer started a checkout")
    }
}

struct StartedCheckout {
    id: CheckoutId,
    order_id: Uuid,
}

/// What both lives of the service share: database, gateway, NATS stream, address, data
/// directory and flags.
struct Deployment {
    database_url: String,
    fake: FakeStripe,
    stream: TestStream,
    listen: String,
    base: String,
    data_dir: TempDir,
    reservation_ttl_seconds: u64,
    client: reqwest::Client,
}

impl Deployment {
    async fn new(reservation_ttl_seconds: u64) -> Self {
        let port = free_port();
        Self {
            database_url: fresh_postgres_database().await,
            fake: FakeStripe::start().await,
            stream: TestStream::new(),
            listen: format!("127.0.0.1:{port}"),
            base: format!("http://127.0.0.1:{port}"),
            data_dir: TempDir::new().expect("temp dir"),
            reservation_ttl_seconds,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        }
    }

    /// `holdfast serve` with this deployment's flags; `fault` arms a fault point.
    fn command(&self, fault: Option<FaultPoint>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOLDFAST_") {
                command.env_remove(name);
            }
        }
        command
            .arg("serve")
            .args(["--database-url", &self.database_url])
            .args(["--stripe-api-base", &self.fake.base_url()])
            .args(["--stripe-secret-key", SECRET_KEY])
            .args(["--nats-url", &nats_url()])
            .args(["--nats-stream", &self.stream.name])
            .args(["--nats-subject-prefix", &self.stream.name])
            .args(["--lease-seconds", &LEASE_SECONDS.to_string()])
            .args(["--recovery-interval-ms", "200"])
            .args(["--expiry-interval-ms", "200"])
            .args([
                "--reservation-ttl-seconds",
                &self.reservation_ttl_seconds.to_string(),
            ])
            .args(["--admin-token", ADMIN_TOKEN])
            .args(["--listen", &self.listen])
            .arg("--data-dir")
            .arg(self.data_dir.path());
        if let Some(point) = fault {
            command.env("HOLDFAST_FAULT_POINT", point.as_str());
        }
        command
    }

    /// Starts the service and waits until it answers `/readyz`.
    async fn start(&self, fault: Option<FaultPoint>) -> Server {
        let mut server = Server::spawn(self.command(fault));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
            {
                if resp.status().is_success() {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "holdfast exited before it was ready ({status})\n{}",
                    server.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "holdfast did not become ready\n{}",
                server.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the service answers");
        let status = response.status();
        let body: Value = response.json().await.expect("a JSON body");
        assert!(status.is_success(), "{method} {path}: {status} {body}");
        body
    }

    async fn new_product(&self, stock: i64) {
        let body = json!({"sku": SKU, "name": "Crash-tested kettle",
                          "price": {"amount": PRICE, "currency": "EUR"}, "stock": stock});
        self.call(Method::POST, "/v1/admin/products", ADMIN_TOKEN, Some(body))
            .await;
    }

    /// A customer with a cart of `quantity` units of the product.
    async fn buyer(&self, name: &str, quantity: i64) -> Buyer {
        let customer = self
            .call(
                Method::POST,
                "/v1/admin/customers",
                ADMIN_TOKEN,
                Some(json!({ "name": name })),
            )
            .await;
        let token = customer["token"].as_str().expect("a token").to_owned();
        let cart = self.call(Method::POST, "/v1/carts", &token, None).await;
        let cart = cart["id"].as_str().expect("a cart id").to_owned();
        self.call(
            Method::PUT,
            &format!("/v1/carts/{cart}/lines/{SKU}"),
            &token,
            Some(json!({ "quantity": quantity })),
        )
        .await;
        Buyer {
            token,
            cart,
            quantity,
            checkout: None,
        }
    }

    async fn start_checkout(&self, buyer: &Buyer) -> StartedCheckout {
        let started = self
            .call(
                Method::POST,
                "/v1/checkouts",
                &buyer.token,
                Some(json!({ "cart_id": buyer.cart })),
            )
            .await;
        let id = started["id"].as_str().expect("a checkout id");
        let order_id = started["order_id"].as_str().expect("an order id");
        StartedCheckout {
            id: CheckoutId::parse(id).expect("a checkout id"),
            order_id: Uuid::parse_str(order_id).expect("an order id"),
        }
    }

    /// `complete` with `pm_card_visa`, sent and left to its fate: the answer is lost with the
    /// process.
    fn complete_in_background(&self, buyer: &Buyer) -> JoinHandle<()> {
        let request = complete_request(&self.client, &self.base, &buyer.token, buyer.checkout().id);
        tokio::spawn(async move {
            let _ = request.send().await;
        })
    }

    /// Starts a checkout and completes it, as a browser does, ignoring what goes wrong.
    fn check_out_in_background(&self, buyer: &Buyer) -> JoinHandle<()> {
        let (client, base) = (self.client.clone(), self.base.clone());
        let (token, cart) = (buyer.token.clone(), buyer.cart.clone());
        tokio::spawn(async move {
            let started = client
                .post(format!("{base}/v1/checkouts"))
                .bearer_auth(&token)
                .json(&json!({ "cart_id": cart }))
                .send()
                .await;
            let Ok(started) = started else { return };
            let Ok(started) = started.json::<Value>().await else {
                return;
            };
            let Some(id) = started["id"]
                .as_str()
                .and_then(|id| CheckoutId::parse(id).ok())
            else {
                return;
            };
            let _ = complete_request(&client, &base, &token, id).send().await;
        })
    }

    /// Polls every buyer's checkout until all are terminal; returns their states.
    async fn wait_until_settled(&self, buyers: &[Buyer], server: &Server) -> Vec<String> {
        let deadline = Instant::now() + SETTLE_WITHIN;
        loop {
            let mut states = Vec::with_capacity(buyers.len());
            for buyer in buyers {
                let checkout = self
                    .call(
                        Method::GET,
                        &format!("/v1/checkouts/{}", buyer.checkout().id),
                        &buyer.token,
                        None,
                    )
                    .await;
                states.push(checkout["state"].as_str().expect("a state").to_owned());
            }
            let terminal = |s: &String| {
                matches!(
                    s.as_str(),
                    "completed" | "payment_failed" | "expired" | "cancelled" | "refunded"
                )
            };
            if states.iter().all(terminal) {
                return states;
            }
            assert!(
                Instant::now() < deadline,
                "checkouts not settled after the restart: {states:?}\n{}",
                server.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `(stock, reserved)` of the product, from `GET /v1/admin/inventory`.
    async fn inventory(&self) -> (i64, i64) {
        let inventory = self
            .call(Method::GET, "/v1/admin/inventory", ADMIN_TOKEN, None)
            .await;
        let product = inventory["data"]
            .as_array()
            .and_then(|rows| rows.iter().find(|p| p["sku"] == SKU))
            .unwrap_or_else(|| panic!("{SKU} in the inventory: {inventory}"));
        let number = |field: &str| product[field].as_i64().expect("a number");
        (number("stock"), number("reserved"))
    }

    async fn db(&self) -> Db {
        let store = PgStore::connect(&self.database_url, 4)
            .await
            .expect("open the database");
        let pool = sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("connect");
        Db { store, pool }
    }

    /// Waits until the outbox has published everything, then reads the whole stream: one
    /// `order.paid` message for each paid order, none for any other.
    async fn assert_one_event_per_paid_order(&self, db: &Db, paid: &[Uuid]) {
        let deadline = Instant::now() + PUBLISH_WITHIN;
        loop {
            let lag = db
                .store
                .outbox_lag(chrono::Utc::now())
                .await
                .expect("outbox lag");
            if lag.unpublished == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} events still unpublished",
                lag.unpublished
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let per_order = self.stream.order_paid_messages().await;
        let expected: HashMap<String, usize> = paid.iter().map(|o| (o.to_string(), 1)).collect();
        assert_eq!(
            per_order, expected,
            "order.paid messages per order on the stream"
        );
    }

    /// The in-process audit against the fake's ledger with no grace at all, and the
    /// `holdfast audit` command an operator runs.
    async fn assert_audit_clean(&self, db: &Db) {
        let gateway = StripeGateway::new(
            SecretString::from(SECRET_KEY),
            &self.fake.base_url(),
            TIMEOUTS,
        )
        .expect("a gateway for the fake");
        let report = holdfast::audit::run_with(
            &db.store,
            AuditOptions {
                gateway: Some(&gateway),
                now: chrono::Utc::now(),
                grace: chrono::Duration::zero(),
            },
        )
        .await
        .expect("the audit reads the store");
        report.assert_clean();
        assert!(
            report.checks.iter().all(|c| c.skipped.is_none()),
            "every promise was checked:\n{report}"
        );

        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOLDFAST_") {
                command.env_remove(name);
            }
        }
        let output = command
            .arg("audit")
            .args(["--database-url", &self.database_url])
            .args(["--stripe-api-base", &self.fake.base_url()])
            .args(["--stripe-secret-key", SECRET_KEY])
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .output()
            .await
            .expect("run holdfast audit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "holdfast audit exits 0: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 4, "one line per promise:\n{stdout}");
        assert!(
            lines.iter().all(|l| l.starts_with("ok ")),
            "every promise checked and kept:\n{stdout}"
        );
    }

    /// Deletes the test's stream; the process must be gone by now.
    async fn finish(self) {
        self.stream.delete().await;
    }
}

fn complete_request(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    checkout: CheckoutId,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/checkouts/{checkout}/complete"))
        .bearer_auth(token)
        .header("Idempotency-Key", format!("complete-{checkout}"))
        .json(&json!({ "payment_method": "pm_card_visa" }))
}

/// The test's own view of the database.
struct Db {
    store: PgStore,
    pool: sqlx::PgPool,
}

#[derive(Debug)]
struct CheckoutRow {
    id: CheckoutId,
    order_id: Uuid,
    state: String,
    units: i64,
}

impl CheckoutRow {
    fn is_terminal(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "reserved" | "charging" | "requires_action"
        )
    }
}

impl Db {
    /// Every checkout with its state and the units of its order.
    async fn checkouts(&self) -> Vec<CheckoutRow> {
        sqlx::query(
            "SELECT c.id, c.order_id, c.state, \
             (SELECT COALESCE(SUM(ol.quantity), 0) FROM order_lines ol \
              WHERE ol.order_id = c.order_id)::BIGINT AS units \
             FROM checkouts c ORDER BY c.created_at",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read the checkouts")
        .iter()
        .map(|row| CheckoutRow {
            id: CheckoutId::from_uuid(row.get("id")),
            order_id: row.get("order_id"),
            state: row.get("state"),
            units: row.get("units"),
        })
        .collect()
    }
}

/// A NATS stream and subject prefix of this test's own, deleted at the end (or, when the test
/// failed first, when dropped).
struct TestStream {
    name: String,
    deleted: bool,
}

impl TestStream {
    fn new() -> Self {
        Self {
            name: format!("hf_test_{}", Uuid::new_v4().simple()),
            deleted: false,
        }
    }

    async fn jetstream() -> jetstream::Context {
        let client = async_nats::connect(nats_url())
            .await
            .expect("NATS must be reachable for the test suite (see README)");
        jetstream::new(client)
    }

    /// How many `order.paid` messages the stream holds per `order_id` of their payload.
    async fn order_paid_messages(&self) -> HashMap<String, usize> {
        let js = Self::jetstream().await;
        let mut stream = js.get_stream(&self.name).await.expect("the stream exists");
        let state = stream.info().await.expect("stream info").state.clone();
        let subject = format!("{}.order.paid", self.name);
        let mut per_order = HashMap::new();
        if state.messages == 0 {
            return per_order;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            let message = stream
                .get_raw_message(sequence)
                .await
                .expect("a stored message");
            assert_eq!(message.subject.as_str(), subject, "only order.paid events");
            let payload: Value = serde_json::from_slice(&message.payload).expect("a JSON payload");
            let order = payload["order_id"]
                .as_str()
                .expect("an order_id")
                .to_owned();
            *per_order.entry(order).or_default() += 1;
        }
        per_order
    }

    async fn delete(mut self) {
        Self::jetstream()
            .await
            .delete_stream(&self.name)
            .await
            .expect("delete the test stream");
        self.deleted = true;
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Dropped during a panic, possibly inside the test's runtime: delete from a thread
        // with a runtime of its own, best effort.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// A running `holdfast` child process. Its stderr is read line by line on a thread of its own
/// (so the pipe never fills), kept for failure messages and forwarded to the test; dropping it
/// kills and reaps the process, so none outlives its test.
struct Server {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        let echo = std::env::var_os("TEST_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("holdfast: {line}");
                }
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.clone());
                // The test may have stopped listening; the log still keeps the line.
                let _ = tx.send(line);
            }
        });
        Self { child, lines, log }
    }

    /// Waits until `count` lines equal to `wanted` have appeared on stderr.
    async fn wait_for_line(&mut self, wanted: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let mut found = 0;
        while found < count {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => found += usize::from(line == wanted),
                Ok(None) => panic!(
                    "holdfast closed stderr after {found} of {count} {wanted:?}\n{}",
                    self.tail()
                ),
                Err(_) => panic!(
                    "only {found} of {count} {wanted:?} within {within:?}\n{}",
                    self.tail()
                ),
            }
        }
    }

    /// The last lines of stderr, for failure messages.
    fn tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let from = log.len().saturating_sub(40);
        format!("--- holdfast stderr ---\n{}", log[from..].join("\n"))
    }

    /// SIGKILL, then wait for the process to be gone.
    fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("send SIGKILL");
        self.child.wait().expect("holdfast is reaped")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
