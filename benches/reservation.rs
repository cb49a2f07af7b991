//! Reservation under contention, measured side by side on PostgreSQL (DESIGN §10).
//!
//! Refusing buyers keeps promise 1 (no oversell) cheaply and breaks promise 2 (no undersell),
//! so a throughput figure alone says little. This benchmark runs, in one process and one run, the
//! same buyers against the same stock through two algorithms:
//!
//! * holdfast over HTTP: the real `Application` on a fresh database, `POST /v1/checkouts`, whose
//!   store reserves with one guarded `UPDATE` (DESIGN §3);
//! * the same with group reservation on (`--group-reservations`): concurrent checkouts share one
//!   transaction, one hot-row update and one commit;
//! * the hand-rolled loop most shops write, straight on PostgreSQL in its own database: read the
//!   row, compare-and-set on `version`, three attempts with 50 ms and 100 ms backoff, then
//!   "try again later".
//!
//! and reports units sold, buyers refused while stock remained, oversell, latency and
//! throughput for each. The `hot-all` and `spread-all` scenarios have stock for every buyer, so
//! every request is a reservation; there the run also measures the database's own ceiling for
//! the same statements with `scripts/pgbench-ceiling.sh` (when `pgbench` is installed: one hot
//! row, or 200 rows) and prints each row's ratio to it. It is a benchmark, not a test: it prints figures and asserts nothing.
//!
//! `cargo bench --bench reservation -- [--scenario hot|hot-all|spread|spread-all|all] [--buyers N]
//! [--units U] [--skus S] [--concurrency C] [--pool P] [--seed N] [--json]`
//!
//! Numbers move with the machine: read them next to each other, never against another run.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{self, StreamExt as _};
use holdfast::config::{Cli, Settings};
use holdfast::domain::{
    Currency, CustomerName, Money, NewProduct, ProductName, Quantity, Sku, StockLevel,
};
use holdfast::startup::{Application, Overrides};
use holdfast::store::Store;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Connection as _;
use tokio::sync::oneshot;

/// PostgreSQL allows 100 connections by default; the rest is left to the admin connection and
/// to whoever else uses the server. Above this, the one-connection-per-client run is skipped.
const MAX_CONNECTIONS: u32 = 90;

#[derive(Debug, Parser)]
#[command(
    name = "reservation",
    about = "holdfast's guarded reservation over HTTP vs. a read + version-retry loop, on PostgreSQL"
)]
struct Flags {
    /// Which scenario to run; the flags below override its figures.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Choice,
    /// Buyers, each wanting one unit (hot and hot-all: 5000, spread and spread-all: 20000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    buyers: Option<u64>,
    /// Units in stock per SKU (hot and spread: 100, hot-all: as many as buyers, spread-all: 1000).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=StockLevel::MAX))]
    units: Option<i64>,
    /// SKUs the buyers are spread over, uniformly at random (hot: 1, spread: 200).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    skus: Option<u64>,
    /// Concurrent clients (64).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: Option<u64>,
    /// PostgreSQL connections for holdfast (its default is 16) and for a first run of the
    /// hand-rolled loop on equal terms. The loop then runs again with one connection per client,
    /// as a pgbench client connects, unless that is the same number.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
    pool: u32,
    /// Seed of the buyer-to-SKU draw; both algorithms see the same buyers in the same order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Only holdfast's rows (plain and grouped) and the pgbench ceiling, not the hand-rolled loop.
    #[arg(long)]
    holdfast_only: bool,
    /// The server the benchmark databases are created on.
    #[arg(
        long,
        env = "HOLDFAST_BENCH_POSTGRES_URL",
        default_value = "postgres://root@127.0.0.1:5432"
    )]
    postgres_url: String,
    /// `cargo bench` passes `--bench` to every bench binary; accepted and ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Choice {
    Hot,
    HotAll,
    Spread,
    SpreadAll,
    All,
}

#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    skus: usize,
    units: i64,
    buyers: usize,
    concurrency: usize,
    /// Carts as the reference's `steady_cart.sql` draws them: 1-3 distinct SKUs, 1-3 units a
    /// line (the first SKU is the drawn one). Otherwise one line of one unit.
    mixed_carts: bool,
}

