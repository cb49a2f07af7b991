//! `holdfast serve --demo`: a newcomer sees a living shop at once. At start, an empty
//! catalogue is filled with a few dozen made-up products in EUR (one with a single unit, to
//! show a sell-out) and a flash sale opens on one of them. A catalogue that already holds
//! anything is left alone, so restarting a demo never duplicates or resets it.

use chrono::{DateTime, Duration, Utc};

use crate::domain::{
    Currency, FlashSaleId, Money, NewFlashSale, NewProduct, ProductName, Sku, StockLevel,
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
