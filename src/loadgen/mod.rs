//! `holdfast loadgen`: replays a flash sale or a steady shopping mix against a running holdfast
//! over its public API (DESIGN §8), as buyers would, and reports what happened in the terms of
//! the promises (DESIGN §2): units sold against units on offer, buyers refused while stock
//! remained, errors, latency per call type and throughput (DESIGN §10), then the audit.
//!
//! It only ever talks to this machine: a load generator pointed at someone else's shop is an
//! attack, so `--target` must be a loopback address.
//!
//! "Refused while stock remained" (promise 2) is judged from the outside, so it is a lower
//! bound that cannot accuse the service wrongly: a refusal counts when every SKU it was short
//! of ended the run with at least the units asked for available, and no unit of that SKU was
//! handed back (declined card, cancel, or an answer whose effect is unknown) after the refusal
//! was sent. Availability only grows through hand-backs, so such a refusal was given while the
//! units were there.

mod report;
mod scenario_flash;
mod scenario_steady;
mod scenario_users;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use reqwest::{Method, Url};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditOptions};
use crate::config::Settings;
use crate::payments::PaymentGateway;
use crate::store::Store;

pub use report::{AuditOutcome, LatencyStats, Summary, UsersFigures};
pub use scenario_flash::{run_flash_sale, FlashSaleConfig};
pub use scenario_steady::{run_steady, SteadyConfig};
pub use scenario_users::{run_users, UsersConfig};

/// The simulator's test cards (DESIGN §8): one that pays, one that is declined.
pub const CARD_OK: &str = "pm_card_visa";
pub const CARD_DECLINED: &str = "pm_card_chargeDeclined";

/// Most errors a run keeps verbatim for the summary.
const ERROR_SAMPLES: usize = 5;

/// `holdfast loadgen ...`
#[derive(Debug, Clone, PartialEq, Args)]
pub struct LoadgenArgs {
    #[command(subcommand)]
    pub scenario: ScenarioArgs,

    /// Base URL of the running holdfast; only loopback hosts (127.0.0.0/8, localhost, [::1]).
    #[arg(
        long,
        env = "HOLDFAST_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub target: String,

    /// Buyers in flight at once (the worker pool, and the HTTP connection pool).
    #[arg(long, env = "HOLDFAST_LOADGEN_CONCURRENCY", default_value_t = 64, value_parser = parse_concurrency, global = true)]
    pub concurrency: usize,

    /// Seed for who declines or abandons and what goes into carts; unset = random (printed).
    #[arg(long, env = "HOLDFAST_LOADGEN_SEED", global = true)]
    pub seed: Option<u64>,

    /// Print the summary as one JSON object.
    #[arg(long, env = "HOLDFAST_LOADGEN_JSON", global = true)]
    pub json: bool,