impl Scenario {
    fn chosen(flags: &Flags) -> Vec<Scenario> {
        let hot = Scenario {
            name: "hot",
            skus: 1,
            units: 100,
            buyers: 5_000,
            concurrency: 64,
            mixed_carts: false,
        };
        // Stock for everyone: every request reserves, so the hot row's lock and the commit
        // are all that is measured, as in the pgbench ceiling.
        let hot_all = Scenario {
            name: "hot-all",
            skus: 1,
            units: 5_000,
            buyers: 5_000,
            concurrency: 64,
            mixed_carts: false,
        };
        let spread = Scenario {
            name: "spread",
            skus: 200,
            units: 100,
            buyers: 20_000,
            concurrency: 64,
            mixed_carts: false,
        };
        // The same with stock for everyone and the reference's cart shapes: the 200-SKU mix
        // against `steady_cart.sql`.
        let spread_all = Scenario {
            name: "spread-all",
            skus: 200,
            units: 1_000_000,
            buyers: 20_000,
            concurrency: 64,
            mixed_carts: true,
        };
        let picked = match flags.scenario {
            Choice::Hot => vec![hot],
            Choice::HotAll => vec![hot_all],
            Choice::Spread => vec![spread],
            Choice::SpreadAll => vec![spread_all],
            Choice::All => vec![hot, hot_all, spread, spread_all],
        };
        let size = |n: u64| usize::try_from(n).expect("a count that fits in memory");
        picked
            .into_iter()
            .map(|s| Scenario {
                skus: flags.skus.map_or(s.skus, size),
                units: flags.units.unwrap_or(s.units),
                buyers: flags.buyers.map_or(s.buyers, size),
                concurrency: flags.concurrency.map_or(s.concurrency, size),
                ..s
            })
            .collect()
    }

    /// Which SKU each buyer wants, in the order buyers arrive.
    fn draw(&self, seed: u64) -> Arc<Vec<usize>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Arc::new(
            (0..self.buyers)
                .map(|_| rng.gen_range(0..self.skus))
                .collect(),
        )
    }
}

/// How one buyer's attempt ended, as the buyer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Sold,
    /// Refused for stock: `409 insufficient_stock`, or the read showed nothing available.
    Refused,
    /// The hand-rolled loop ran out of attempts: "try again later".
    TryLater,
    /// Anything else (5xx, transport or database error): a fault, counted apart.
    Failed(String),
}

impl Outcome {
    fn is_refusal(&self) -> bool {
        matches!(self, Outcome::Refused | Outcome::TryLater)
    }
}

#[derive(Debug)]
struct Attempt {
    sku: usize,
    /// When the client sent the first request, and when it had its answer, since the run began.
    sent: Duration,
    answered: Duration,
    outcome: Outcome,
}

struct Run {
    attempts: Vec<Attempt>,
    wall: Duration,
}

/// One line of the table.
struct Row {
    scenario: Scenario,
    algorithm: &'static str,
    connections: u32,
    sold: i64,
    refused: usize,
    /// Refused with "try again later" after the last attempt (the hand-rolled loop only).
    gave_up: usize,
    refused_with_stock: usize,
    oversold: i64,
    failed: usize,
    p50: Duration,
    p99: Duration,
    p99_sold: Duration,
    p99_refused: Duration,
    /// When the last unit sold was answered, since the run began.
    last_sale: Duration,
    wall: Duration,
    audit_clean: Option<bool>,
    /// Requests per second over the pgbench ceiling of the same run, where one was measured.
    of_ceiling: Option<f64>,
}

