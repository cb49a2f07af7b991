//! A flash sale: `units` of one SKU sold behind the admission gate, from `starts_at` until
//! `ends_at`, with its own (short) reservation window (DESIGN §5).

use chrono::{DateTime, Duration, Utc};

use super::{FlashSaleId, Sku};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashSale {
    pub id: FlashSaleId,
    pub sku: Sku,
    pub units: u32,
    /// Units one buyer may buy over the whole sale (DESIGN §5; 1 unless the admin says more).
    pub max_per_buyer: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
    pub reservation_ttl: Duration,
}

impl FlashSale {
    /// Whether the sale governs its SKU at `now` (buyers of the SKU need a token).
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        now >= self.starts_at && self.ends_at.is_none_or(|end| now < end)
    }
}

#[derive(Debug, Clone)]
pub struct NewFlashSale {
    pub id: FlashSaleId,
    pub sku: Sku,
    pub units: u32,
    /// Units one buyer may buy over the whole sale (DESIGN §5; 1 unless the admin says more).
    pub max_per_buyer: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
    pub reservation_ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sale_is_open_from_its_start_until_its_end() {
        let start = DateTime::from_timestamp(1_000, 0).unwrap();
        let sale = FlashSale {
            id: FlashSaleId::new(),
            sku: Sku::parse("hot").unwrap(),
            units: 1,
            max_per_buyer: 1,
            starts_at: start,
            ends_at: Some(start + Duration::seconds(10)),
            reservation_ttl: Duration::seconds(300),
        };
        assert!(!sale.is_open(start - Duration::seconds(1)));
        assert!(sale.is_open(start));
        assert!(sale.is_open(start + Duration::seconds(9)));
        assert!(!sale.is_open(start + Duration::seconds(10)));
    }
}