    /// Whether `--database-url` or `--data-dir` was given, so the audit can open the store
    /// (set from the parsed command line, see [`store_flags_given`]).
    #[arg(skip)]
    pub store_flags_given: bool,
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum ScenarioArgs {
    /// Buyers chase the units of one fresh SKU, through the admission gate when the server
    /// has one.
    FlashSale(FlashSaleArgs),
    /// A catalogue of fresh SKUs; carts of 1-5 lines checked out for a while.
    Steady(SteadyArgs),
    /// Many concurrent shoppers, each on a keep-alive connection of its own, browsing,
    /// filling carts and checking out with think time between calls.
    Users(UsersArgs),
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct UsersArgs {
    /// Concurrent shoppers, each a customer with a connection of its own. Needs an open-file
    /// limit above this on both sides (`ulimit -n`, see docs/load.md).
    #[arg(long, env = "HOLDFAST_LOADGEN_SHOPPERS", default_value_t = 8000, value_parser = parse_positive)]
    pub shoppers: usize,
    /// How long to shop once every shopper is connected, e.g. `60s`.
    #[arg(long, env = "HOLDFAST_LOADGEN_DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// SKUs in the catalogue, each with a random stock of 1 to `--max-stock` units.
    #[arg(long, env = "HOLDFAST_LOADGEN_SKUS", default_value_t = 200, value_parser = parse_positive)]
    pub skus: usize,
    #[arg(long, env = "HOLDFAST_LOADGEN_MAX_STOCK", default_value_t = 50, value_parser = parse_positive)]
    pub max_stock: usize,
    /// Share of checkouts left unpaid after reserving (they expire).
    #[arg(long, env = "HOLDFAST_LOADGEN_ABANDON_RATE", default_value_t = 0.3, value_parser = parse_rate)]
    pub abandon_rate: f64,
    /// Think time before each call, drawn between these (e.g. `1s`, `4s`).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub think_min: Duration,
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub think_max: Duration,
    /// Several servers, comma-separated, shoppers spread round-robin (and moving on to the
    /// next when theirs stops answering); overrides `--target`.
    #[arg(long, env = "HOLDFAST_LOADGEN_TARGETS", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Server processes whose peak resident memory the summary reports (Linux `/proc`).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct FlashSaleArgs {
    /// Buyers, each a customer of their own.
    #[arg(long, env = "HOLDFAST_LOADGEN_BUYERS", default_value_t = 5000, value_parser = parse_positive)]
    pub buyers: usize,
    /// Units on sale.
    #[arg(long, env = "HOLDFAST_LOADGEN_UNITS", default_value_t = 100, value_parser = parse_positive)]
    pub units: usize,
    /// Share of buyers who check out and never pay.
    #[arg(long, env = "HOLDFAST_LOADGEN_ABANDON_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub abandon_rate: f64,
    /// Share of buyers whose first card is declined (they try once more with a good one).
    #[arg(long, env = "HOLDFAST_LOADGEN_DECLINE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub decline_rate: f64,
    /// Units one buyer may buy in the sale (`max_per_buyer`); each buyer's cart holds one.
    #[arg(long, env = "HOLDFAST_LOADGEN_MAX_PER_BUYER", default_value_t = 1, value_parser = parse_positive)]
    pub max_per_buyer: usize,
    /// Open no flash sale: every buyer goes straight to checkout, so the run can be compared
    /// with the gated one.
    #[arg(long, env = "HOLDFAST_LOADGEN_NO_GATE")]
    pub no_gate: bool,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct SteadyArgs {
    /// SKUs in the catalogue, 100 units each.
    #[arg(long, env = "HOLDFAST_LOADGEN_SKUS", default_value_t = 200, value_parser = parse_positive)]
    pub skus: usize,
    /// How long to shop, e.g. `30s`, `2m`, `500ms`.
    #[arg(long, env = "HOLDFAST_LOADGEN_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Share of checkouts paid with a card that is declined.
    #[arg(long, env = "HOLDFAST_LOADGEN_DECLINE_RATE", default_value_t = 0.08, value_parser = parse_rate)]
    pub decline_rate: f64,
    /// Share of checkouts abandoned: half cancelled, half simply left to expire.
    #[arg(long, env = "HOLDFAST_LOADGEN_ABANDON_RATE", default_value_t = 0.12, value_parser = parse_rate)]
    pub abandon_rate: f64,
}

fn parse_positive(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number of at least 1".to_owned()),
    }
}

fn parse_concurrency(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n @ 1..=4096) => Ok(n),
        _ => Err("must be between 1 and 4096".to_owned()),
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("must be a fraction between 0 and 1".to_owned()),
    }
}

/// `30s`, `2m`, `500ms`, or plain seconds.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 2m or 500ms"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{raw:?}: the unit must be ms, s or m")),
    };
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// Whether the command line or environment named a store, so the audit may open it. The
/// data directory has a default, and auditing the default directory when the server runs on
/// PostgreSQL would report on the wrong store; only an explicit choice counts.
pub fn store_flags_given(matches: &clap::ArgMatches) -> bool {
    use clap::parser::ValueSource;
    ["database_url", "data_dir"].into_iter().any(|id| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("--target {0:?} is not an http(s) URL")]
    NotAUrl(String),
    #[error("--target must be on this machine (127.0.0.0/8, localhost or [::1]), not {0:?}")]
    NotLoopback(String),
}

/// A base URL on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(Url);

impl Target {
    pub fn parse(raw: &str) -> Result<Self, TargetError> {
        let url = Url::parse(raw).map_err(|_| TargetError::NotAUrl(raw.to_owned()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TargetError::NotAUrl(raw.to_owned()));
        }
        // The URL parser has already normalised the host (`127.1` is `127.0.0.1`); IPv6
        // hosts keep their brackets.
        let host = url.host_str().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(TargetError::NotLoopback(host.to_owned()));
        }
        Ok(Self(url))
    }

    fn base(&self) -> String {
        self.0.as_str().trim_end_matches('/').to_owned()
    }
}

/// The store and gateway the audit reads at the end of a run.
#[derive(Clone)]
pub struct AuditTarget {
    pub store: Arc<dyn Store>,
    /// Promise 3 is checked against this gateway's ledger; `None` skips it.
    pub gateway: Option<Arc<dyn PaymentGateway>>,
}

/// What both scenarios share.
#[derive(Clone)]
pub struct RunOptions {
    pub target: Target,
    pub admin_token: SecretString,
    pub concurrency: usize,
    pub seed: u64,
    /// A progress line on stderr every second.
    pub progress: bool,
    pub audit: Option<AuditTarget>,
}

