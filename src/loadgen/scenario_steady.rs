//! The everyday mix of DESIGN §1 and §10: a catalogue of fresh SKUs, shoppers filling carts of
//! 1–5 lines and checking out for a fixed time. Most pay, some cards are declined, some
//! checkouts are cancelled and some simply left to expire. It measures the multi-line
//! reservation path and checks that refusals happen only on SKUs that really ran out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::{StreamExt as _, TryStreamExt as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use reqwest::Method;
use serde_json::json;

use super::{
    cancel, complete, finish, run_tag, run_workers, start_checkout, Api, Finished, Journey, Paid,
    Progress, ProgressPrinter, Recorder, RunOptions, Step, Summary, CARD_DECLINED, CARD_OK,
};

/// Customers per worker. The service limits each customer's checkout and complete calls per
/// second (DESIGN §8); rotating over several keeps a fast worker a well-behaved client.
const CUSTOMERS_PER_WORKER: usize = 8;
const MAX_LINES: usize = 5;
const MAX_QUANTITY: i64 = 2;

#[derive(Debug, Clone)]
pub struct SteadyConfig {
    pub skus: usize,
    pub units_per_sku: u32,
    pub duration: Duration,
    /// Share of checkouts paid with a card that is declined.
    pub decline_rate: f64,
    /// Share of checkouts abandoned: half cancelled, half left to expire.
    pub abandon_rate: f64,
}

struct Shop {
    api: Api,
    skus: Vec<String>,
    customers: Vec<String>,
    concurrency: usize,
    duration: Duration,
    decline_rate: f64,
    abandon_rate: f64,
    seed: u64,
    progress: Arc<Progress>,
    start: Instant,
}

pub async fn run_steady(options: &RunOptions, config: &SteadyConfig) -> anyhow::Result<Summary> {
    ensure!(
        config.skus >= 1 && config.units_per_sku >= 1,
        "the catalogue needs at least one SKU with at least one unit"
    );
    ensure!(
        config.abandon_rate + config.decline_rate <= 1.0,
        "--abandon-rate and --decline-rate together must not exceed 1"
    );
    let api = Api::new(options)?;
    api.ready().await?;
    let setup_start = Instant::now();
    let tag = run_tag();
    let skus: Vec<String> = (0..config.skus)
        .map(|i| format!("steady-{tag}-{i:04}"))
        .collect();
    let units = i64::from(config.units_per_sku);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let prices: Vec<i64> = skus.iter().map(|_| rng.gen_range(100..=20_000)).collect();
    futures::stream::iter(skus.iter().zip(prices))
        .map(|(sku, price)| api.create_product(sku, price, units))
        .buffer_unordered(options.concurrency)
        .try_collect::<()>()
        .await?;
    let customers: Vec<String> =
        futures::stream::iter(0..options.concurrency * CUSTOMERS_PER_WORKER)
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
    let setup = setup_start.elapsed();

    let start = Instant::now();
    let progress = Progress::new(None, Some(config.duration));
    let printer = ProgressPrinter::start(progress.clone(), options.progress);
    let shop = Arc::new(Shop {
        api: api.clone(),
        skus: skus.clone(),
        customers,
        concurrency: options.concurrency,
        duration: config.duration,
        decline_rate: config.decline_rate,
        abandon_rate: config.abandon_rate,
        seed: options.seed,
        progress,
        start,
    });
    let connections_before = api.store_connections().await;
    let record = run_workers(options.concurrency, start, |w| {
        let shop = shop.clone();
        async move { worker(shop, w).await }
    })
    .await?;
    let wall = start.elapsed();
    printer.finish().await;
    let connections_after = api.store_connections().await;

    let label = match (skus.first(), skus.last()) {
        (Some(first), Some(last)) if skus.len() > 1 => {
            format!("{first} .. {last} ({} SKUs x {units} units)", skus.len())
        }
        _ => format!("{} ({units} units)", skus.join(", ")),
    };
    finish(
        &api,
        options,
        Finished {
            scenario: "steady",
            admission_gate: None,
            max_per_buyer: None,
            skus: label,
            initial: skus
                .into_iter()
                .map(|sku| (sku, units))
                .collect::<BTreeMap<_, _>>(),
            record,
            setup,
            wall,
            notes: Vec::new(),
            store_connections: connections_before
                .zip(connections_after)
                .map(|(before, after)| after.saturating_sub(before)),
        },
    )
    .await
}

