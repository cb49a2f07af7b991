//! Recovery and reconciliation (promise 4): takes over checkouts whose lease ran out (a
//! crashed instance, an unknown charge outcome, a customer who never finished authentication,
//! a lost webhook) and money due back, and drives each forward from its recorded state.
//! Claims go through the store, so several instances may run it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkout::{CheckoutError, CheckoutService};

pub struct RecoveryWorker {
    checkout: Arc<CheckoutService>,
    batch: u32,
}

impl RecoveryWorker {
    pub fn new(checkout: Arc<CheckoutService>) -> Self {
        Self {
            checkout,
            batch: 50,
        }
    }

    /// One batch; returns how many checkouts were claimed (0 = nothing to do).
    pub async fn tick(&self) -> Result<usize, CheckoutError> {
        self.checkout.recover_stalled(self.batch).await
    }

    pub async fn run_until_stopped(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "recovery tick failed; retrying");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
