//! Fulfilment events (promise 5). The saga writes one `order.paid` row into the outbox in the
//! transaction that marks the order paid; from there the [`Relay`] delivers it at least once to
//! an [`EventSink`] (NATS JetStream in production, the consumers themselves in the embedded
//! shape), and each consumer deduplicates by event id, so "at least once" ends as "exactly
//! once" in what the consumers record.
//!
//! - [`relay`]: claims outbox rows with a lease, publishes them in order, marks them published.
//! - [`consumers`]: the warehouse and notification consumers that ship with the product.
//! - [`in_process`]: the embedded shape's sink, running both consumers directly.
//! - [`nats`]: the production sink (JetStream, `Nats-Msg-Id` dedupe) and its pull consumers.

pub mod consumers;
pub mod in_process;
pub mod nats;
pub mod relay;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{CheckoutId, CustomerId, EventId, Money, OrderId, OrderLine};
use crate::store::{OutboxEvent, StoreError};

pub use consumers::{Consumer, Notification, Warehouse};
pub use in_process::InProcessSink;
pub use nats::{NatsConsumers, NatsSink};
pub use relay::{Relay, RelayError, RelayTick};

/// The one event a paid order produces, as stored in `outbox.payload` and carried to every
/// consumer. Field names are a contract with consumers outside this process: add, never
/// rename.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaid {
    pub event_id: EventId,
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub checkout_id: CheckoutId,
    pub total: Money,
    pub lines: Vec<OrderLine>,
    /// Empty for an order placed on account.
    pub payment_intent_id: String,
    /// RFC 3339 (chrono's serde format); for an order on account, when it was placed.
    pub paid_at: DateTime<Utc>,
    /// The buyer's purchase-order number, if the checkout carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub po_number: Option<String>,
    /// Placed on a company's net terms: billed by `invoice_id`, not charged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_account: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<String>,
}

impl OrderPaid {
    /// The outbox topic; the NATS subject is `<prefix>.order.paid`.
    pub const TOPIC: &'static str = "order.paid";

    /// The JSON text the saga stores in `outbox.payload`.
    pub fn to_payload(&self) -> String {
        serde_json::to_string(self).expect("an OrderPaid has only string keys and plain values")
    }

    /// Reads a payload back; text that does not parse is [`SinkError::Malformed`].
    pub fn from_payload(payload: &[u8]) -> Result<Self, SinkError> {
        serde_json::from_slice(payload).map_err(|e| SinkError::Malformed(e.to_string()))
    }

    /// The event an outbox row carries. Its payload must name the row's own event id: the
    /// broker deduplicates by the row's id and the consumers by the payload's, and the two
    /// must agree for a redelivery to be recognised everywhere.
    pub fn from_outbox(event: &OutboxEvent) -> Result<Self, SinkError> {
        let paid = Self::from_payload(event.payload.as_bytes())?;
        if paid.event_id != event.event_id || paid.order_id != event.order_id {
            return Err(SinkError::Malformed(format!(
                "payload names event {} of order {}, the row event {} of order {}",
                paid.event_id, paid.order_id, event.event_id, event.order_id
            )));
        }
        Ok(paid)
    }
}

/// Why an event did not reach its consumers. Every variant leaves the outbox row unpublished,
/// so the relay tries again after its lease.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The payload is not a valid event: a bug in the writer, not something a retry fixes.
    #[error("the event payload is malformed: {0}")]
    Malformed(String),
    /// A consumer could not record the event (the embedded shape).
    #[error("a consumer could not record the event: {0}")]
    Consumer(#[from] StoreError),
    /// The broker cannot be reached or refused the message.
    #[error("the event broker is unavailable: {0}")]
    Unavailable(String),
    /// The broker did not confirm the message in time; it may or may not hold it.
    #[error("the event broker did not confirm within {0:?}")]
    Timeout(std::time::Duration),
}

/// Where the relay hands events. `Ok` means the event is durably with its consumers (or with
/// the broker that will deliver it): only then is the outbox row marked published.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Whether publishing can be tried at all. `false` (a broker not connected since the
    /// start) keeps the relay from claiming rows it cannot hand on, so no claim's lease is left
    /// to wait out once the broker is back.
    fn ready(&self) -> bool {
        true
    }

    async fn publish(&self, event: &OutboxEvent) -> Result<(), SinkError>;
}
