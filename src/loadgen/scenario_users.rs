//! Many concurrent shoppers, as a marketplace at its peak sees them: each shopper is a customer
//! with a keep-alive connection of its own, held for the whole run, and thinks between calls.
//! A shopper loops: list the catalogue, view a product, create a cart, set 1–3 lines, check
//! out, heartbeat, then either walk away (the reservation expires) or pay with the success card
//! and poll the order.
//!
//! With several targets shoppers are spread round-robin, and a shopper whose server stops
//! answering moves on to the next one (a balancer taking a dead instance out).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{
    complete, finish, run_tag, start_checkout_for_order, Answer, Api, Finished, Http, Journey,
    Paid, Recorder, RunOptions, Step, Summary, Target, UsersFigures, CARD_OK,
};

#[derive(Debug, Clone)]
pub struct UsersConfig {
    pub shoppers: usize,
    pub duration: Duration,
    pub skus: usize,
    pub max_stock: usize,
    pub abandon_rate: f64,
    /// Think time before each call, uniformly between these.
    pub think: (Duration, Duration),
    pub targets: Vec<Target>,
    pub server_pids: Vec<u32>,
}

/// Counters every shopper updates and the progress line reads.
#[derive(Default)]
struct Live {
    open: AtomicU64,
    peak: AtomicU64,
    reconnects: AtomicU64,
    requests: AtomicU64,
    server_errors: AtomicU64,
    transport: AtomicU64,
    /// Answers by status, 100..=599.
    statuses: Vec<AtomicU64>,
}

impl Live {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            statuses: (0..600).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        })
    }

    fn opened(&self) {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
}

/// One shopper's connection; reopened (on the next target) when it closes.
struct Conn {
    targets: Arc<Vec<(String, String)>>,
    at: AtomicU64,
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
    live: Arc<Live>,
}

impl Conn {
    fn new(targets: Arc<Vec<(String, String)>>, first: usize, live: Arc<Live>) -> Self {
        Self {
            targets,
            at: AtomicU64::new(first as u64),
            sender: Mutex::new(None),
            live,
        }
    }

    fn target(&self) -> &(String, String) {
        let n = self.targets.len().max(1) as u64;
        &self.targets[(self.at.load(Ordering::Relaxed) % n) as usize]
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let (addr, _) = self.target();
        let stream = tokio::net::TcpStream::connect(addr.as_str())
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        self.live.opened();
        let live = self.live.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            live.open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(sender)
    }