#[tokio::main]
async fn main() {
    let flags = Flags::parse();
    let postgres = server_version(&flags.postgres_url).await;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if !flags.json {
        println!("# {cores} cores, {postgres}");
    }
    for scenario in Scenario::chosen(&flags) {
        let skus_of = scenario.draw(flags.seed);
        let ceiling = match scenario.name {
            "hot-all" => pgbench_ceiling("hot", scenario.concurrency).await,
            "spread-all" => pgbench_ceiling("200-rows", scenario.concurrency).await,
            _ => None,
        };
        let mut rows = vec![
            holdfast_over_http(&flags, &scenario, skus_of.clone(), Path::Plain).await,
            holdfast_over_http(&flags, &scenario, skus_of.clone(), Path::Grouped).await,
        ];
        let per_client = u32::try_from(scenario.concurrency).unwrap_or(u32::MAX);
        let mut connections = vec![flags.pool];
        if per_client != flags.pool && per_client <= MAX_CONNECTIONS {
            connections.push(per_client);
        }
        for n in connections.into_iter().filter(|_| !flags.holdfast_only) {
            rows.push(version_retry(&flags, &scenario, skus_of.clone(), n).await);
        }
        if let Some(tps) = ceiling {
            for row in &mut rows {
                row.of_ceiling = Some(per_second(row) / tps);
            }
        }
        // Printed once every run is over, so progress lines on stderr never split the table.
        if flags.json {
            rows.iter().for_each(print_json);
        } else {
            print_table(&scenario, &rows, ceiling);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// holdfast over HTTP

struct HttpBuyer {
    token: String,
    cart_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Each checkout in its own transaction.
    Plain,
    /// `--group-reservations`: concurrent checkouts combined into one transaction.
    Grouped,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Plain => "holdfast (HTTP)",
            Path::Grouped => "holdfast grouped",
        }
    }
}

async fn holdfast_over_http(
    flags: &Flags,
    scenario: &Scenario,
    skus_of: Arc<Vec<usize>>,
    path: Path,
) -> Row {
    let (url, database) = fresh_database(&flags.postgres_url).await;
    let dir = tempfile::TempDir::new().expect("a temporary data directory");
    let mut args = vec![
        "holdfast".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--admin-token".into(),
        "bench-admin-token-0123456789".into(),
        "--database-url".into(),
        url,
        "--database-max-connections".into(),
        flags.pool.to_string(),
        // No reservation may expire mid-run: returned units would mix two sales in one count.
        "--reservation-ttl-seconds".into(),
        "1800".into(),
    ];
    // Said either way, whatever the default.
    args.push(format!("--group-reservations={}", path == Path::Grouped));
    let cli = Cli::try_parse_from(args).expect("the benchmark's flags parse");
    let settings = Settings::from_flags(&cli.flags).expect("the benchmark's settings are valid");
    let app = Application::build_with(settings, Overrides::default())
        .await
        .expect("holdfast starts on a fresh database");
    let checkouts = format!("http://{}/v1/checkouts", app.local_addr());
    let store = app.store();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let skus = create_products(store.as_ref(), scenario).await;
    let buyers =
        Arc::new(create_buyers(store.clone(), &skus, &skus_of, scenario, flags.seed).await);
    let client = reqwest::Client::new();
    eprintln!("{}: {}: racing", scenario.name, path.name());
    let run = drive(skus_of, scenario.concurrency, move |buyer| {
        let (client, url, buyers) = (client.clone(), checkouts.clone(), buyers.clone());
        async move { checkout_over_http(&client, &url, &buyers[buyer]).await }
    })
    .await;

    let reserved = store
        .inventory_audit()
        .await
        .expect("the inventory can be read after the run");
    let mut sold = vec![0i64; skus.len()];
    for row in reserved {
        if let Some(i) = skus.iter().position(|s| *s == row.sku) {
            sold[i] = row.reserved;
        }
    }
    let audit = holdfast::audit::run(store.as_ref())
        .await
        .expect("the audit can read the store");
    if !audit.is_clean() {
        eprintln!("holdfast audit:\n{audit}");
    }
    let _ = stop.send(());
    let _ = server.await;
    drop(store);
    drop_database(&flags.postgres_url, &database).await;
    let mut row = summarise(scenario, path.name(), flags.pool, run, &sold);
    row.audit_clean = Some(audit.is_clean());
    row
}

async fn create_products(store: &dyn Store, scenario: &Scenario) -> Vec<Sku> {
    let mut skus = Vec::with_capacity(scenario.skus);
    let price =
        Money::new(500, Currency::parse("EUR").expect("EUR is a currency")).expect("a valid price");
    for i in 0..scenario.skus {
        let sku = Sku::parse(&format!("sku-{i:05}")).expect("a valid SKU");
        let product = NewProduct {
            sku: sku.clone(),
            name: ProductName::parse(&format!("Product {i}")).expect("a valid name"),
            price,
            stock: StockLevel::new(scenario.units).expect("units within the stock range"),
            rules: Default::default(),
            price_tiers: Default::default(),
        };
        store
            .create_product(&product, "bench", chrono::Utc::now())
            .await
            .expect("a product");
        skus.push(sku);
    }
    skus
}

/// Each buyer: a customer and a cart (one line of one unit, or a `steady_cart.sql` shape), made
/// through the store because set-up is not what is measured.
async fn create_buyers(
    store: Arc<dyn Store>,
    skus: &[Sku],
    skus_of: &[usize],
    scenario: &Scenario,
    seed: u64,
) -> Vec<HttpBuyer> {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let carts: Vec<Vec<(Sku, Quantity)>> = skus_of
        .iter()
        .map(|&first| {
            if !scenario.mixed_carts {
                return vec![(skus[first].clone(), Quantity::new(1).expect("a quantity"))];
            }
            let mut picked = vec![first];
            let lines = rng.gen_range(1..=3).min(skus.len());
            while picked.len() < lines {
                let next = rng.gen_range(0..skus.len());
                if !picked.contains(&next) {
                    picked.push(next);
                }
            }
            picked
                .into_iter()
                .map(|i| {
                    let units = rng.gen_range(1..=3);
                    (skus[i].clone(), Quantity::new(units).expect("a quantity"))
                })
                .collect()
        })
        .collect();
    let buyers: Vec<HttpBuyer> = stream::iter(carts.into_iter().enumerate())
        .map(|(i, lines)| {
            let store = store.clone();
            async move {
                let token = holdfast::http::new_customer_token();
                let name = CustomerName::parse(&format!("buyer {i}")).expect("a valid name");
                let customer = store
                    .create_customer(&name, &holdfast::http::token_hash(&token))
                    .await
                    .expect("a customer");
                let now = chrono::Utc::now();
                let cart = store.create_cart(customer.id, now).await.expect("a cart");
                for (sku, quantity) in &lines {
                    store
                        .set_cart_line(customer.id, cart.id, sku, *quantity, now)
                        .await
                        .expect("a cart line");
                }
                HttpBuyer {
                    token,
                    cart_id: cart.id.to_string(),
                }
            }
        })
        .buffered(16)
        .collect()
        .await;
    eprintln!(
        "set up {} buyers in {:.1} s",
        buyers.len(),
        started.elapsed().as_secs_f64()
    );
    buyers
}

async fn checkout_over_http(client: &reqwest::Client, url: &str, buyer: &HttpBuyer) -> Outcome {
    let sent = client
        .post(url)
        .bearer_auth(&buyer.token)
        .json(&json!({ "cart_id": buyer.cart_id }))
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(format!("transport: {e}")),
    };
    let status = response.status().as_u16();
    // The whole body is read in every case, so the connection goes back to the pool.
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return Outcome::Failed(format!("{status}, body unreadable: {e}")),
    };
    if status == 201 {
        return Outcome::Sold;
    }
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    match (status, code.as_str()) {
        (409, "insufficient_stock") => Outcome::Refused,
        _ => Outcome::Failed(format!("{status} {code}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The hand-rolled read + version-retry loop

const ATTEMPTS: usize = 3;
const BACKOFF: [Duration; ATTEMPTS - 1] = [Duration::from_millis(50), Duration::from_millis(100)];

/// No `CHECK (reserved <= stock)`: the shops this stands for rely on the version check alone,
/// and an oversell must be visible rather than turned into an error.
const SCHEMA: [&str; 2] = [
    "CREATE TABLE products (id BIGINT PRIMARY KEY, stock BIGINT NOT NULL, \
     reserved BIGINT NOT NULL DEFAULT 0, version BIGINT NOT NULL DEFAULT 0)",
    "CREATE TABLE reservations (id BIGSERIAL PRIMARY KEY, \
     product_id BIGINT NOT NULL REFERENCES products (id), buyer BIGINT NOT NULL, \
     quantity INT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
];

enum Try {
    Reserved,
    SoldOut,
    /// Someone changed the row between our read and our write.
    Changed,
}

async fn version_retry(
    flags: &Flags,
    scenario: &Scenario,
    skus_of: Arc<Vec<usize>>,
    connections: u32,
) -> Row {
    let (url, database) = fresh_database(&flags.postgres_url).await;
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect(&url)
        .await
        .expect("the benchmark database accepts connections");
    for statement in SCHEMA {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("the schema applies");
    }
    let skus = i64::try_from(scenario.skus).expect("a SKU count that fits in i64");
    sqlx::query("INSERT INTO products (id, stock) SELECT g, $1 FROM generate_series(0, $2 - 1) g")
        .bind(scenario.units)
        .bind(skus)
        .execute(&pool)
        .await
        .expect("the products");

    eprintln!(
        "{}: read + version retry on {connections} connections: racing",
        scenario.name
    );
    let racing = pool.clone();
    let run = drive(skus_of.clone(), scenario.concurrency, move |buyer| {
        let pool = racing.clone();
        let product = i64::try_from(skus_of[buyer]).expect("a SKU index fits in i64");
        let buyer = i64::try_from(buyer).expect("a buyer index fits in i64");
        async move { reserve_with_version_retry(&pool, product, buyer).await }
    })
    .await;

    // Sold is what the reservations table holds, not what the clients were told.
    let counted: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT p.id, (SELECT count(*) FROM reservations r WHERE r.product_id = p.id) \
         FROM products p",
    )
    .fetch_all(&pool)
    .await
    .expect("the reservations can be counted");
    let mut sold = vec![0i64; scenario.skus];
    for (id, n) in counted {
        if let Some(slot) = usize::try_from(id).ok().and_then(|i| sold.get_mut(i)) {
            *slot = n;
        }
    }
    pool.close().await;
    drop_database(&flags.postgres_url, &database).await;
    summarise(scenario, "read+version retry", connections, run, &sold)
}

/// Read, check, compare-and-set on `version`; on a lost race wait and start over, twice, then
/// give up. Each attempt is one transaction, as an ORM with optimistic locking would run it.
async fn reserve_with_version_retry(pool: &PgPool, product: i64, buyer: i64) -> Outcome {
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(BACKOFF[attempt - 1]).await;
        }
        match try_reserve(pool, product, buyer).await {
            Ok(Try::Reserved) => return Outcome::Sold,
            Ok(Try::SoldOut) => return Outcome::Refused,
            Ok(Try::Changed) => continue,
            Err(e) => return Outcome::Failed(format!("database: {e}")),
        }
    }
    Outcome::TryLater
}