/// Shops until the time is up; a cart in progress is finished, never cut off.
async fn worker(shop: Arc<Shop>, w: usize) -> Recorder {
    let mut rec = Recorder::new(shop.start);
    // Each worker its own stream of choices, all derived from the run's seed.
    let mut rng = StdRng::seed_from_u64(shop.seed.wrapping_add(1 + w as u64));
    let mine: Vec<&String> = shop
        .customers
        .iter()
        .skip(w)
        .step_by(shop.concurrency)
        .collect();
    let mut turn = 0;
    while shop.start.elapsed() < shop.duration {
        let Some(customer) = mine.get(turn % mine.len().max(1)) else {
            return rec;
        };
        turn += 1;
        let journey = shop_once(&shop, &mut rec, &mut rng, customer).await;
        rec.journey(journey);
        shop.progress.record(journey);
    }
    rec
}

/// One cart: fill it, check out, then pay, be declined, cancel, or walk away.
async fn shop_once(shop: &Shop, rec: &mut Recorder, rng: &mut StdRng, customer: &str) -> Journey {
    let cart = match new_cart(shop, rec, customer).await {
        Step::Go(cart) => cart,
        Step::Stop(journey) => return journey,
    };
    let count = rng.gen_range(1..=MAX_LINES.min(shop.skus.len()));
    let lines: Vec<(String, i64)> = shop
        .skus
        .choose_multiple(rng, count)
        .map(|sku| (sku.clone(), rng.gen_range(1..=MAX_QUANTITY)))
        .collect();
    for (sku, quantity) in &lines {
        let path = format!("/v1/carts/{cart}/lines/{sku}");
        let body = json!({ "quantity": quantity });
        let call = rec
            .call(
                shop.api
                    .call(Method::PUT, &path, Some(customer), Some(body), None),
            )
            .await;
        rec.latency("cart_line", &call);
        if call.answer().is_none_or(|a| a.status != 200) {
            return rec.failed("cart line", &call);
        }
    }
    let checkout = match start_checkout(&shop.api, rec, customer, &cart, None, &lines).await {
        Step::Go(id) => id,
        Step::Stop(journey) => return journey,
    };
    let fate: f64 = rng.gen();
    if fate < shop.abandon_rate {
        if rng.gen_bool(0.5) {
            return cancel(&shop.api, rec, customer, &checkout, &lines).await;
        }
        rec.outcome("abandoned");
        return Journey::Other;
    }
    let card = if fate < shop.abandon_rate + shop.decline_rate {
        CARD_DECLINED
    } else {
        CARD_OK
    };
    match complete(&shop.api, rec, customer, &checkout, card, &lines).await {
        Step::Go(Paid::Completed) => Journey::Sold,
        Step::Go(Paid::Declined) => Journey::Other,
        Step::Stop(journey) => journey,
    }
}

async fn new_cart(shop: &Shop, rec: &mut Recorder, customer: &str) -> Step<String> {
    let call = rec
        .call(
            shop.api
                .call(Method::POST, "/v1/carts", Some(customer), None, None),
        )
        .await;
    rec.latency("cart", &call);
    match call
        .answer()
        .filter(|a| a.status == 201)
        .and_then(|a| a.str("id"))
    {
        Some(id) => Step::Go(id.to_owned()),
        None => Step::Stop(rec.failed("cart", &call)),
    }
}
