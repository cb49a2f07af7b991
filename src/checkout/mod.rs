//! The checkout saga (DESIGN §3): one function per arrow, each a single atomic phase in the
//! store. This module decides ids, windows and time; the store makes each phase one
//! transaction.

use std::sync::Arc;

use chrono::Duration;

use crate::domain::{CartId, Checkout, CheckoutId, Clock, CustomerId, OrderId};
use crate::store::{NewCheckout, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reservation windows (DESIGN §8: `--reservation-ttl-seconds`, maximum lifetime).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub ttl: Duration,
    pub max_lifetime: Duration,
}

pub struct CheckoutService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    windows: Windows,
}

impl CheckoutService {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, windows: Windows) -> Self {
        Self {
            store,
            clock,
            windows,
        }
    }

    /// (new) → reserved: every line reserved and the order created, in one transaction.
    #[tracing::instrument(skip_all, fields(%customer, %cart))]
    pub async fn start(
        &self,
        customer: CustomerId,
        cart: CartId,
    ) -> Result<Checkout, CheckoutError> {
        let new = NewCheckout {
            id: CheckoutId::new(),
            order_id: OrderId::new(),
            customer_id: customer,
            cart_id: cart,
            now: self.clock.now(),
            ttl: self.windows.ttl,
            max_lifetime: self.windows.max_lifetime,
        };
        Ok(self.store.reserve_checkout(&new).await?)
    }

    /// reserved → reserved with the expiry pushed, never past the maximum lifetime.
    pub async fn heartbeat(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Checkout, CheckoutError> {
        Ok(self
            .store
            .heartbeat_checkout(customer, id, self.clock.now(), self.windows.ttl)
            .await?)
    }

    /// reserved → cancelled, units released at once.
    pub async fn cancel(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Checkout, CheckoutError> {
        Ok(self
            .store
            .cancel_checkout(customer, id, self.clock.now())
            .await?)
    }

    pub async fn get(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Checkout, CheckoutError> {
        self.store
            .checkout(customer, id)
            .await?
            .ok_or(CheckoutError::Store(StoreError::NotFound("checkout")))
    }
}