async fn try_reserve(pool: &PgPool, product: i64, buyer: i64) -> Result<Try, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (stock, reserved, version): (i64, i64, i64) =
        sqlx::query_as("SELECT stock, reserved, version FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(&mut *tx)
            .await?;
    if stock - reserved < 1 {
        tx.rollback().await?;
        return Ok(Try::SoldOut);
    }
    let updated = sqlx::query(
        "UPDATE products SET reserved = reserved + 1, version = version + 1 \
         WHERE id = $1 AND version = $2",
    )
    .bind(product)
    .bind(version)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(Try::Changed);
    }
    sqlx::query("INSERT INTO reservations (product_id, buyer, quantity) VALUES ($1, $2, 1)")
        .bind(product)
        .bind(buyer)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Try::Reserved)
}

// ---------------------------------------------------------------------------------------------
// The race and its reading

/// `concurrency` clients take the next buyer from a shared counter until none is left, so at
/// most `concurrency` attempts are in flight and none waits on a slower sibling.
async fn drive<F, Fut>(skus_of: Arc<Vec<usize>>, concurrency: usize, attempt: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let attempt = Arc::new(attempt);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let (attempt, next, skus_of) = (attempt.clone(), next.clone(), skus_of.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let buyer = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&sku) = skus_of.get(buyer) else {
                        return done;
                    };
                    let sent = start.elapsed();
                    let outcome = attempt(buyer).await;
                    done.push(Attempt {
                        sku,
                        sent,
                        answered: start.elapsed(),
                        outcome,
                    });
                }
            })
        })
        .collect();
    let mut attempts = Vec::with_capacity(skus_of.len());
    for client in clients {
        attempts.extend(client.await.expect("a client task does not panic"));
    }
    Run {
        attempts,
        wall: start.elapsed(),
    }
}

