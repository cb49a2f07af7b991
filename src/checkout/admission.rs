//! Flash-sale admission (DESIGN §5): only token holders reach the database; everyone else is
//! answered by the gate alone. A checkout holds its admission until it is paid (consumed) or
//! ends without payment (handed back, so the unit goes to the next buyer).

use std::collections::HashMap;
use std::future::Future;
use std::sync::RwLock;

use crate::domain::{
    Checkout, CheckoutId, CheckoutState, CustomerId, FlashSale, FlashSaleId, NewFlashSale, Sku,
};
use crate::flash_sale::{
    Admission, Claim, GateError, GateFigures, RecordedHold, RequestBudget, SaleRecord, SaleTerms,
};
use crate::store::{SaleCheckout, SaleLimit, StoreError};

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
        max_per_buyer: sale.max_per_buyer,
        starts_at: sale.starts_at,
        ends_at: sale.ends_at,
    }
}

/// The gate's picture of a sale, from its checkouts as the database records them: live ones
/// hold their units until their maximum lifetime (as an admission extended at checkout does),
/// paid ones count as sold to their buyer.
pub(super) fn sale_record(checkouts: Vec<SaleCheckout>) -> SaleRecord {
    let mut record = SaleRecord::default();
    for checkout in checkouts {
        match checkout.state {
            CheckoutState::Reserved | CheckoutState::Charging | CheckoutState::RequiresAction => {
                record.holders.push(RecordedHold {
                    customer: checkout.customer_id,
                    checkout: checkout.id,
                    units: checkout.units,
                    until: checkout.max_expires_at,
                });
            }
            CheckoutState::Completed => {
                record
                    .paid
                    .push((checkout.customer_id, checkout.id, checkout.units));
            }
            CheckoutState::Refunded => record.refunded.push(checkout.id),
            CheckoutState::PaymentFailed | CheckoutState::Cancelled | CheckoutState::Expired => {
                record.ended.push(checkout.id);
            }
        }
    }
    record
}

impl CheckoutService {
    pub async fn open_sale(&self, new: &NewFlashSale) -> Result<FlashSale, CheckoutError> {
        let sale = self.store.create_flash_sale(new, self.clock.now()).await?;
        self.sales.put(&sale);
        // A new sale has no checkouts: the gate starts empty. If this fails, the first call
        // that needs the sale loads it.
        if let Err(e) = self.gate.load(sale.id, &SaleRecord::default()).await {
            tracing::warn!(sale_id = %sale.id, error = %e, "flash sale not loaded into the gate yet");
        }
        Ok(sale)
    }

    /// The sale, if this instance has read it before (no store access).
    pub fn cached_sale(&self, id: FlashSaleId) -> Option<FlashSale> {
        self.sales.get(id)
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
        let now = self.clock.now();
        self.gated(sale, || self.gate.figures(sale, now)).await
    }

    /// Loads the sale into the gate from the database (DESIGN §5): after a restart of the
    /// embedded shape, or when Redis lost the sale's keys. A concurrent load that won first
    /// leaves this one a no-op; calls that failed meanwhile are repeated by their callers and
    /// are idempotent per checkout, so none is lost or counted twice.
    pub async fn load_sale(&self, sale: FlashSaleId) -> Result<(), CheckoutError> {
        let record = sale_record(self.store.sale_checkouts(sale).await?);
        if self.gate.load(sale, &record).await? {
            tracing::info!(
                sale_id = %sale,
                holders = record.holders.len(),
                paid = record.paid.len(),
                "flash sale loaded into the gate from the database"
            );
        }
        Ok(())
    }

    /// Loads every sale not yet ended into the gate, at start: the embedded gate begins empty
    /// (a Redis gate that kept its keys changes nothing). A sale that cannot be loaded now is
    /// loaded by the first call that needs it; until then it fails closed.
    pub async fn load_current_sales(&self) {
        let sales = match self.store.current_flash_sales(self.clock.now()).await {
            Ok(sales) => sales,
            Err(e) => {
                tracing::warn!(error = %e, "flash sales not loaded at start; loaded on first use");
                return;
            }
        };
        for sale in sales {
            if let Err(e) = self.load_sale(sale.id).await {
                tracing::warn!(sale_id = %sale.id, error = %e, "flash sale not loaded at start; loaded on first use");
            }
        }
    }

    /// One gate call; a sale the gate does not know is loaded from the database and the call
    /// made once more. Until the load succeeds the caller fails closed (`Unavailable`/
    /// `NotLoaded`, answered `503 admission_unavailable`).
    async fn gated<T, F, Fut>(&self, sale: FlashSaleId, call: F) -> Result<T, CheckoutError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, GateError>>,
    {
        match call().await {
            Err(GateError::NotLoaded) => {
                if let Err(e) = self.load_sale(sale).await {
                    // Fail closed: no admission on a guess while the database cannot say
                    // who holds and who bought.
                    tracing::warn!(sale_id = %sale, error = %e, "flash sale cannot be loaded into the gate; admission unavailable");
                    return Err(GateError::NotLoaded.into());
                }
                Ok(call().await?)
            }
            other => Ok(other?),
        }
    }