    /// A ready sender: the open connection, or a new one (moving to the next target when the
    /// old one closed or a connect fails).
    async fn ready(
        &self,
        slot: &mut Option<SendRequest<Full<Bytes>>>,
    ) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        if let Some(mut sender) = slot.take() {
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
            self.at.fetch_add(1, Ordering::Relaxed);
            self.live.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let mut last = None;
        for _ in 0..self.targets.len().max(1) {
            match self.connect().await {
                Ok(sender) => return Ok(sender),
                Err(e) => {
                    self.at.fetch_add(1, Ordering::Relaxed);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no target")))
    }
}

impl Http for Conn {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        self.send_decoded(method, path, token, body, idempotency_key, json_body)
            .await
    }
}

impl Conn {
    /// As `send`, with the answer's body read by `decode`.
    async fn send_decoded(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
        decode: fn(&[u8]) -> Value,
    ) -> anyhow::Result<Answer> {
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let mut slot = self.sender.lock().await;
            let mut sender = self.ready(&mut slot).await?;
            let (_, host) = self.target();
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, host.as_str());
            if let Some(token) = token {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            if let Some(key) = idempotency_key {
                request = request.header("idempotency-key", key);
            }
            let bytes = match body {
                Some(body) => {
                    request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                    Bytes::from(serde_json::to_vec(&body)?)
                }
                None => Bytes::new(),
            };
            let response = sender.send_request(request.body(Full::new(bytes))?).await;
            // The connection is kept for the next call unless it failed.
            let response = match response {
                Ok(r) => {
                    *slot = Some(sender);
                    r
                }
                Err(e) => return Err(anyhow::Error::from(e)),
            };
            drop(slot);
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                decode(&bytes)
            };
            anyhow::Ok(Answer { status, body })
        }
        .await;
        match &result {
            Ok(a) => {
                if let Some(n) = self.live.statuses.get(usize::from(a.status)) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                if a.status >= 500 {
                    self.live.server_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.live.transport.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

/// Any body: JSON, or else its text.
fn json_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// A catalogue page read for what a shopper looks at: `{"in_stock": [sku, ...]}`, the SKUs
/// with units available, without building the whole page as a JSON tree (that would cost the
/// load generator more CPU than the server spends answering it). Anything else: `json_body`.
fn in_stock_body(bytes: &[u8]) -> Value {
    #[derive(serde::Deserialize)]
    struct Listed {
        sku: String,
        available: i64,
    }
    #[derive(serde::Deserialize)]
    struct Page {
        data: Vec<Listed>,
    }
    match serde_json::from_slice::<Page>(bytes) {
        Ok(page) => json!({
            "in_stock": page
                .data
                .into_iter()
                .filter(|p| p.available > 0)
                .map(|p| p.sku)
                .collect::<Vec<_>>(),
        }),
        Err(_) => json_body(bytes),
    }
}

struct Shop {
    /// The run's SKUs (a catalogue page may list others).
    skus: std::collections::HashSet<String>,
    abandon_rate: f64,
    think: (Duration, Duration),
    seed: u64,
    start: Instant,
    deadline: Instant,
}

pub async fn run_users(options: &RunOptions, config: &UsersConfig) -> anyhow::Result<Summary> {
    ensure!(!config.targets.is_empty(), "no target");
    let api = Api::new(options)?;
    api.ready().await?;
    let setup_start = Instant::now();
    let tag = run_tag();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let initial: BTreeMap<String, i64> = (0..config.skus)
        .map(|i| {
            let stock = rng.gen_range(1..=config.max_stock) as i64;
            (format!("users-{tag}-{i:04}"), stock)
        })
        .collect();
    futures::stream::iter(initial.iter())
        .map(|(sku, stock)| api.create_product(sku, 100 + (*stock * 37) % 9_000, *stock))
        .buffer_unordered(options.concurrency)
        .try_collect::<()>()
        .await?;
    let customers: Vec<String> = futures::stream::iter(0..config.shoppers)
        .map(|i| {
            let api = &api;
            let tag = &tag;
            async move {
                api.create_customer(&format!("loadgen {tag} shopper {i}"))
                    .await
            }
        })
        .buffer_unordered(options.concurrency)
        .try_collect()
        .await?;
    let targets: Arc<Vec<(String, String)>> = Arc::new(
        config
            .targets
            .iter()
            .map(|t| {
                let host = t.0.host_str().unwrap_or("127.0.0.1").to_owned();
                let port = t.0.port_or_known_default().unwrap_or(80);
                (format!("{host}:{port}"), format!("{host}:{port}"))
            })
            .collect(),
    );
    let live = Live::new();
    // Every shopper connects before the clock starts: the run is at full concurrency.
    let conns: Vec<Conn> = futures::stream::iter(0..config.shoppers)
        .map(|i| {
            let conn = Conn::new(targets.clone(), i, live.clone());
            async move {
                let mut slot = conn.sender.lock().await;
                let sender = conn.ready(&mut slot).await?;
                *slot = Some(sender);
                drop(slot);
                anyhow::Ok(conn)
            }
        })
        .buffered(256)
        .try_collect()
        .await
        .context("open the shoppers' connections (raise `ulimit -n`, see docs/load.md)")?;
    let setup = setup_start.elapsed();

    let start = Instant::now();
    let shop = Arc::new(Shop {
        skus: initial.keys().cloned().collect(),
        abandon_rate: config.abandon_rate,
        think: config.think,
        seed: options.seed,
        start,
        deadline: start + config.duration,
    });
    let printer = progress(live.clone(), options.progress, config.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (conn, customer)) in conns.into_iter().zip(customers).enumerate() {
        let shop = shop.clone();
        tasks.spawn(async move { shopper(shop, i, conn, customer).await });
    }
    let mut record = Recorder::new(start);
    let mut finished_conns = Vec::with_capacity(config.shoppers);
    while let Some(done) = tasks.join_next().await {
        let (rec, conn) = done.context("a shopper failed")?;
        record.merge(rec);
        finished_conns.push(conn);
    }
    let wall = start.elapsed();
    printer.abort();
    let open_at_end = live.open.load(Ordering::Relaxed);
    let peak_rss = config
        .server_pids
        .iter()
        .filter_map(|pid| Some((*pid, peak_rss_mb(*pid)?)))
        .collect();
    drop(finished_conns);
    let by_state = api
        .call(Method::GET, "/v1/admin/ops", Some(api.admin()), None, None)
        .await
        .ok()
        .and_then(|a| serde_json::from_value(a.body["checkouts_by_state"].clone()).ok());
    let mut statuses: BTreeMap<String, u64> = live
        .statuses
        .iter()
        .enumerate()
        .filter_map(|(status, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| (status.to_string(), n))
        })
        .collect();
    let transport = live.transport.load(Ordering::Relaxed);
    if transport > 0 {
        statuses.insert("transport".to_owned(), transport);
    }
    let mut summary = finish(
        &api,
        options,
        Finished {
            scenario: "users",
            admission_gate: None,
            max_per_buyer: None,
            skus: format!(
                "users-{tag}-* ({} SKUs, {} units)",
                initial.len(),
                initial.values().sum::<i64>()
            ),
            initial,
            record,
            setup,
            wall,
            notes: Vec::new(),
            store_connections: None,
        },
    )
    .await?;
    summary.concurrency = config.shoppers;
    summary.users = Some(UsersFigures {
        shoppers: config.shoppers,
        connections_open_at_end: open_at_end,
        connections_peak: live.peak.load(Ordering::Relaxed),
        reconnects: live.reconnects.load(Ordering::Relaxed),
        statuses,
        checkouts_by_state: by_state,
        server_peak_rss_mb: peak_rss,
    });
    Ok(summary)
}

/// VmHWM of a process, in MB (Linux).
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn progress(live: Arc<Live>, enabled: bool, duration: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled {
            return;
        }
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = 0;
        loop {
            tick.tick().await;
            let requests = live.requests.load(Ordering::Relaxed);
            eprintln!(
                "[{:>4}s/{}s] connections {}, requests {requests} ({}/s), 5xx {}, transport errors {}",
                started.elapsed().as_secs(),
                duration.as_secs(),
                live.open.load(Ordering::Relaxed),
                requests - last,
                live.server_errors.load(Ordering::Relaxed),
                live.transport.load(Ordering::Relaxed),
            );
            last = requests;
        }
    })
}

impl Shop {
    /// Thinks before a call; `false` once the run is over (a journey is not cut mid-payment:
    /// only its next browse waits for the deadline).
    async fn think(&self, rng: &mut StdRng) -> bool {
        let (min, max) = self.think;
        let pause = if max > min {
            rng.gen_range(min..=max)
        } else {
            min
        };
        tokio::time::sleep(pause).await;
        Instant::now() < self.deadline
    }
}

async fn shopper(shop: Arc<Shop>, i: usize, conn: Conn, customer: String) -> (Recorder, Conn) {
    let mut rec = Recorder::new(shop.start);
    let mut rng = StdRng::seed_from_u64(shop.seed.wrapping_add(1 + i as u64));
    // Shoppers arrive spread over one think time, not all in the same millisecond.
    let first = rng.gen_range(Duration::ZERO..=shop.think.1);
    tokio::time::sleep(first).await;
    while Instant::now() < shop.deadline {
        let journey = shop_once(&shop, &mut rec, &mut rng, &conn, &customer).await;
        rec.journey(journey);
    }
    (rec, conn)
}

async fn timed_get(
    rec: &mut Recorder,
    conn: &Conn,
    label: &'static str,
    path: &str,
    decode: fn(&[u8]) -> Value,
) -> Option<Answer> {
    let call = rec
        .call(conn.send_decoded(Method::GET, path, None, None, None, decode))
        .await;
    rec.latency(label, &call);
    match call.answer() {
        Some(a) if a.status == 200 => Some(a.clone()),
        _ => {
            rec.failed(label, &call);
            None
        }
    }
}

async fn shop_once(
    shop: &Shop,
    rec: &mut Recorder,
    rng: &mut StdRng,
    conn: &Conn,
    customer: &str,
) -> Journey {
    if !shop.think(rng).await {
        return Journey::Other;
    }
    let Some(list) = timed_get(rec, conn, "list", "/v1/products?limit=500", in_stock_body).await
    else {
        return Journey::Error;
    };
    let in_stock: Vec<String> = list.body["in_stock"]
        .as_array()
        .map(|skus| {
            skus.iter()
                .filter_map(Value::as_str)
                .filter(|sku| shop.skus.contains(*sku))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let Some(viewed) = in_stock.choose(rng).cloned() else {
        // Sold out: shoppers keep browsing.
        rec.outcome("browsed_sold_out");
        return Journey::Other;
    };
    if !shop.think(rng).await {
        return Journey::Other;
    }
    if timed_get(
        rec,
        conn,
        "product",
        &format!("/v1/products/{viewed}"),
        json_body,
    )
    .await
    .is_none()
    {
        return Journey::Error;
    }
    if !shop.think(rng).await {
        return Journey::Other;
    }
    let call = rec
        .call(conn.send(Method::POST, "/v1/carts", Some(customer), None, None))
        .await;
    rec.latency("cart", &call);
    let Some(cart) = call
        .answer()
        .filter(|a| a.status == 201)
        .and_then(|a| a.str("id"))
        .map(str::to_owned)
    else {
        return rec.failed("cart", &call);
    };
    let count = rng.gen_range(1..=3usize).min(in_stock.len());
    let mut chosen: Vec<String> = vec![viewed];
    for sku in in_stock.choose_multiple(rng, count) {
        if chosen.len() < count && !chosen.contains(sku) {
            chosen.push(sku.clone());
        }
    }
    let lines: Vec<(String, i64)> = chosen.into_iter().map(|sku| (sku, 1)).collect();
    for (sku, quantity) in &lines {
        if !shop.think(rng).await {
            return Journey::Other;
        }
        let path = format!("/v1/carts/{cart}/lines/{sku}");
        let call = rec
            .call(conn.send(
                Method::PUT,
                &path,
                Some(customer),
                Some(json!({ "quantity": quantity })),
                None,
            ))
            .await;
        rec.latency("cart_line", &call);
        if call.answer().is_none_or(|a| a.status != 200) {
            return rec.failed("cart line", &call);
        }
    }
    // From the checkout on, the journey runs to its end even past the deadline: a reservation
    // is either paid or left to expire, never cut off half-way.
    let _ = shop.think(rng).await;
    let (checkout, order) =
        match start_checkout_for_order(conn, rec, customer, &cart, None, &lines).await {
            Step::Go(ids) => ids,
            Step::Stop(journey) => return journey,
        };
    let _ = shop.think(rng).await;
    let path = format!("/v1/checkouts/{checkout}/heartbeat");
    let call = rec
        .call(conn.send(Method::POST, &path, Some(customer), None, None))
        .await;
    rec.latency("heartbeat", &call);
    if call.answer().is_none_or(|a| a.status != 200) {
        rec.may_release(&lines);
        return rec.failed("heartbeat", &call);
    }
    if rng.gen_bool(shop.abandon_rate) {
        rec.outcome("abandoned");
        // Left to expire: its units come back during or after the run.
        rec.may_release(&lines);
        return Journey::Other;
    }
    let _ = shop.think(rng).await;
    match complete(conn, rec, customer, &checkout, CARD_OK, &lines).await {
        Step::Go(Paid::Completed) => {}
        Step::Go(Paid::Declined) => return Journey::Other,
        Step::Stop(journey) => return journey,
    }
    let _ = shop.think(rng).await;
    let call = rec
        .call(conn.send(
            Method::GET,
            &format!("/v1/orders/{order}"),
            Some(customer),
            None,
            None,
        ))
        .await;
    rec.latency("order", &call);
    if call.answer().is_none_or(|a| a.status != 200) {
        return rec.failed("order", &call);
    }
    Journey::Sold
}
