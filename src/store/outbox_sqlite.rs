//! The outbox on SQLite, the embedded shape (promise 5). The store's single connection
//! serialises every statement, so a claim needs no row locks; consumer records are
//! `INSERT ... ON CONFLICT DO NOTHING` on the event id, so a redelivery is a no-op. Same
//! statements as the PostgreSQL file, in the same order.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row as _;

use crate::domain::{CustomerId, EventId, OrderId};

use super::outbox::{in_outbox_order, lag, outbox_event_decoder, OUTBOX_COLUMNS};
use super::{to_millis, OutboxEvent, OutboxLag, OutboxStore, SqliteStore, StoreError};

outbox_event_decoder!(SqliteRow);

#[async_trait]
impl OutboxStore for SqliteStore {
    #[tracing::instrument(skip_all)]
    async fn claim_outbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET claimed_until = $2 \
             WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL \
                            AND (claimed_until IS NULL OR claimed_until < $1) \
                          ORDER BY id LIMIT $3) \
             RETURNING {OUTBOX_COLUMNS}"
        ))
        .bind(to_millis(now))
        .bind(to_millis(now + lease))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        let events = rows.iter().map(outbox_event).collect::<Result<_, _>>()?;
        Ok(in_outbox_order(events))
    }

    async fn mark_published(
        &self,
        event_ids: &[EventId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        // No arrays in SQLite: one statement per event, all in one transaction.
        let mut tx = self.pool().begin().await?;
        let mut marked = 0;
        for id in event_ids {
            marked += sqlx::query(
                "UPDATE outbox SET published_at = $2, claimed_until = NULL \
                 WHERE event_id = $1 AND published_at IS NULL",
            )
            .bind(id.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(marked)
    }

    async fn release_outbox(
        &self,
        event_ids: &[EventId],
        claimed_until: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut released = 0;
        for id in event_ids {
            released += sqlx::query(
                "UPDATE outbox SET claimed_until = NULL \
                 WHERE event_id = $1 AND published_at IS NULL AND claimed_until = $2",
            )
            .bind(id.uuid())
            .bind(to_millis(claimed_until))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(released)
    }

    async fn record_allocation(
        &self,
        event_id: EventId,
        order_id: OrderId,
        lines_json: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO warehouse_allocations (event_id, order_id, lines, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id.uuid())
        .bind(order_id.uuid())
        .bind(lines_json)
        .bind(to_millis(now))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_notification(
        &self,
        event_id: EventId,
        customer_id: CustomerId,
        order_id: OrderId,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO notifications (event_id, customer_id, order_id, message, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id.uuid())
        .bind(customer_id.uuid())
        .bind(order_id.uuid())
        .bind(message)
        .bind(to_millis(now))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn outbox_lag(&self, now: DateTime<Utc>) -> Result<OutboxLag, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS unpublished, MIN(created_at) AS oldest \
             FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(lag(
            row.try_get("unpublished")?,
            row.try_get("oldest")?,
            now,
        ))
    }

    async fn allocations_for(&self, order_id: OrderId) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM warehouse_allocations WHERE order_id = $1")
                .bind(order_id.uuid())
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn notifications_for(&self, order_id: OrderId) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE order_id = $1")
                .bind(order_id.uuid())
                .fetch_one(self.pool())
                .await?,
        )
    }
}