/// Reads a run against the units each SKU really sold (`sold`, from the database).
///
/// A refusal is counted as made while stock remained when its SKU ended the run with units
/// unsold, or when the buyer had the refusal in hand before the last successful buyer of that
/// SKU had even sent its request: that success committed after it was sent, so the unit it took
/// was still there when the refusal was answered. The second test can miss a refusal answered
/// just before the last commit, never invent one, so the figure is a lower bound.
fn summarise(
    scenario: &Scenario,
    algorithm: &'static str,
    connections: u32,
    run: Run,
    sold: &[i64],
) -> Row {
    let mut last_success_sent = vec![Duration::ZERO; sold.len()];
    let mut last_sale = Duration::ZERO;
    let mut told_sold = vec![0i64; sold.len()];
    for a in run.attempts.iter().filter(|a| a.outcome == Outcome::Sold) {
        last_success_sent[a.sku] = last_success_sent[a.sku].max(a.sent);
        last_sale = last_sale.max(a.answered);
        told_sold[a.sku] += 1;
    }
    let refusals = run.attempts.iter().filter(|a| a.outcome.is_refusal());
    let refused_with_stock = refusals
        .clone()
        .filter(|a| sold[a.sku] < scenario.units || a.answered < last_success_sent[a.sku])
        .count();
    let oversold = sold
        .iter()
        .zip(&told_sold)
        .map(|(&db, &told)| (db.max(told) - scenario.units).max(0))
        .sum();
    if !scenario.mixed_carts && sold != told_sold.as_slice() {
        eprintln!("{algorithm}: the database and the clients disagree on units sold");
    }
    let mut failures = run
        .attempts
        .iter()
        .filter_map(|a| match &a.outcome {
            Outcome::Failed(why) => Some(why.as_str()),
            _ => None,
        })
        .peekable();
    if let Some(first) = failures.peek() {
        eprintln!("{algorithm}: first fault: {first}");
    }
    let latency = |keep: &dyn Fn(&Outcome) -> bool| {
        let mut all: Vec<Duration> = run
            .attempts
            .iter()
            .filter(|a| keep(&a.outcome))
            .map(|a| a.answered - a.sent)
            .collect();
        all.sort_unstable();
        all
    };
    let all = latency(&|_| true);
    Row {
        scenario: scenario.clone(),
        algorithm,
        connections,
        sold: sold.iter().sum(),
        refused: refusals.count(),
        gave_up: run
            .attempts
            .iter()
            .filter(|a| a.outcome == Outcome::TryLater)
            .count(),
        refused_with_stock,
        oversold,
        failed: failures.count(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        p99_sold: percentile(&latency(&|o| *o == Outcome::Sold), 0.99),
        p99_refused: percentile(&latency(&Outcome::is_refusal), 0.99),
        last_sale,
        wall: run.wall,
        audit_clean: None,
        of_ceiling: None,
    }
}

/// Nearest-rank percentile of sorted latencies; zero when there are none.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_second(row: &Row) -> f64 {
    row.scenario.buyers as f64 / row.wall.as_secs_f64()
}

