//! Flash-sale admission (DESIGN §5): only token holders reach the database; everyone else is
//! answered by the gate alone. A checkout holds its admission until it is paid (consumed) or
//! ends without payment (handed back, so the unit goes to the next buyer).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::domain::{
    Checkout, CheckoutId, CheckoutState, CustomerId, FlashSale, FlashSaleId, NewFlashSale, Sku,
};
use crate::flash_sale::{Admission, GateError, GateFigures, SaleTerms};

use super::{CheckoutError, CheckoutService};

/// Sales never change once opened, so they are cached by id: a token request for a known sale
/// needs no store call. A std `RwLock` suffices: held for a map lookup, never across await.
#[derive(Default)]
pub(super) struct SaleCache(RwLock<HashMap<FlashSaleId, FlashSale>>);

impl SaleCache {
    fn get(&self, id: FlashSaleId) -> Option<FlashSale> {
        self.0.read().ok()?.get(&id).cloned()
    }

    fn put(&self, sale: &FlashSale) {
        if let Ok(mut map) = self.0.write() {
            map.insert(sale.id, sale.clone());
        }
    }
}

fn terms(sale: &FlashSale) -> SaleTerms {
    SaleTerms {
        sale_id: sale.id,
        units: sale.units,
        starts_at: sale.starts_at,
        ends_at: sale.ends_at,
    }
}

impl CheckoutService {
    pub async fn open_sale(&self, new: &NewFlashSale) -> Result<FlashSale, CheckoutError> {
        let sale = self.store.create_flash_sale(new, self.clock.now()).await?;
        self.sales.put(&sale);
        Ok(sale)
    }

    pub async fn sale(&self, id: FlashSaleId) -> Result<Option<FlashSale>, CheckoutError> {
        if let Some(sale) = self.sales.get(id) {
            return Ok(Some(sale));
        }
        let found = self.store.flash_sale(id).await?;
        if let Some(sale) = &found {
            self.sales.put(sale);
        }
        Ok(found)
    }

    pub async fn sale_figures(&self, sale: FlashSaleId) -> Result<GateFigures, CheckoutError> {
        Ok(self.gate.figures(sale, self.clock.now()).await?)
    }

    /// One atomic step in the gate; a refused buyer costs no database write. A gate that did
    /// not answer in time is asked once more: admitting is idempotent per customer (a repeat
    /// returns the same token), so a slow answer under load does not turn into a refusal.
    pub async fn take_token(
        &self,
        customer: CustomerId,
        sale: &FlashSale,
    ) -> Result<Admission, CheckoutError> {
        let terms = terms(sale);
        let first = self
            .gate
            .admit(&terms, customer, self.clock.now(), sale.reservation_ttl)
            .await;
        match first {
            Err(GateError::Unavailable(cause)) => {
                tracing::warn!(%cause, "admission gate slow or unreachable; asking once more");
                Ok(self
                    .gate
                    .admit(&terms, customer, self.clock.now(), sale.reservation_ttl)
                    .await?)
            }
            other => Ok(other?),
        }
    }

    /// The sale governing this cart, if any, after checking the customer's token for it.
    pub(super) async fn admitted_sale(
        &self,
        customer: CustomerId,
        skus: &[Sku],
        token: Option<&str>,
    ) -> Result<Option<FlashSale>, CheckoutError> {
        let now = self.clock.now();
        let mut governing: Vec<FlashSale> = self
            .store
            .current_flash_sales(now)
            .await?
            .into_iter()
            .filter(|sale| sale.is_open(now) && skus.contains(&sale.sku))
            .collect();
        let Some(sale) = governing.pop() else {
            return Ok(None);
        };
        if !governing.is_empty() {
            return Err(CheckoutError::OneSalePerCheckout);
        }
        let token = token.ok_or(CheckoutError::AdmissionRequired)?;
        if !self.gate.check(sale.id, customer, token, now).await? {
            return Err(CheckoutError::AdmissionRequired);
        }
        Ok(Some(sale))
    }

    /// Keeps the gate in step with a checkout's end: a paid checkout consumes its admission,
    /// one that ended without payment hands it back. Failures are logged: an admission that
    /// is not handed back expires by itself, and the database stays the final guard.
    pub(super) async fn settle_admission(&self, checkout: &Checkout) {
        let Some(sale) = checkout.flash_sale_id else {
            return;
        };
        let result = match checkout.state {
            CheckoutState::Completed => self.gate.consume(sale, checkout.customer_id).await,
            CheckoutState::PaymentFailed
            | CheckoutState::Cancelled
            | CheckoutState::Expired
            | CheckoutState::Refunded => {
                self.gate
                    .release(sale, checkout.customer_id, checkout.id)
                    .await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(checkout_id = %checkout.id, error = %e, "flash-sale gate not updated");
        }
    }

    /// Hands back the admissions of checkouts released by the expiry worker.
    pub async fn release_admissions(&self, admissions: &[(FlashSaleId, CustomerId, CheckoutId)]) {
        for (sale, customer, checkout) in admissions {
            if let Err(e) = self.gate.release(*sale, *customer, *checkout).await {
                tracing::warn!(sale_id = %sale, error = %e, "flash-sale admission not handed back");
            }
        }
    }
}

impl From<GateError> for CheckoutError {
    fn from(e: GateError) -> Self {
        CheckoutError::Gate(e)
    }
}
