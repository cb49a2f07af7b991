//! The flash sale of DESIGN §1 and §5: many buyers, each a customer of their own, chase the
//! few units of one fresh SKU at once. It shows whether the service sells exactly the units
//! it has (promises 1 and 2) and how fast it answers the buyers it turns away.
//!
//! On a server with the flash-sale routes, buyers take an admission token first and check out
//! with it. A server without them answers `404 route_not_found` when the sale is opened; then
//! every buyer goes straight to checkout, and the summary says so.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::SeedableRng as _;
use reqwest::Method;
use serde_json::json;

use super::{
    complete, finish, run_tag, run_workers, start_checkout, Api, Finished, Journey, Paid, Progress,
    ProgressPrinter, Recorder, RunOptions, Step, Summary, CARD_DECLINED, CARD_OK,
};

/// Price of the sale's SKU, in cents: any price will do, it only has to be real.
const PRICE: i64 = 1999;

#[derive(Debug, Clone)]
pub struct FlashSaleConfig {
    pub buyers: usize,
    pub units: usize,
    /// Share of buyers who reserve and never pay.
    pub abandon_rate: f64,
    /// Share of buyers whose first card is declined; they then try once more with a good
    /// card, as buyers do, so a declined card hands its unit to the next buyer rather than
    /// ending the sale short.
    pub decline_rate: f64,
    /// Open a flash sale and send buyers through its admission gate (`false`: straight to
    /// checkout, for comparison).
    pub gate: bool,
    /// Units one buyer may buy (the sale's `max_per_buyer`).
    pub max_per_buyer: usize,
}

/// What one buyer will do once they hold a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Pay,
    DeclineThenPay,
    Abandon,
}

/// Exactly `round(rate × buyers)` of each kind, shuffled by the seed.
fn plans(config: &FlashSaleConfig, seed: u64) -> Vec<Plan> {
    let n = config.buyers;
    let count = |rate: f64| ((n as f64 * rate).round() as usize).min(n);
    let declines = count(config.decline_rate);
    let abandons = count(config.abandon_rate).min(n - declines);
    let mut plans = vec![Plan::Pay; n];
    plans[..declines].fill(Plan::DeclineThenPay);
    plans[declines..declines + abandons].fill(Plan::Abandon);
    plans.shuffle(&mut StdRng::seed_from_u64(seed));
    plans
}

struct Buyer {
    token: String,
    cart: String,
}

struct Sale {
    api: Api,
    sku: String,
    /// The flash sale's id when the server has the admission gate.
    gate: Option<String>,
    buyers: Vec<Buyer>,
    plans: Vec<Plan>,
    next: AtomicUsize,
    progress: Arc<Progress>,
    start: Instant,
}

pub async fn run_flash_sale(
    options: &RunOptions,
    config: &FlashSaleConfig,
) -> anyhow::Result<Summary> {
    ensure!(
        config.buyers >= 1 && config.units >= 1,
        "a flash sale needs at least one buyer and one unit"
    );
    ensure!(
        config.abandon_rate + config.decline_rate <= 1.0,
        "--abandon-rate and --decline-rate together must not exceed 1"
    );
    let api = Api::new(options)?;
    api.ready().await?;
    let setup_start = Instant::now();
    let tag = run_tag();
    let sku = format!("flash-{tag}");
    let units = i64::try_from(config.units).context("--units is too large")?;
    api.create_product(&sku, PRICE, units).await?;
    let buyers = set_up_buyers(&api, options, &tag, &sku, config.buyers).await?;
    // The sale opens once every buyer stands ready, as a sale opens at its announced time.
    let gate = if config.gate {
        open_sale(&api, &sku, config.units, config.max_per_buyer).await?
    } else {
        None
    };
    let mut notes = Vec::new();
    if !config.gate {
        notes.push("--no-gate: no flash sale, every buyer went straight to checkout".to_owned());
    } else if gate.is_none() {
        notes.push(
            "the server has no flash-sale routes (POST /v1/admin/flash-sales answered 404 \
             route_not_found): no admission gate, every buyer went straight to checkout"
                .to_owned(),
        );
    }
    let setup = setup_start.elapsed();

    let connections_before = api.store_connections().await;
    let start = Instant::now();
    let progress = Progress::new(Some(config.buyers as u64), None);
    let printer = ProgressPrinter::start(progress.clone(), options.progress);
    let sale = Arc::new(Sale {
        api: api.clone(),
        sku: sku.clone(),
        gate: gate.clone(),
        buyers,
        plans: plans(config, options.seed),
        next: AtomicUsize::new(0),
        progress,
        start,
    });
    let record = run_workers(options.concurrency, start, |_| {
        let sale = sale.clone();
        async move { worker(sale).await }
    })
    .await?;
    let wall = start.elapsed();
    printer.finish().await;
    let connections_after = api.store_connections().await;

    finish(
        &api,
        options,
        Finished {
            scenario: "flash-sale",
            admission_gate: Some(gate.is_some()),
            max_per_buyer: gate
                .is_some()
                .then(|| u32::try_from(config.max_per_buyer).unwrap_or(u32::MAX)),
            skus: sku.clone(),
            initial: BTreeMap::from([(sku, units)]),
            record,
            setup,
            wall,
            notes,
            store_connections: connections_before
                .zip(connections_after)
                .map(|(before, after)| after.saturating_sub(before)),
        },
    )
    .await
}

