//! Releases reservations whose window has passed (promise 2: abandoned units come back). Each
//! release is exactly once even with several workers: the store claims rows with
//! `FOR UPDATE SKIP LOCKED`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkout::CheckoutService;
use crate::domain::Clock;
use crate::store::{Released, Store, StoreError};

pub struct ExpiryWorker {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Hands flash-sale admissions of released checkouts back to the gate.
    admissions: Option<Arc<CheckoutService>>,
    batch: u32,
    released_checkouts: AtomicU64,
    released_units: AtomicU64,
    failed_ticks: AtomicU64,
}

impl ExpiryWorker {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            admissions: None,
            batch: 100,
            released_checkouts: AtomicU64::new(0),
            released_units: AtomicU64::new(0),
            failed_ticks: AtomicU64::new(0),
        }
    }

    pub fn with_admissions(mut self, checkout: Arc<CheckoutService>) -> Self {
        self.admissions = Some(checkout);
        self
    }

    /// One batch: what was released (empty when there was nothing to do).
    pub async fn tick(&self) -> Result<Released, StoreError> {
        let released = self
            .store
            .expire_due_checkouts(self.clock.now(), self.batch)
            .await?;
        crate::observe::expiry_released(released.checkouts.len());
        if let Some(checkout) = &self.admissions {
            checkout.release_admissions(&released.admissions).await;
        }
        if !released.checkouts.is_empty() {
            self.released_checkouts
                .fetch_add(released.checkouts.len() as u64, Ordering::Relaxed);
            self.released_units
                .fetch_add(released.units.max(0) as u64, Ordering::Relaxed);
            tracing::info!(
                checkouts = released.checkouts.len(),
                units = released.units,
                "released expired reservations"
            );
        }
        Ok(released)
    }

    /// Checkouts and units released since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.released_checkouts.load(Ordering::Relaxed),
            self.released_units.load(Ordering::Relaxed),
        )
    }

    /// Ticks of [`Self::run_until_stopped`] that failed (the store was unreachable, say) and
    /// were tried again at the next interval.
    pub fn failed_ticks(&self) -> u64 {
        self.failed_ticks.load(Ordering::Relaxed)
    }

    /// Ticks every `interval` (at once again while batches come back full) until `stop`;
    /// a database error is logged and counted, and the loop goes on.
    pub async fn run_until_stopped(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            let full = match self.tick().await {
                Ok(released) => released.checkouts.len() >= self.batch as usize,
                Err(e) => {
                    self.failed_ticks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "expiry tick failed; retrying");
                    false
                }
            };
            if full {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
