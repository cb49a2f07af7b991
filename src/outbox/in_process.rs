//! The embedded shape's sink (DESIGN §1: outbox table, in-process consumers). There is no
//! broker: publishing an event runs both consumers against the store, and succeeds only once
//! both have recorded it. A failure leaves the row unpublished, and the retry is harmless
//! because the consumers deduplicate by event id, exactly as behind NATS (promise 5).

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::Clock;
use crate::store::{OutboxEvent, Store};

use super::consumers::{Consumer, Notification, Warehouse};
use super::{EventSink, OrderPaid, SinkError};

pub struct InProcessSink {
    consumers: Vec<Box<dyn Consumer>>,
}

impl InProcessSink {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            consumers: vec![
                Box::new(Warehouse::new(store.clone(), clock.clone())),
                Box::new(Notification::new(store, clock)),
            ],
        }
    }
}

#[async_trait]
impl EventSink for InProcessSink {
    #[tracing::instrument(skip_all, fields(event_id = %event.event_id, topic = %event.topic))]
    async fn publish(&self, event: &OutboxEvent) -> Result<(), SinkError> {
        if event.topic != OrderPaid::TOPIC {
            // Nobody in this process subscribes to it; like a broker subject without
            // consumers, the event is delivered to no one.
            tracing::debug!("no in-process consumer for this topic");
            return Ok(());
        }
        let paid = OrderPaid::from_outbox(event)?;
        for consumer in &self.consumers {
            let recorded = consumer.handle(&paid).await?;
            if !recorded {
                tracing::debug!(consumer = consumer.name(), "event already handled");
            }
        }
        Ok(())
    }
}
