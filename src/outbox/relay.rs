//! The outbox relay (promise 5: published at least once). Each tick claims a batch of
//! unpublished rows with a lease, hands them to the sink in outbox order, and marks published
//! only what the sink confirmed. It stops at the first failure and hands the claim on the rest
//! back, so the next tick tries them again: a backlog built up during a broker outage goes out
//! as soon as the broker is back, whatever the lease. Only the claim of a relay that crashed
//! waits for its lease to run out. A row can therefore be published twice (a crash between publish and mark);
//! the broker's `Nats-Msg-Id` window and the consumers' event-id records absorb that.
//!
//! Every instance runs a relay; the store's claim (`FOR UPDATE SKIP LOCKED` on PostgreSQL)
//! keeps them from publishing the same row at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::Duration;
use tokio_util::sync::CancellationToken;

use crate::domain::Clock;
use crate::faults::{self, FaultPoint};
use crate::store::{Store, StoreError};

use super::{EventSink, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The first `published` events of the claim went out; the rest were handed back.
    #[error("published {published} events, then the sink failed: {source}")]
    Sink {
        published: usize,
        #[source]
        source: SinkError,
    },
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayTick {
    pub claimed: usize,
    pub published: usize,
}

pub struct Relay {
    store: Arc<dyn Store>,
    sink: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    batch: u32,
    lease: Duration,
    published_total: AtomicU64,
    fault: Option<FaultPoint>,
}

impl Relay {
    /// A relay claiming 100 events at a time with a 30 s lease.
    pub fn new(store: Arc<dyn Store>, sink: Arc<dyn EventSink>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            sink,
            clock,
            batch: 100,
            lease: Duration::seconds(30),
            published_total: AtomicU64::new(0),
            fault: None,
        }
    }

    pub fn with_batch(mut self, batch: u32) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long a claim keeps other relays off a row (a relay that died mid-batch holds its
    /// claim this long).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Test-only: the fault point armed for this process (crash tests).
    pub fn with_fault(mut self, fault: Option<FaultPoint>) -> Self {
        self.fault = fault;
        self
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Events this relay has published since start.
    pub fn published_total(&self) -> u64 {
        self.published_total.load(Ordering::Relaxed)
    }

    /// One batch: claim, publish in order until the first failure, mark what went out and
    /// hand back the claim on what did not.
    #[tracing::instrument(skip_all)]
    pub async fn tick(&self) -> Result<RelayTick, RelayError> {
        if !self.sink.ready() {
            return Ok(RelayTick::default());
        }
        let claimed_at = self.clock.now();
        let claim = self
            .store
            .claim_outbox(claimed_at, self.batch, self.lease)
            .await?;
        let lease_ends = claimed_at + self.lease;
        let mut published = Vec::with_capacity(claim.len());
        let mut failure = None;
        for event in &claim {
            // Past the lease another relay may already hold the rest; leave it to them.
            if self.clock.now() >= lease_ends {
                tracing::warn!(
                    remaining = claim.len() - published.len(),
                    "outbox lease ran out mid-batch"
                );
                break;
            }
            match self.sink.publish(event).await {
                Ok(()) => published.push(event.event_id),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if !published.is_empty() {
            faults::hit(self.fault, FaultPoint::AfterPublish).await;
            self.store
                .mark_published(&published, self.clock.now())
                .await?;
            self.published_total
                .fetch_add(published.len() as u64, Ordering::Relaxed);
            tracing::debug!(published = published.len(), "published outbox events");
        }
        if failure.is_some() {
            let rest: Vec<_> = claim[published.len()..]
                .iter()
                .map(|e| e.event_id)
                .collect();
            self.store.release_outbox(&rest, lease_ends).await?;
        }
        match failure {
            Some(source) => Err(RelayError::Sink {
                published: published.len(),
                source,
            }),
            None => Ok(RelayTick {
                claimed: claim.len(),
                published: published.len(),
            }),
        }
    }

    /// Ticks every `interval` (at once again while batches come back full) until `stop`;
    /// errors are logged and the loop goes on.
    pub async fn run_until_stopped(
        self: Arc<Self>,
        interval: StdDuration,
        stop: CancellationToken,
    ) {
        loop {
            let full = match self.tick().await {
                Ok(tick) => tick.claimed >= self.batch as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay tick failed; retrying");
                    false
                }
            };
            if full && !stop.is_cancelled() {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