fn print_json(row: &Row) {
    let value = json!({
        "scenario": row.scenario.name,
        "algorithm": row.algorithm,
        "connections": row.connections,
        "skus": row.scenario.skus,
        "units_per_sku": row.scenario.units,
        "buyers": row.scenario.buyers,
        "concurrency": row.scenario.concurrency,
        "sold": row.sold,
        "refused": row.refused,
        "gave_up": row.gave_up,
        "refused_with_stock": row.refused_with_stock,
        "oversold": row.oversold,
        "errors": row.failed,
        "p50_ms": ms(row.p50),
        "p99_ms": ms(row.p99),
        "p99_sold_ms": ms(row.p99_sold),
        "p99_refused_ms": ms(row.p99_refused),
        "last_sale_s": row.last_sale.as_secs_f64(),
        "wall_s": row.wall.as_secs_f64(),
        "requests_per_s": per_second(row),
        "audit_clean": row.audit_clean,
        "of_pgbench_ceiling": row.of_ceiling,
    });
    println!("{value}");
}

fn print_table(scenario: &Scenario, rows: &[Row], ceiling: Option<f64>) {
    println!(
        "\n{}: {} SKU(s) x {} units, {} buyers wanting 1 unit each, {} concurrent clients",
        scenario.name, scenario.skus, scenario.units, scenario.buyers, scenario.concurrency
    );
    if let Some(tps) = ceiling {
        let rows = if scenario.skus == 1 {
            "one hot row".to_owned()
        } else {
            format!("{} rows", scenario.skus)
        };
        println!("pgbench ceiling, same statements, {rows}: {tps:.0} tps");
    }
    println!(
        "{:<8} {:<20} {:>5} {:>6} {:>7} {:>7} {:>18} {:>8} {:>6} {:>6} {:>6} {:>11} {:>14} {:>11} {:>6} {:>6} {:>10}",
        "scenario",
        "algorithm",
        "conns",
        "sold",
        "refused",
        "gave_up",
        "refused_with_stock",
        "oversold",
        "errors",
        "p50_ms",
        "p99_ms",
        "p99_sold_ms",
        "p99_refused_ms",
        "last_sale_s",
        "wall_s",
        "req/s",
        "of_ceiling"
    );
    for row in rows {
        println!(
            "{:<8} {:<20} {:>5} {:>6} {:>7} {:>7} {:>18} {:>8} {:>6} {:>6.1} {:>6.1} {:>11.1} {:>14.1} {:>11.2} {:>6.2} {:>6.0} {:>10}",
            row.scenario.name,
            row.algorithm,
            row.connections,
            row.sold,
            row.refused,
            row.gave_up,
            row.refused_with_stock,
            row.oversold,
            row.failed,
            ms(row.p50),
            ms(row.p99),
            ms(row.p99_sold),
            ms(row.p99_refused),
            row.last_sale.as_secs_f64(),
            row.wall.as_secs_f64(),
            per_second(row),
            row.of_ceiling
                .map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0))
        );
    }
    for row in rows {
        if let Some(clean) = row.audit_clean {
            let verdict = if clean {
                "clean"
            } else {
                "VIOLATIONS (see stderr)"
            };
            println!("{} audit after {}: {verdict}", row.algorithm, scenario.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database's own ceiling

/// Runs `scripts/pgbench-ceiling.sh --only hot` with as many clients as the race has and reads
/// its transactions per second; `None` (with the reason on stderr) when it cannot run, so a
/// machine without pgbench still gets the other rows.
async fn pgbench_ceiling(rows: &str, clients: usize) -> Option<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbench-ceiling.sh");
    eprintln!("pgbench ceiling ({rows}): {clients} clients, 10 s");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .args(["--only", rows, "--seconds", "10", "--clients"])
        .arg(clients.to_string())
        .output()
        .await;
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "pgbench ceiling not measured: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            eprintln!("pgbench ceiling not measured: {e}");
            return None;
        }
    };
    // The line reads `<rows>  <clients> clients  <s> s  tps <tps>  failed <n> ...`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tps = stdout
        .lines()
        .filter(|line| line.starts_with(rows))
        .find_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "tps")?;
            words.next()?.parse::<f64>().ok()
        });
    if tps.is_none() {
        eprintln!("pgbench ceiling not measured: no tps in\n{stdout}");
    }
    tps
}

// ---------------------------------------------------------------------------------------------
// Databases

/// Creates an empty database with a unique name; returns its URL and its name.
async fn fresh_database(base: &str) -> (String, String) {
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/test"))
        .await
        .expect("PostgreSQL must be reachable for the benchmark");
    let name = format!("hf_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a benchmark database");
    (format!("{base}/{name}"), name)
}

/// Best effort: a database left behind costs disk, not correctness, so failure is only reported.
async fn drop_database(base: &str, name: &str) {
    let dropped = async {
        let mut admin = sqlx::PgConnection::connect(&format!("{base}/test")).await?;
        // FORCE: the server's pool may still be closing its connections.
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
    }
    .await;
    if let Err(e) = dropped {
        eprintln!("could not drop {name}: {e}");
    }
}

async fn server_version(base: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/test"))
        .await
        .expect("PostgreSQL must be reachable for the benchmark");
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut admin)
        .await
        .expect("the server reports its version");
    format!("PostgreSQL {version}")
}
