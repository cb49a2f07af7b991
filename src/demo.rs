//! `holdfast serve --demo`: a newcomer sees a living shop at once. At start, an empty
//! catalogue is filled with a few dozen made-up products in EUR (one with a single unit, to
//! show a sell-out) and a flash sale opens on one of them. A catalogue that already holds
//! anything is left alone, so restarting a demo never duplicates or resets it.
//!
//! Wholesale: a case-pack product (by 6, at least 6, volume tiers) and a company on net-30
//! terms with a price list, so `serve --demo` shows buyers' prices, ordering rules and orders
//! on account (create a buyer with `POST /v1/admin/customers {name, company_id}`).

use chrono::{DateTime, Duration, Utc};

use crate::domain::{
    CompanyId, CompanyPrice, Currency, CustomerName, FlashSaleId, Money, NewCompany, NewFlashSale,
    NewProduct, OrderingRules, PaymentTerms, PriceTier, PriceTiers, ProductName, Sku, StockLevel,
};
use crate::store::{Store, StoreError};

/// Who the seeded stock changes are recorded as (the audit reads actors).
const DEMO_ACTOR: &str = "demo";

const ADJECTIVES: [(&str, &str); 3] =
    [("alder", "Alder"), ("cobalt", "Cobalt"), ("ember", "Ember")];

/// Noun, SKU stem and base price in cents.
const GOODS: [(&str, &str, i64); 12] = [
    ("Tea Tin", "tea", 450),
    ("Coffee Mug", "mug", 1290),
    ("Notebook", "notebook", 890),
    ("Fountain Pen", "pen", 3450),
    ("Desk Lamp", "lamp", 5900),
    ("Wool Scarf", "scarf", 3900),
    ("Canvas Tote", "tote", 1850),
    ("Water Bottle", "bottle", 2290),
    ("Cutting Board", "board", 2750),
    ("Candle", "candle", 1490),
    ("Plant Pot", "pot", 1690),
    ("Headphones", "headphones", 8900),
];

/// The SKU with a single unit, and the flash-sale SKU.
pub const LAST_UNIT_SKU: &str = "ember-headphones";
pub const FLASH_SALE_SKU: &str = "cobalt-lamp";

/// What `seed` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seeded {
    pub products: usize,
    pub flash_sale: bool,
    /// The wholesale company, with its price list.
    pub company: Option<CompanyId>,
}

/// The case-pack SKU and the wholesale company of the demo.
pub const CASE_SKU: &str = "case-glasses";
pub const COMPANY_NAME: &str = "Grand Hotels (demo)";

/// A case-pack product and a company on net-30 terms whose price list takes 10 % off it and
/// sells the tea at a fixed price.
async fn seed_wholesale(
    store: &dyn Store,
    eur: Currency,
    now: DateTime<Utc>,
) -> Result<CompanyId, StoreError> {
    let invalid = |e: crate::domain::WholesaleError| StoreError::InvalidProduct(e.to_string());
    let tier = |min_quantity, amount| PriceTier {
        min_quantity,
        amount,
    };
    let case = NewProduct {
        sku: Sku::parse(CASE_SKU).expect("a demo SKU"),
        name: ProductName::parse("Wine Glasses, case of 6").expect("a demo name"),
        price: Money::new(1200, eur)?,
        stock: StockLevel::new(600).expect("demo stock is positive"),
        rules: OrderingRules::new(6, 6, Some(120)).map_err(invalid)?,
        price_tiers: PriceTiers::new(vec![tier(24, 1050), tier(60, 950)]).map_err(invalid)?,
    };
    store.create_product(&case, DEMO_ACTOR, now).await?;
    let company = store
        .create_company(
            &NewCompany {
                name: CustomerName::parse(COMPANY_NAME).expect("a demo name"),
                currency: eur,
                payment_terms: PaymentTerms::Net30,
                credit_limit: 500_000,
                po_number_required: false,
                capture_method: None,
            },
            now,
        )
        .await?;
    let ten_off = CompanyPrice::new(None, Some(10), PriceTiers::default()).map_err(invalid)?;
    store
        .set_company_price(company.id, &case.sku, &ten_off, now)
        .await?;
    let tea = CompanyPrice::new(Some(380), None, PriceTiers::default()).map_err(invalid)?;
    store
        .set_company_price(
            company.id,
            &Sku::parse("alder-tea").expect("a demo SKU"),
            &tea,
            now,
        )
        .await?;
    Ok(company.id)
}

/// The demo catalogue, if the catalogue is empty. Prices vary a little by finish; stock runs
/// from a handful to a few dozen.
pub async fn seed(store: &dyn Store, now: DateTime<Utc>) -> Result<Seeded, StoreError> {
    if !store.list_products(None, 1).await?.items.is_empty() {
        return Ok(Seeded::default());
    }
    let eur = Currency::parse("EUR").expect("EUR is a currency");
    let mut seeded = Seeded::default();
    for (i, (adjective_sku, adjective)) in ADJECTIVES.iter().enumerate() {
        for (j, (noun, stem, price)) in GOODS.iter().enumerate() {
            let sku = format!("{adjective_sku}-{stem}");
            let stock = if sku == LAST_UNIT_SKU {
                1
            } else {
                5 + ((i * 7 + j * 11) % 40) as i64
            };
            let product = NewProduct {
                sku: Sku::parse(&sku).expect("demo SKUs are valid"),
                name: ProductName::parse(&format!("{adjective} {noun}"))
                    .expect("demo names are valid"),
                price: Money::new(price + 100 * i as i64, eur)?,
                stock: StockLevel::new(stock).expect("demo stock is positive"),
                rules: Default::default(),
                price_tiers: Default::default(),
            };
            store.create_product(&product, DEMO_ACTOR, now).await?;
            seeded.products += 1;
        }
    }
    seeded.company = Some(seed_wholesale(store, eur, now).await?);
    seeded.products += 1;
    let sale = NewFlashSale {
        id: FlashSaleId::new(),
        sku: Sku::parse(FLASH_SALE_SKU).expect("a demo SKU"),
        units: 5,
        max_per_buyer: 1,
        starts_at: now,
        ends_at: None,
        reservation_ttl: Duration::minutes(5),
    };
    match store.create_flash_sale(&sale, now).await {
        Ok(_) => seeded.flash_sale = true,
        // A demo without its sale is still a demo; say why and go on.
        Err(e) => tracing::warn!(error = %e, "demo flash sale not opened"),
    }
    Ok(seeded)
}
