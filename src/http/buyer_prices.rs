//! The catalogue as a company's buyer sees it: each product's price and volume tiers after the
//! company's price list (`domain::price_schedule`, the reservation's own rule), computed from
//! the in-memory snapshot and the company's price list held here for a moment, not from a
//! store read per request.
//!
//! Freshness: a price list is kept [`KEEP_FOR`] and dropped at once when this instance changes
//! it; another instance's change shows within [`KEEP_FOR`]. As with availability, what the
//! catalogue shows is never what is charged: the reservation prices every line itself.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::domain::{price_schedule, CompanyId, CompanyPrice};
use crate::store::{Store, StoreError};

use super::views::ProductView;

/// How long a company's price list is served without reading it again.
pub const KEEP_FOR: Duration = Duration::from_secs(1);
/// Companies whose lists are held at once; past it the map starts afresh.
const CAPACITY: usize = 10_000;

type PriceList = Arc<HashMap<String, CompanyPrice>>;

#[derive(Default)]
pub struct CompanyPrices(RwLock<HashMap<CompanyId, (Instant, PriceList)>>);

impl CompanyPrices {
    /// The company's price list by SKU.
    pub async fn of(&self, store: &dyn Store, company: CompanyId) -> Result<PriceList, StoreError> {
        if let Some((at, list)) = self.0.read().ok().and_then(|m| m.get(&company).cloned()) {
            if at.elapsed() < KEEP_FOR {
                return Ok(list);
            }
        }
        let list: PriceList = Arc::new(
            store
                .company_prices(company)
                .await?
                .into_iter()
                .map(|(sku, price)| (sku.as_str().to_owned(), price))
                .collect(),
        );
        if let Ok(mut map) = self.0.write() {
            if map.len() >= CAPACITY {
                map.clear();
            }
            map.insert(company, (Instant::now(), list.clone()));
        }
        Ok(list)
    }

    /// This instance changed the company's list: the next read loads it again.
    pub fn forget(&self, company: CompanyId) {
        if let Ok(mut map) = self.0.write() {
            map.remove(&company);
        }
    }
}

/// `view` with the price and tiers a buyer with this price list pays.
pub fn for_buyer(view: &ProductView, prices: &HashMap<String, CompanyPrice>) -> ProductView {
    let mut view = view.clone();
    let company = prices.get(view.sku.as_str());
    if let Ok((price, tiers)) = price_schedule(view.price, &view.price_tiers, company) {
        view.price = price;
        view.price_tiers = tiers;
    }
    view
}