/// `holdfast loadgen`: set up, run, print, and exit 1 on oversell or a failed audit.
pub async fn run(args: LoadgenArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let target = Target::parse(&args.target)?;
    let admin_token = admin_token(settings)?;
    // Open the store before the load, so a wrong flag fails in a second, not after the run.
    let audit = if args.store_flags_given {
        let store = crate::startup::open_existing_store(settings).await?;
        // As `holdfast audit`: the simulator's ledger lives in the serving process, so
        // promise 3 is checked only against a real Stripe account.
        let (gateway, simulator) = crate::startup::payment_gateway(settings)?;
        Some(AuditTarget {
            store,
            gateway: simulator.is_none().then_some(gateway),
        })
    } else {
        None
    };
    let options = RunOptions {
        target,
        admin_token,
        concurrency: args.concurrency,
        seed: args.seed.unwrap_or_else(rand::random),
        progress: true,
        audit,
    };
    let summary = match args.scenario {
        ScenarioArgs::FlashSale(a) => {
            let config = FlashSaleConfig {
                buyers: a.buyers,
                units: a.units,
                abandon_rate: a.abandon_rate,
                decline_rate: a.decline_rate,
                gate: !a.no_gate,
                max_per_buyer: a.max_per_buyer,
            };
            run_flash_sale(&options, &config).await?
        }
        ScenarioArgs::Steady(a) => {
            let config = SteadyConfig {
                skus: a.skus,
                units_per_sku: 100,
                duration: a.duration,
                decline_rate: a.decline_rate,
                abandon_rate: a.abandon_rate,
            };
            run_steady(&options, &config).await?
        }
        ScenarioArgs::Users(a) => {
            let targets = if a.targets.is_empty() {
                vec![options.target.clone()]
            } else {
                a.targets
                    .iter()
                    .map(|t| Target::parse(t))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let config = UsersConfig {
                shoppers: a.shoppers,
                duration: a.duration,
                skus: a.skus,
                max_stock: a.max_stock,
                abandon_rate: a.abandon_rate,
                think: (a.think_min, a.think_max.max(a.think_min)),
                targets,
                server_pids: a.server_pid,
            };
            run_users(&options, &config).await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(if summary.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The admin token as the server finds it: the flag or environment, else the file the server
/// generated in its data directory.
fn admin_token(settings: &Settings) -> anyhow::Result<SecretString> {
    if let Some(token) = &settings.admin_token {
        return Ok(token.clone());
    }
    let path = settings.data_dir.join("admin-token");
    read_token(&path).with_context(|| {
        format!(
            "no admin token: pass --admin-token (or HOLDFAST_ADMIN_TOKEN), or the server's \
             --data-dir so {} can be read",
            path.display()
        )
    })
}

fn read_token(path: &Path) -> anyhow::Result<SecretString> {
    let raw = std::fs::read_to_string(path)?;
    let token = raw.trim();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(SecretString::from(token.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// The HTTP side.

/// How often a final read that found the store saturated (`503`) is asked again, 1 s apart.
const SATURATED_READS: u32 = 60;

/// One answer, read whole. A body that is not JSON is kept as a string for error samples.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn str(&self, field: &str) -> Option<&str> {
        self.body[field].as_str()
    }

    fn brief(&self) -> String {
        let mut body = self.body.to_string();
        body.truncate(300);
        format!("{} {body}", self.status)
    }
}

/// Whatever sends a journey's calls: the pooled [`Api`], or one shopper's own connection.
pub(crate) trait Http {
    fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Answer>> + Send;
}

impl Http for Api {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        Ok(self
            .call(method, path, token, body, idempotency_key)
            .await?)
    }
}

/// The service's public API, as a client with a connection pool sized to the concurrency.
#[derive(Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
    admin_token: SecretString,
}

impl Api {
    pub fn new(options: &RunOptions) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(options.concurrency)
            .tcp_nodelay(true)
            // Loopback only: a proxy from the environment must not carry the load elsewhere.
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            base: options.target.base(),
            admin_token: options.admin_token.clone(),
        })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, reqwest::Error> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { status, body })
    }

    async fn expect(
        &self,
        what: &str,
        want: u16,
        request: impl Future<Output = Result<Answer, reqwest::Error>>,
    ) -> anyhow::Result<Answer> {
        let answer = request
            .await
            .with_context(|| format!("{what}: cannot reach holdfast at {}", self.base))?;
        if answer.status == 401 && answer.code() == "unauthorized" {
            bail!("{what}: the admin token was refused; pass the server's --admin-token or --data-dir");
        }
        if answer.status != want {
            bail!("{what}: expected {want}, got {}", answer.brief());
        }
        Ok(answer)
    }

    pub fn admin(&self) -> &str {
        self.admin_token.expose_secret()
    }

    /// The server's `holdfast_store_connections_total`, or `None` if `/metrics` does not
    /// have it (the count is per server process).
    pub async fn store_connections(&self) -> Option<u64> {
        let answer = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?;
        let text = answer.text().await.ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("holdfast_store_connections_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map(|value| value as u64)
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        self.expect(
            "readiness",
            200,
            self.call(Method::GET, "/readyz", None, None, None),
        )
        .await
        .map(drop)
    }

    /// A new customer's bearer token.
    pub async fn create_customer(&self, name: &str) -> anyhow::Result<String> {
        let body = json!({ "name": name });
        let answer = self
            .expect(
                "create a customer",
                201,
                self.call(
                    Method::POST,
                    "/v1/admin/customers",
                    Some(self.admin()),
                    Some(body),
                    None,
                ),
            )
            .await?;
        answer
            .str("token")
            .map(str::to_owned)
            .context("create a customer: the answer has no token")
    }

    pub async fn create_product(&self, sku: &str, price: i64, stock: i64) -> anyhow::Result<()> {
        let body = json!({
            "sku": sku,
            "name": format!("Load test {sku}"),
            "price": { "amount": price, "currency": "EUR" },
            "stock": stock,
        });
        self.expect(
            "create a product",
            201,
            self.call(
                Method::POST,
                "/v1/admin/products",
                Some(self.admin()),
                Some(body),
                None,
            ),
        )
        .await
        .map(drop)
    }

    pub async fn create_cart(&self, customer: &str) -> anyhow::Result<String> {
        let answer = self
            .expect(
                "create a cart",
                201,
                self.call(Method::POST, "/v1/carts", Some(customer), None, None),
            )
            .await?;
        answer
            .str("id")
            .map(str::to_owned)
            .context("create a cart: the answer has no id")
    }

    pub async fn set_line(
        &self,
        customer: &str,
        cart: &str,
        sku: &str,
        quantity: i64,
    ) -> anyhow::Result<()> {
        let path = format!("/v1/carts/{cart}/lines/{sku}");
        let body = json!({ "quantity": quantity });
        self.expect(
            "put a cart line",
            200,
            self.call(Method::PUT, &path, Some(customer), Some(body), None),
        )
        .await
        .map(drop)
    }

    /// A SKU's stock, reserved and available units as the admin sees them now.
    pub async fn stock_of(&self, sku: &str) -> anyhow::Result<StockAtEnd> {
        let path = format!("/v1/admin/products/{sku}");
        // The run's tail may still saturate the store: `503` (with `Retry-After`) is asked again,
        // a bounded number of times, instead of ending the run without its figures.
        let mut saturated = 0;
        let answer = loop {
            let call = self
                .call(Method::GET, &path, Some(self.admin()), None, None)
                .await;
            if matches!(&call, Ok(a) if a.status == 503) && saturated < SATURATED_READS {
                saturated += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            break self
                .expect("read a product", 200, std::future::ready(call))
                .await?;
        };
        let number = |field: &str| {
            answer.body[field]
                .as_i64()
                .with_context(|| format!("read a product: no {field} in {}", answer.brief()))
        };
        Ok(StockAtEnd {
            stock: number("stock")?,
            reserved: number("reserved")?,
            available: number("available")?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StockAtEnd {
    pub stock: i64,
    pub reserved: i64,
    pub available: i64,
}

/// A short random tag that makes this run's SKUs and customer names its own.
pub(crate) fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

// ---------------------------------------------------------------------------------------------
// Recording.

/// How a buyer's journey ended, for the progress line and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Journey {
    Sold,
    Refused,
    Error,
    /// Abandoned, declined, or left waiting on the payment.
    Other,
}

/// What a step of a journey hands on: go on with a value, or the journey ends here.
pub(crate) enum Step<T> {
    Go(T),
    Stop(Journey),
}

/// One timed HTTP call; times are since the start of the timed phase.
pub(crate) struct Call {
    pub result: Result<Answer, anyhow::Error>,
    pub sent: Duration,
    pub received: Duration,
}

impl Call {
    pub fn answer(&self) -> Option<&Answer> {
        self.result.as_ref().ok()
    }
}

/// A refusal for stock: when it was sent and what it was short of.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub sent: Duration,
    pub short: Vec<(String, i64)>,
}

/// One worker's record; workers merge theirs at the end, so the hot path takes no lock.
pub(crate) struct Recorder {
    start: Instant,
    pub latencies: BTreeMap<&'static str, Vec<Duration>>,
    pub outcomes: BTreeMap<String, u64>,
    pub sold: BTreeMap<String, i64>,
    pub refusals: Vec<Refusal>,
    /// Per SKU, the latest moment a unit may have been handed back.
    pub last_release: BTreeMap<String, Duration>,
    pub requests: u64,
    pub attempts: u64,
    pub refused: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            latencies: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            sold: BTreeMap::new(),
            refusals: Vec::new(),
            last_release: BTreeMap::new(),
            requests: 0,
            attempts: 0,
            refused: 0,
            errors: 0,
            error_samples: Vec::new(),
        }
    }

    pub async fn call<E: Into<anyhow::Error>>(
        &mut self,
        request: impl Future<Output = Result<Answer, E>>,
    ) -> Call {
        let sent = self.start.elapsed();
        let result = request.await.map_err(Into::into);
        let received = self.start.elapsed();
        self.requests += 1;
        Call {
            result,
            sent,
            received,
        }
    }

    pub fn latency(&mut self, label: &'static str, call: &Call) {
        self.latencies
            .entry(label)
            .or_default()
            .push(call.received.saturating_sub(call.sent));
    }

    pub fn outcome(&mut self, kind: &str) {
        *self.outcomes.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn sold(&mut self, lines: &[(String, i64)]) {
        for (sku, quantity) in lines {
            *self.sold.entry(sku.clone()).or_default() += quantity;
        }
    }

    pub fn refused(&mut self, kind: &str, sent: Duration, short: Vec<(String, i64)>) {
        self.outcome(kind);
        self.refusals.push(Refusal { sent, short });
    }

    /// Units of these lines went back to stock by `at`.
    pub fn released(&mut self, lines: &[(String, i64)], at: Duration) {
        for (sku, _) in lines {
            let latest = self.last_release.entry(sku.clone()).or_default();
            *latest = (*latest).max(at);
        }
    }

    /// These lines may go back to stock at any time, even after the run (a payment still in
    /// flight, a call whose effect is unknown): no refusal of theirs is counted as false.
    pub fn may_release(&mut self, lines: &[(String, i64)]) {
        self.released(lines, Duration::MAX);
    }

    /// Records an answer outside the journey's happy and refused paths.
    pub fn failed(&mut self, what: &str, call: &Call) -> Journey {
        let kind = match &call.result {
            Err(_) => "transport".to_owned(),
            Ok(a) if a.status == 429 => "rate_limited".to_owned(),
            Ok(a) if a.status >= 500 => "http_5xx".to_owned(),
            Ok(a) => format!("http_{}_{}", a.status, a.code()),
        };
        self.outcome(&kind);
        if self.error_samples.len() < ERROR_SAMPLES {
            let detail = match &call.result {
                Err(e) => format!("{e:#}"),
                Ok(a) => a.brief(),
            };
            self.error_samples.push(format!("{what}: {detail}"));
        }
        Journey::Error
    }

    pub fn journey(&mut self, journey: Journey) {
        self.attempts += 1;
        match journey {
            Journey::Refused => self.refused += 1,
            Journey::Error => self.errors += 1,
            Journey::Sold | Journey::Other => {}
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        for (label, mut samples) in other.latencies {
            self.latencies
                .entry(label)
                .or_default()
                .append(&mut samples);
        }
        for (kind, n) in other.outcomes {
            *self.outcomes.entry(kind).or_default() += n;
        }
        for (sku, n) in other.sold {
            *self.sold.entry(sku).or_default() += n;
        }
        for (sku, at) in other.last_release {
            let latest = self.last_release.entry(sku).or_default();
            *latest = (*latest).max(at);
        }
        self.refusals.extend(other.refusals);
        self.requests += other.requests;
        self.attempts += other.attempts;
        self.refused += other.refused;
        self.errors += other.errors;
        for sample in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES {
                self.error_samples.push(sample);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The calls a journey makes.

/// `POST /v1/checkouts`: the checkout id, or the journey ends refused or failed.
pub(crate) async fn start_checkout(
    api: &impl Http,
    rec: &mut Recorder,
    customer: &str,
    cart: &str,
    flash_sale_token: Option<&str>,
    lines: &[(String, i64)],
) -> Step<String> {
    match start_checkout_for_order(api, rec, customer, cart, flash_sale_token, lines).await {
        Step::Go((id, _)) => Step::Go(id),
        Step::Stop(journey) => Step::Stop(journey),
    }
}

/// [`start_checkout`], answering the order id too.
pub(crate) async fn start_checkout_for_order(
    api: &impl Http,
    rec: &mut Recorder,
    customer: &str,
    cart: &str,
    flash_sale_token: Option<&str>,
    lines: &[(String, i64)],
) -> Step<(String, String)> {
    let body = match flash_sale_token {
        Some(token) => json!({ "cart_id": cart, "flash_sale_token": token }),
        None => json!({ "cart_id": cart }),
    };
    let call = rec
        .call(api.send(
            Method::POST,
            "/v1/checkouts",
            Some(customer),
            Some(body),
            None,
        ))
        .await;
    match call.answer() {
        Some(a) if a.status == 201 => {
            rec.latency("checkout", &call);
            match a.str("id").zip(a.str("order_id")) {
                Some((id, order)) => Step::Go((id.to_owned(), order.to_owned())),
                None => Step::Stop(rec.failed("checkout", &call)),
            }
        }
        Some(a) if a.status == 409 && a.code() == "insufficient_stock" => {
            rec.latency("checkout_refused", &call);
            let short = shortfalls(a).unwrap_or_else(|| lines.to_vec());
            rec.refused("insufficient_stock", call.sent, short);
            Step::Stop(Journey::Refused)
        }
        _ => {
            rec.latency("checkout", &call);
            // The reservation may have been made; its units stay held until it expires, so
            // they are not available at the end and no refusal is judged on them wrongly.
            Step::Stop(rec.failed("checkout", &call))
        }
    }
}

/// The SKUs and quantities an `insufficient_stock` answer says were short.
fn shortfalls(answer: &Answer) -> Option<Vec<(String, i64)>> {
    let details = answer.body["error"]["details"].as_array()?;
    let short: Vec<(String, i64)> = details
        .iter()
        .filter_map(|d| Some((d["sku"].as_str()?.to_owned(), d["requested"].as_i64()?)))
        .collect();
    (!short.is_empty()).then_some(short)
}

/// What paying answered, when the journey goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Paid {
    Completed,
    Declined,
}

/// `POST /v1/checkouts/{id}/complete` with a fresh Idempotency-Key.
pub(crate) async fn complete(
    api: &impl Http,
    rec: &mut Recorder,
    customer: &str,
    checkout: &str,
    payment_method: &str,
    lines: &[(String, i64)],
) -> Step<Paid> {
    let path = format!("/v1/checkouts/{checkout}/complete");
    // One completion per checkout, so the checkout id makes the key unique.
    let key = format!("loadgen-{checkout}");
    let body = json!({ "payment_method": payment_method });
    let call = rec
        .call(api.send(Method::POST, &path, Some(customer), Some(body), Some(&key)))
        .await;
    rec.latency("complete", &call);
    let state = call
        .answer()
        .filter(|a| a.status == 200)
        .and_then(|a| a.str("state"))
        .map(str::to_owned);
    match state.as_deref() {
        Some("completed") => {
            rec.outcome("completed");
            rec.sold(lines);
            Step::Go(Paid::Completed)
        }
        Some("payment_failed") => {
            rec.outcome("payment_failed");
            rec.released(lines, call.received);
            Step::Go(Paid::Declined)
        }
        Some(other) => {
            // requires_action, charging: the payment is still in flight.
            rec.outcome(other);
            rec.may_release(lines);
            Step::Stop(Journey::Other)
        }
        None => {
            rec.may_release(lines);
            Step::Stop(rec.failed("complete", &call))
        }
    }
}

/// `POST /v1/checkouts/{id}/cancel`: the buyer changes their mind and says so.
pub(crate) async fn cancel(
    api: &impl Http,
    rec: &mut Recorder,
    customer: &str,
    checkout: &str,
    lines: &[(String, i64)],
) -> Journey {
    let path = format!("/v1/checkouts/{checkout}/cancel");
    let call = rec
        .call(api.send(Method::POST, &path, Some(customer), None, None))
        .await;
    rec.latency("cancel", &call);
    match call.answer() {
        Some(a) if a.status == 200 => {
            rec.outcome("cancelled");
            rec.released(lines, call.received);
            Journey::Other
        }
        _ => {
            rec.may_release(lines);
            rec.failed("cancel", &call)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Progress, the worker pool and the end of a run.

/// Counters the progress line reads while workers run.
pub(crate) struct Progress {
    total: Option<u64>,
    deadline: Option<Duration>,
    done: AtomicU64,
    ok: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

impl Progress {
    pub fn new(total: Option<u64>, deadline: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            total,
            deadline,
            done: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub fn record(&self, journey: Journey) {
        self.done.fetch_add(1, Ordering::Relaxed);
        let counter = match journey {
            Journey::Sold => &self.ok,
            Journey::Refused => &self.refused,
            Journey::Error => &self.errors,
            Journey::Other => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, elapsed: Duration, rate: u64) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let of = match (self.total, self.deadline) {
            (Some(total), _) => format!("{done}/{total}"),
            (None, Some(d)) => format!("{done} ({}/{} s)", elapsed.as_secs(), d.as_secs()),
            (None, None) => done.to_string(),
        };
        format!(
            "[{:>4}s] {of} done, ok {}, refused {}, errors {}, {rate}/s",
            elapsed.as_secs(),
            self.ok.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Prints a progress line on stderr every second until dropped or stopped.
pub(crate) struct ProgressPrinter {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressPrinter {
    pub fn start(progress: Arc<Progress>, enabled: bool) -> Self {
        let stop = CancellationToken::new();
        let task = enabled.then(|| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let mut last = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let done = progress.done.load(Ordering::Relaxed);
                    eprintln!("{}", progress.line(started.elapsed(), done - last));
                    last = done;
                }
            })
        });
        Self { stop, task }
    }

    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Runs `concurrency` workers as tasks (so the client's JSON work spreads over the cores)
/// and merges their records.
pub(crate) async fn run_workers<F, Fut>(
    concurrency: usize,
    start: Instant,
    worker: F,
) -> anyhow::Result<Recorder>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Recorder> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        tasks.spawn(worker(w));
    }
    let mut all = Recorder::new(start);
    while let Some(done) = tasks.join_next().await {
        all.merge(done.context("a load worker failed")?);
    }
    Ok(all)
}

/// Everything a scenario hands to [`finish`].
pub(crate) struct Finished {
    pub scenario: &'static str,
    pub admission_gate: Option<bool>,
    pub max_per_buyer: Option<u32>,
    pub skus: String,
    /// Units each of the run's SKUs started with.
    pub initial: BTreeMap<String, i64>,
    pub record: Recorder,
    pub setup: Duration,
    pub wall: Duration,
    pub notes: Vec<String>,
    /// Connections the server's store took during the timed phase, when it says.
    pub store_connections: Option<u64>,
}

/// Reads the stock left, judges the refusals, runs the audit, and builds the summary.
pub(crate) async fn finish(
    api: &Api,
    options: &RunOptions,
    run: Finished,
) -> anyhow::Result<Summary> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let concurrency = options.concurrency.min(16);
    let end: BTreeMap<String, StockAtEnd> = futures::stream::iter(run.initial.keys().cloned())
        .map(|sku| async move {
            let stock = api.stock_of(&sku).await?;
            anyhow::Ok((sku, stock))
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let record = run.record;
    let refused_with_stock = record
        .refusals
        .iter()
        .filter(|r| refused_while_available(r, &end, &record.last_release))
        .count() as u64;
    let mut notes = run.notes;
    let mut sold_by_service = 0;
    let mut reserved_at_end = 0;
    let mut oversold = 0;
    for (sku, initial) in &run.initial {
        let Some(now) = end.get(sku) else { continue };
        let by_service = initial - now.stock;
        let by_client = record.sold.get(sku).copied().unwrap_or(0);
        sold_by_service += by_service;
        reserved_at_end += now.reserved;
        oversold += (by_service.max(by_client) - initial).max(0);
        if by_client > by_service {
            notes.push(format!(
                "{sku}: buyers were told {by_client} units were sold, the service counts {by_service}"
            ));
        }
    }
    let sold: i64 = record.sold.values().sum();
    let audit = run_audit(options.audit.as_ref()).await?;
    let wall = run.wall.as_secs_f64();
    let per_second = |n: u64| {
        if wall > 0.0 {
            (n as f64 / wall).round()
        } else {
            0.0
        }
    };
    Ok(Summary {
        scenario: run.scenario,
        target: options.target.base(),
        admission_gate: run.admission_gate,
        max_per_buyer: run.max_per_buyer,
        concurrency: options.concurrency,
        seed: options.seed,
        skus: run.skus,
        units: run.initial.values().sum(),
        attempts: record.attempts,
        sold,
        sold_by_service,
        reserved_at_end,
        refused: record.refused,
        refused_with_stock,
        oversold,
        errors: record.errors,
        outcomes: record.outcomes,
        latency: record
            .latencies
            .into_iter()
            .filter_map(|(label, samples)| Some((label.to_owned(), LatencyStats::of(samples)?)))
            .collect(),
        setup_seconds: run.setup.as_secs_f64(),
        wall_seconds: wall,
        attempts_per_second: per_second(record.attempts),
        requests: record.requests,
        requests_per_second: per_second(record.requests),
        error_samples: record.error_samples,
        notes,
        store_connections: run.store_connections,
        users: None,
        audit,
    })
}

/// A refusal proven false: every SKU it was short of ended with the units asked for, and
/// none of them was handed back after the refusal was sent (see the module comment).
fn refused_while_available(
    refusal: &Refusal,
    end: &BTreeMap<String, StockAtEnd>,
    last_release: &BTreeMap<String, Duration>,
) -> bool {
    !refusal.short.is_empty()
        && refusal.short.iter().all(|(sku, wanted)| {
            let available = end.get(sku).is_some_and(|s| s.available >= *wanted);
            let no_hand_back_since = last_release
                .get(sku)
                .is_none_or(|released| *released < refusal.sent);
            available && no_hand_back_since
        })
}

async fn run_audit(target: Option<&AuditTarget>) -> anyhow::Result<AuditOutcome> {
    let Some(target) = target else {
        return Ok(AuditOutcome::Skipped {
            how_to_run: "no store flags; pass the server's --database-url (or --data-dir for the \
                         embedded store) to run it here, or run `holdfast audit --database-url \
                         postgres://...` (`holdfast audit --data-dir DIR` for SQLite)"
                .to_owned(),
        });
    };
    let options = AuditOptions {
        gateway: target.gateway.as_deref(),
        ..AuditOptions::default()
    };
    let report = audit::run_with(target.store.as_ref(), options)
        .await
        .context("the audit cannot read the store")?;
    let text = report.to_string();
    Ok(if report.is_clean() {
        AuditOutcome::Clean { report: text }
    } else {
        AuditOutcome::Violations {
            count: report.violations().count(),
            report: text,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3",
            "http://localhost:9000/",
            "https://LOCALHOST",
            "http://[::1]:8080",
        ] {
            assert!(Target::parse(ok).is_ok(), "{ok}");
        }
        for far in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://localhost.example.com",
            "http://[::2]:8080",
            "http://0.0.0.0:8080",
        ] {
            assert!(
                matches!(Target::parse(far), Err(TargetError::NotLoopback(_))),
                "{far}"
            );
        }
        for junk in ["127.0.0.1:8080", "ftp://127.0.0.1", "not a url"] {
            assert!(
                matches!(Target::parse(junk), Err(TargetError::NotAUrl(_))),
                "{junk}"
            );
        }
    }

    fn matches(args: &[&str]) -> clap::ArgMatches {
        use clap::CommandFactory as _;
        crate::config::Cli::command()
            .try_get_matches_from(args)
            .expect("the command line parses")
    }

    #[test]
    fn the_command_line_reaches_the_scenario_flags() {
        use clap::FromArgMatches as _;
        let m = matches(&[
            "holdfast",
            "loadgen",
            "flash-sale",
            "--buyers",
            "300",
            "--units",
            "20",
            "--concurrency",
            "16",
            "--decline-rate",
            "0.1",
            "--max-per-buyer",
            "2",
            "--json",
        ]);
        let cli = crate::config::Cli::from_arg_matches(&m).expect("a command");
        let Some(crate::config::Command::Loadgen(args)) = cli.command else {
            panic!("not loadgen: {:?}", cli.command);
        };
        assert_eq!((args.concurrency, args.json), (16, true));
        assert_eq!(args.target, "http://127.0.0.1:8080");
        assert_eq!(
            args.scenario,
            ScenarioArgs::FlashSale(FlashSaleArgs {
                buyers: 300,
                units: 20,
                abandon_rate: 0.0,
                decline_rate: 0.1,
                max_per_buyer: 2,
                no_gate: false,
            })
        );
    }

    #[test]
    fn only_a_store_named_on_the_command_line_is_audited() {
        assert!(!store_flags_given(&matches(&[
            "holdfast", "loadgen", "steady"
        ])));
        assert!(store_flags_given(&matches(&[
            "holdfast",
            "loadgen",
            "steady",
            "--data-dir",
            "somewhere",
        ])));
        assert!(store_flags_given(&matches(&[
            "holdfast",
            "--database-url",
            "postgres://root@127.0.0.1/x",
            "loadgen",
            "flash-sale",
        ])));
    }

    #[test]
    fn durations_take_a_unit_and_must_be_positive() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn rates_are_fractions() {
        assert_eq!(parse_rate("0.1"), Ok(0.1));
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("-0.1").is_err());
    }

    fn stock(available: i64) -> StockAtEnd {
        StockAtEnd {
            stock: 10,
            reserved: 10 - available,
            available,
        }
    }

    #[test]
    fn a_refusal_is_false_only_if_units_were_left_and_none_came_back_after_it() {
        let refusal = Refusal {
            sent: Duration::from_millis(100),
            short: vec![("hot".to_owned(), 1)],
        };
        let left = BTreeMap::from([("hot".to_owned(), stock(1))]);
        let none_left = BTreeMap::from([("hot".to_owned(), stock(0))]);
        let never = BTreeMap::new();
        let before = BTreeMap::from([("hot".to_owned(), Duration::from_millis(50))]);
        let after = BTreeMap::from([("hot".to_owned(), Duration::from_millis(150))]);

        assert!(refused_while_available(&refusal, &left, &never));
        assert!(refused_while_available(&refusal, &left, &before));
        assert!(!refused_while_available(&refusal, &left, &after));
        assert!(!refused_while_available(&refusal, &none_left, &never));
    }
}
