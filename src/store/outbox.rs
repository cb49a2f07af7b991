//! The outbox side of the store (promise 5): the relay claims unpublished events with a lease
//! and marks them published; the two shipped consumers record what they did, deduplicated by
//! event id, so a redelivered event changes nothing. A trait of its own, beside [`Store`], so
//! the saga's phases and the delivery machinery can grow without touching each other.
//!
//! [`Store`]: super::Store

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use crate::domain::{CustomerId, EventId, OrderId};

use super::StoreError;

/// One row of the outbox as the relay hands it to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Position in the outbox: the relay publishes a claim in this order.
    pub id: i64,
    pub event_id: EventId,
    /// What happened, e.g. `order.paid`; the NATS subject is `<prefix>.<topic>`.
    pub topic: String,
    pub order_id: OrderId,
    /// The event as JSON text, exactly as the saga wrote it.
    pub payload: String,
    pub created_at: DateTime<Utc>,
}

/// How far delivery is behind, for the operations page and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLag {
    pub unpublished: i64,
    /// Age of the oldest unpublished event; `None` when everything is published.
    pub oldest_unpublished_age: Option<Duration>,
}

#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Claims up to `limit` unpublished events that no live lease holds, in outbox order, and
    /// leases them until `now + lease`. Several relays may call this at once: no row is handed
    /// to two of them while its lease lives, and a crashed relay's claim simply runs out.
    async fn claim_outbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Records that these events reached the sink; returns how many rows changed.
    async fn mark_published(
        &self,
        event_ids: &[EventId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Hands back this relay's claim on events it did not publish (the sink failed), so the
    /// next tick tries them again at once instead of after the lease. Only a claim still held
    /// until `claimed_until` (this relay's) is released; returns how many rows changed.
    async fn release_outbox(
        &self,
        event_ids: &[EventId],
        claimed_until: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// The warehouse consumer's allocation; `false` when this event was already recorded.
    async fn record_allocation(
        &self,
        event_id: EventId,
        order_id: OrderId,
        lines_json: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// The notification consumer's message; `false` when this event was already recorded.
    async fn record_notification(
        &self,
        event_id: EventId,
        customer_id: CustomerId,
        order_id: OrderId,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    async fn outbox_lag(&self, now: DateTime<Utc>) -> Result<OutboxLag, StoreError>;

    /// Allocations recorded for an order: exactly one per paid order once delivered.
    async fn allocations_for(&self, order_id: OrderId) -> Result<i64, StoreError>;

    /// Notifications recorded for an order: exactly one per paid order once delivered.
    async fn notifications_for(&self, order_id: OrderId) -> Result<i64, StoreError>;
}

pub(crate) const OUTBOX_COLUMNS: &str = "id, event_id, topic, order_id, payload, created_at";

/// The lag from the count and the oldest creation time of unpublished rows; a row stamped
/// ahead of `now` (clocks of two instances disagree) counts as age zero.
pub(crate) fn lag(
    unpublished: i64,
    oldest_created_at: Option<i64>,
    now: DateTime<Utc>,
) -> OutboxLag {
    OutboxLag {
        unpublished,
        oldest_unpublished_age: oldest_created_at.map(|created| {
            Duration::milliseconds(super::to_millis(now).saturating_sub(created).max(0))
        }),
    }
}

/// A claim comes back from `UPDATE ... RETURNING` in no promised order; the relay publishes
/// in outbox order.
pub(crate) fn in_outbox_order(mut events: Vec<OutboxEvent>) -> Vec<OutboxEvent> {
    events.sort_by_key(|e| e.id);
    events
}

/// Decodes an outbox row; both stores select [`OUTBOX_COLUMNS`].
macro_rules! outbox_event_decoder {
    ($row:ty) => {
        fn outbox_event(row: &$row) -> Result<$crate::store::OutboxEvent, StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::OutboxEvent {
                id: row.try_get("id")?,
                event_id: $crate::domain::EventId::from_uuid(row.try_get("event_id")?),
                topic: row.try_get("topic")?,
                order_id: $crate::domain::OrderId::from_uuid(row.try_get("order_id")?),
                payload: row.try_get("payload")?,
                created_at: $crate::store::from_millis(row.try_get("created_at")?)?,
            })
        }
    };
}
pub(crate) use outbox_event_decoder;