    /// Whether the gate takes the customers' shared request budgets itself
    /// ([`AdmissionGate::keeps_budgets`]): then a token request's budget goes with its
    /// admission, one call for both.
    pub fn gate_keeps_budgets(&self) -> bool {
        self.gate.keeps_budgets()
    }

    /// One atomic step in the gate; a refused buyer costs no database write. With `budget`,
    /// the same step first takes one request from the customer's shared budget (only for a
    /// gate that [keeps budgets](Self::gate_keeps_budgets)). A gate that did not answer in
    /// time is asked once more: admitting is idempotent per customer (a repeat returns the
    /// same token), so a slow answer under load does not turn into a refusal.
    pub async fn take_token(
        &self,
        customer: CustomerId,
        sale: &FlashSale,
        budget: Option<&RequestBudget>,
    ) -> Result<Admission, CheckoutError> {
        let terms = terms(sale);
        let admit = || async {
            let now = self.clock.now();
            match budget {
                Some(budget) => {
                    self.gate
                        .admit_within(&terms, customer, now, sale.reservation_ttl, budget)
                        .await
                }
                None => {
                    self.gate
                        .admit(&terms, customer, now, sale.reservation_ttl)
                        .await
                }
            }
        };
        match self.gated(sale.id, admit).await {
            Err(CheckoutError::Gate(GateError::Unavailable(cause))) => {
                tracing::warn!(%cause, "admission gate slow or unreachable; asking once more");
                self.gated(sale.id, admit).await
            }
            other => other,
        }
    }

    /// The customer's admission covers `units` of the sale's SKU: the token is theirs and live,
    /// and the gate now holds exactly those units for them (within their limit and the sale).
    pub(super) async fn admit_units(
        &self,
        customer: CustomerId,
        sale: FlashSaleId,
        sku: Sku,
        units: u32,
        token: Option<&str>,
    ) -> Result<(), CheckoutError> {
        let token = token.ok_or(StoreError::AdmissionRequired)?;
        let sale = self
            .sale(sale)
            .await?
            .ok_or(StoreError::NotFound("flash sale"))?;
        let now = self.clock.now();
        let terms = terms(&sale);
        if !self
            .gated(sale.id, || self.gate.check(sale.id, customer, token, now))
            .await?
        {
            return Err(StoreError::AdmissionRequired.into());
        }
        let claim = self
            .gated(sale.id, || self.gate.claim(&terms, customer, units, now))
            .await?;
        match claim {
            Claim::Held => Ok(()),
            Claim::NotHolder => Err(StoreError::AdmissionRequired.into()),
            Claim::Limit(limit) => Err(StoreError::FlashSaleLimit(SaleLimit {
                sku,
                requested: units,
                limit,
            })
            .into()),
        }
    }

    /// The admission lives as long as the checkout may.
    pub(super) async fn extend_admission(&self, checkout: &Checkout) {
        let Some(sale) = checkout.flash_sale_id else {
            return;
        };
        let until = checkout.max_expires_at;
        let extended = self
            .gated(sale, || self.gate.extend(sale, checkout.customer_id, until))
            .await;
        if let Err(e) = extended {
            tracing::warn!(error = %e, "admission not extended; it expires with its token");
        }
    }

    /// Keeps the gate in step with a checkout's end: a paid checkout consumes its admission,
    /// one that ended without payment hands it back, a refunded one gives its units back to
    /// the sale. Failures are logged: an admission that is not handed back expires by itself,
    /// and the database stays the final guard.
    pub(super) async fn settle_admission(&self, checkout: &Checkout) {
        let Some(sale) = checkout.flash_sale_id else {
            return;
        };
        let (customer, id, units) = (checkout.customer_id, checkout.id, checkout.flash_sale_units);
        let result = match checkout.state {
            CheckoutState::Completed => {
                self.gated(sale, || self.gate.consume(sale, customer, id, units))
                    .await
            }
            CheckoutState::PaymentFailed | CheckoutState::Cancelled | CheckoutState::Expired => {
                self.gated(sale, || self.gate.release(sale, customer, id))
                    .await
            }
            CheckoutState::Refunded => {
                self.gated(sale, || self.gate.refund(sale, customer, id))
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
        for &(sale, customer, checkout) in admissions {
            let released = self
                .gated(sale, || self.gate.release(sale, customer, checkout))
                .await;
            if let Err(e) = released {
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
