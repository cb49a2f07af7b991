//! The operations page's reads on PostgreSQL: plain reads at read committed; each count is one statement, so it is a consistent snapshot of its own table.
//! Same statements as the other store's file, in the same order.

use async_trait::async_trait;
use sqlx::postgres::PgRow;

use super::ops::{
    ops_decoders, CHECKOUTS_BY_STATE_SQL, FLASH_SALE_STATS_SQL, ORDERS_BY_STATUS_SQL,
    RECENT_FAILURES_SQL,
};
use super::{FailureRow, FlashSaleRow, OpsStore, PgStore, StoreError};

ops_decoders!(PgRow);

#[async_trait]
impl OpsStore for PgStore {
    async fn checkouts_by_state(
        &self,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query(CHECKOUTS_BY_STATE_SQL)
            .fetch_all(self.pool())
            .await?;
        counts(&rows)
    }

    async fn orders_by_status(
        &self,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query(ORDERS_BY_STATUS_SQL)
            .fetch_all(self.pool())
            .await?;
        counts(&rows)
    }

    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailureRow>, StoreError> {
        let rows = sqlx::query(RECENT_FAILURES_SQL)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(failure).collect()
    }

    async fn flash_sale_stats(&self, limit: u32) -> Result<Vec<FlashSaleRow>, StoreError> {
        let rows = sqlx::query(FLASH_SALE_STATS_SQL)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(flash_sale_row).collect()
    }
}
