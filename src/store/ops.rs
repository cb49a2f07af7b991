//! What the operations page reads (DESIGN §9): checkouts by state, orders by status, the last
//! failures and compensations, and how each flash sale stands. Read-only counts over the same
//! tables the saga writes, kept in a trait of their own beside [`Store`] so the operator's view
//! can grow without touching the saga's phases. Both stores run the same statements.
//!
//! [`Store`]: super::Store

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{CheckoutId, CheckoutState, FlashSaleId, Money, OrderId, Sku};

use super::StoreError;

/// A checkout that ended without a sale, or whose money is going back: what an operator
/// looks at first when something goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRow {
    pub checkout_id: CheckoutId,
    pub order_id: OrderId,
    pub state: CheckoutState,
    pub total: Money,
    pub decline_code: Option<String>,
    pub payment_intent_id: Option<String>,
    /// A late payment whose units were gone: the money is due back (a compensation).
    pub refund_due: bool,
    /// The order's refund as the gateway last reported it: `pending`, `failed` (the money did
    /// not go back: an operator's case) or `succeeded`; `None` before any refund.
    pub refund_status: Option<String>,
    /// The gateway's refund, to look it up there.
    pub refund_id: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// A flash sale as the database sees it: checkouts holding one of its units now, and units
/// paid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashSaleRow {
    pub id: FlashSaleId,
    pub sku: Sku,
    pub units: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
    pub in_checkout: i64,
    pub sold: i64,
}

#[async_trait]
pub trait OpsStore: Send + Sync {
    /// Every checkout state that occurs, with its count.
    async fn checkouts_by_state(&self) -> Result<BTreeMap<String, i64>, StoreError>;
    /// Every order status that occurs, with its count.
    async fn orders_by_status(&self) -> Result<BTreeMap<String, i64>, StoreError>;
    /// The last `limit` failed, cancelled, expired or refunded checkouts, those with money
    /// due back and those whose refund is pending or failed at the gateway, newest first.
    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailureRow>, StoreError>;
    /// The last `limit` flash sales, newest first.
    async fn flash_sale_stats(&self, limit: u32) -> Result<Vec<FlashSaleRow>, StoreError>;
}

pub(crate) const CHECKOUTS_BY_STATE_SQL: &str =
    "SELECT state AS name, COUNT(*) AS n FROM checkouts GROUP BY state";

pub(crate) const ORDERS_BY_STATUS_SQL: &str =
    "SELECT status AS name, COUNT(*) AS n FROM orders GROUP BY status";

pub(crate) const RECENT_FAILURES_SQL: &str = "SELECT c.id, c.order_id, c.state, \
     c.total_amount, c.currency, c.decline_code, c.payment_intent_id, c.refund_due, \
     c.refund_id, o.refund_status, c.updated_at FROM checkouts c \
     LEFT JOIN orders o ON o.id = c.order_id \
     WHERE c.state IN ('payment_failed', 'cancelled', 'expired', 'refunded') OR c.refund_due \
        OR o.refund_status IN ('pending', 'failed') \
     ORDER BY c.updated_at DESC LIMIT $1";

pub(crate) const FLASH_SALE_STATS_SQL: &str = "SELECT f.id, f.sku, f.units, f.starts_at, \
     f.ends_at, \
     (SELECT COUNT(*) FROM checkouts c WHERE c.flash_sale_id = f.id \
        AND c.state IN ('reserved', 'charging', 'requires_action')) AS in_checkout, \
     (SELECT CAST(COALESCE(SUM(r.quantity), 0) AS BIGINT) FROM reservations r \
        JOIN checkouts c ON c.id = r.checkout_id \
        WHERE c.flash_sale_id = f.id AND r.product_id = f.product_id \
          AND r.status = 'confirmed') AS sold \
     FROM flash_sales f ORDER BY f.created_at DESC LIMIT $1";

/// Decodes the rows of the statements above; both stores select the same columns.
macro_rules! ops_decoders {
    ($row:ty) => {
        fn counts(rows: &[$row]) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
            use sqlx::Row as _;
            rows.iter()
                .map(|row| Ok((row.try_get("name")?, row.try_get("n")?)))
                .collect()
        }

        fn failure(row: &$row) -> Result<$crate::store::FailureRow, StoreError> {
            use sqlx::Row as _;
            let state: String = row.try_get("state")?;
            let currency: String = row.try_get("currency")?;
            let currency = $crate::domain::Currency::parse(&currency)
                .map_err(|_| StoreError::Corrupt(format!("currency {currency:?}")))?;
            Ok($crate::store::FailureRow {
                checkout_id: $crate::domain::CheckoutId::from_uuid(row.try_get("id")?),
                order_id: $crate::domain::OrderId::from_uuid(row.try_get("order_id")?),
                state: $crate::domain::CheckoutState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("checkout state {state:?}")))?,
                total: $crate::domain::Money::new(row.try_get("total_amount")?, currency)?,
                decline_code: row.try_get("decline_code")?,
                payment_intent_id: row.try_get("payment_intent_id")?,
                refund_due: row.try_get("refund_due")?,
                refund_status: row.try_get("refund_status")?,
                refund_id: row.try_get("refund_id")?,
                updated_at: $crate::store::from_millis(row.try_get("updated_at")?)?,
            })
        }

        fn flash_sale_row(row: &$row) -> Result<$crate::store::FlashSaleRow, StoreError> {
            use sqlx::Row as _;
            let sku: String = row.try_get("sku")?;
            let ends_at: Option<i64> = row.try_get("ends_at")?;
            Ok($crate::store::FlashSaleRow {
                id: $crate::domain::FlashSaleId::from_uuid(row.try_get("id")?),
                sku: $crate::domain::Sku::parse(&sku)
                    .map_err(|_| StoreError::Corrupt(format!("sku {sku:?}")))?,
                units: row.try_get("units")?,
                starts_at: $crate::store::from_millis(row.try_get("starts_at")?)?,
                ends_at: ends_at.map($crate::store::from_millis).transpose()?,
                in_checkout: row.try_get("in_checkout")?,
                sold: row.try_get("sold")?,
            })
        }
    };
}
pub(crate) use ops_decoders;