/// Every buyer a customer of their own with the SKU in their cart; not timed.
async fn set_up_buyers(
    api: &Api,
    options: &RunOptions,
    tag: &str,
    sku: &str,
    count: usize,
) -> anyhow::Result<Vec<Buyer>> {
    futures::stream::iter(0..count)
        .map(|i| async move {
            let token = api
                .create_customer(&format!("loadgen {tag} buyer {i}"))
                .await?;
            let cart = api.create_cart(&token).await?;
            api.set_line(&token, &cart, sku, 1).await?;
            anyhow::Ok(Buyer { token, cart })
        })
        .buffer_unordered(options.concurrency)
        .try_collect()
        .await
}

/// Opens the sale behind the admission gate: its id, or `None` on a server without the
/// flash-sale routes.
async fn open_sale(
    api: &Api,
    sku: &str,
    units: usize,
    max_per_buyer: usize,
) -> anyhow::Result<Option<String>> {
    let body = json!({ "sku": sku, "units": units, "max_per_buyer": max_per_buyer });
    let answer = api
        .call(
            Method::POST,
            "/v1/admin/flash-sales",
            Some(api.admin()),
            Some(body),
            None,
        )
        .await
        .context("open the flash sale")?;
    match answer.status {
        200 | 201 => answer
            .str("id")
            .map(|id| Some(id.to_owned()))
            .context("open the flash sale: the answer has no id"),
        404 if answer.code() == "route_not_found" => Ok(None),
        _ => bail!("open the flash sale: expected 201, got {}", answer.brief()),
    }
}

async fn worker(sale: Arc<Sale>) -> Recorder {
    let mut rec = Recorder::new(sale.start);
    loop {
        let i = sale.next.fetch_add(1, Ordering::Relaxed);
        let (Some(buyer), Some(plan)) = (sale.buyers.get(i), sale.plans.get(i)) else {
            return rec;
        };
        let journey = buy(&sale, &mut rec, buyer, *plan).await;
        rec.journey(journey);
        sale.progress.record(journey);
    }
}

/// One buyer: (token,) checkout, then pay, abandon, or be declined and pay again.
async fn buy(sale: &Sale, rec: &mut Recorder, buyer: &Buyer, plan: Plan) -> Journey {
    let lines = [(sale.sku.clone(), 1)];
    let mut card = match plan {
        Plan::DeclineThenPay => CARD_DECLINED,
        Plan::Pay | Plan::Abandon => CARD_OK,
    };
    loop {
        let admission = match &sale.gate {
            Some(id) => match take_token(sale, rec, buyer, id).await {
                Step::Go(token) => Some(token),
                Step::Stop(journey) => return journey,
            },
            None => None,
        };
        let checkout = match start_checkout(
            &sale.api,
            rec,
            &buyer.token,
            &buyer.cart,
            admission.as_deref(),
            &lines,
        )
        .await
        {
            Step::Go(id) => id,
            Step::Stop(journey) => return journey,
        };
        if plan == Plan::Abandon {
            rec.outcome("abandoned");
            return Journey::Other;
        }
        match complete(&sale.api, rec, &buyer.token, &checkout, card, &lines).await {
            Step::Go(Paid::Completed) => return Journey::Sold,
            // The declined checkout handed its unit (and token) back and reopened the cart.
            Step::Go(Paid::Declined) if card == CARD_DECLINED => card = CARD_OK,
            Step::Go(Paid::Declined) => return Journey::Other,
            Step::Stop(journey) => return journey,
        }
    }
}

/// `POST /v1/flash-sales/{id}/tokens`: an admission token, or "sold out".
async fn take_token(sale: &Sale, rec: &mut Recorder, buyer: &Buyer, id: &str) -> Step<String> {
    let path = format!("/v1/flash-sales/{id}/tokens");
    let call = rec
        .call(
            sale.api
                .call(Method::POST, &path, Some(&buyer.token), None, None),
        )
        .await;
    match call.answer() {
        Some(a) if matches!(a.status, 200 | 201) => {
            rec.latency("token", &call);
            match a.str("token") {
                Some(token) => Step::Go(token.to_owned()),
                None => Step::Stop(rec.failed("token", &call)),
            }
        }
        Some(a) if a.status == 409 && a.code() == "sold_out" => {
            rec.latency("token_sold_out", &call);
            rec.refused("sold_out", call.sent, vec![(sale.sku.clone(), 1)]);
            Step::Stop(Journey::Refused)
        }
        _ => {
            rec.latency("token", &call);
            Step::Stop(rec.failed("token", &call))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_hold_exact_shares_and_follow_the_seed() {
        let config = FlashSaleConfig {
            buyers: 1000,
            units: 10,
            abandon_rate: 0.05,
            decline_rate: 0.1,
            gate: true,
            max_per_buyer: 1,
        };
        let a = plans(&config, 7);
        let count = |p: Plan| a.iter().filter(|x| **x == p).count();
        assert_eq!(
            (
                count(Plan::DeclineThenPay),
                count(Plan::Abandon),
                count(Plan::Pay)
            ),
            (100, 50, 850)
        );
        assert_eq!(a, plans(&config, 7));
        assert_ne!(a, plans(&config, 8));
    }
}
