//! The checkout saga (DESIGN §3): one function per arrow, each a single atomic phase in the
//! store, with the one foreign call (the charge) between phases. A crash anywhere leaves a
//! row that says where to resume; `recover` resumes it. Promises 3 (one charge: the key
//! `checkout-{id}-charge-{attempt}` makes every retry the same request) and 4 (no ghost orders,
//! no lost payments: every path ends paid, failed-and-released, or refunded).

mod admission;
mod group;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};

use crate::domain::{
    CaptureMethod, CartId, Checkout, CheckoutId, CheckoutState, Clock, CustomerId, Money, OrderId,
};
use crate::domain::{Order, OrderStatus, Sku};
use crate::faults::{self, FaultPoint};
use crate::flash_sale::AdmissionGate;
use crate::observe::{self, CheckoutOutcome, SagaStep};
use crate::payments::{
    CaptureRequest, ChargeOutcome, ChargeRequest, EventObject, GatewayError, IntentStatus,
    PaymentGateway, PaymentIntent, Refund, RefundOutcome, RefundRequest, WebhookEvent,
};
use crate::store::{
    self, ChargeTicket, Lease, LineRefundStatus, LineRefundTicket, NewCheckout, NewLineRefund,
    NewShipment, OpenSale, ShipmentTicket, Store, StoreError,
};

pub use group::GroupSettings;
use group::Grouper;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("payment_method must be 1 to 255 letters, digits or '_'")]
    BadPaymentMethod,
    #[error("the payment method was refused: {message}")]
    PaymentMethodRefused { code: String, message: String },
    #[error("the payment provider cannot be used right now: {0}")]
    Gateway(String),
    #[error(transparent)]
    Gate(crate::flash_sale::GateError),
    /// The total is below the payment provider's minimum charge: refused before any call.
    #[error("the total {total} is below the minimum charge of {minimum}")]
    AmountTooSmall { total: Money, minimum: Money },
}

/// Reservation windows (DESIGN §8: `--reservation-ttl-seconds`, maximum lifetime).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub ttl: Duration,
    pub max_lifetime: Duration,
}

/// How the saga paces itself; tests shorten these.
#[derive(Debug, Clone)]
pub struct SagaSettings {
    /// How long an instance owns a checkout it is charging without renewing the lease; a
    /// charge in flight renews it every third of this.
    pub lease: Duration,
    /// Waits between tries of a charge whose outcome is unknown, within one request.
    pub retry_delays: Vec<StdDuration>,
    /// After the in-request tries, recovery tries again this much later.
    pub retry_later: Duration,
    /// How often a checkout waiting for customer authentication is checked with the gateway
    /// (lost webhooks), and how long a charge must have been in flight before recovery asks
    /// the gateway what it holds for the checkout.
    pub reconcile_after: Duration,
    pub fault: Option<FaultPoint>,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            lease: Duration::seconds(30),
            retry_delays: vec![StdDuration::from_millis(200), StdDuration::from_millis(800)],
            retry_later: Duration::seconds(5),
            reconcile_after: Duration::seconds(60),
            fault: None,
        }
    }
}

pub struct CheckoutService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    gateway: Arc<dyn PaymentGateway>,
    gate: Arc<dyn AdmissionGate>,
    sales: admission::SaleCache,
    windows: Windows,
    saga: SagaSettings,
    /// This instance's name on the leases it takes.
    owner: String,
    /// Group reservation, when switched on: concurrent reservations share a transaction.
    grouper: Option<Grouper>,
    /// The shop-wide capture method (`--capture-method`).
    capture: CaptureMethod,
    /// Manual capture: how long an authorization is held before it is settled
    /// (`--authorization-window-seconds`).
    authorization_window: Duration,
    /// Each buyer's company capture method (`None`: the company, if any, follows the shop),
    /// read once per instance: a buyer's company and a company's capture method are set when
    /// they are created and never change, so an entry never goes stale.
    company_capture: CompanyCapture,
}

/// A map and a bound (cleared when full; a std lock held for a lookup or an insert only,
/// never across an await): written by hand, as the customer-token cache is.
#[derive(Default)]
struct CompanyCapture(
    std::sync::RwLock<std::collections::HashMap<CustomerId, Option<CaptureMethod>>>,
);

impl CompanyCapture {
    const CAPACITY: usize = 200_000;

    fn get(&self, customer: CustomerId) -> Option<Option<CaptureMethod>> {
        self.0.read().ok()?.get(&customer).copied()
    }

    fn put(&self, customer: CustomerId, method: Option<CaptureMethod>) {
        if let Ok(mut map) = self.0.write() {
            if map.len() >= Self::CAPACITY {
                map.clear();
            }
            map.insert(customer, method);
        }
    }
}

/// What the refund an admin's request made came to, for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReport {
    /// `succeeded`, `pending` (Stripe settles it later), `failed` (Stripe kept the money) or
    /// `unknown` (the answer was lost: recovery asks again under the same key).
    pub status: &'static str,
    /// Stripe's `failure_reason` of a failed refund, when it gives one.
    pub failure_reason: Option<String>,
}

impl RefundReport {
    fn of(refund: &Refund) -> Self {
        Self {
            status: match refund.outcome() {
                RefundOutcome::Succeeded => "succeeded",
                RefundOutcome::Pending => "pending",
                RefundOutcome::Failed => "failed",
            },
            failure_reason: refund
                .failure_reason
                .clone()
                .filter(|_| refund.outcome() == RefundOutcome::Failed),
        }
    }

    fn unknown() -> Self {
        Self {
            status: "unknown",
            failure_reason: None,
        }
    }

    /// Succeeded or failed: nothing more will happen to it.
    pub fn settled(&self) -> bool {
        matches!(self.status, "succeeded" | "failed")
    }
}

/// The gateway key of one charge attempt: every retry of the attempt sends the same one.
pub fn charge_key(id: CheckoutId, attempt: i32) -> String {
    format!("checkout-{id}-charge-{attempt}")
}

/// The payment provider's minimum charge for this total's currency, when the total is below it.
fn below_minimum_charge(total: Money) -> Option<Money> {
    let minimum = crate::payments::minimum_charge(total.currency().as_str())?;
    (total.amount() < minimum)
        .then(|| Money::new(minimum, total.currency()).ok())
        .flatten()
}

fn valid_payment_method(pm: &str) -> bool {
    !pm.is_empty() && pm.len() <= 255 && pm.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl CheckoutService {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        gateway: Arc<dyn PaymentGateway>,
        gate: Arc<dyn AdmissionGate>,
        windows: Windows,
        saga: SagaSettings,
    ) -> Self {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Self {
            store,
            clock,
            gateway,
            gate,
            sales: admission::SaleCache::default(),
            windows,
            saga,
            owner,
            grouper: None,
            capture: CaptureMethod::Automatic,
            authorization_window: Duration::days(6),
            company_capture: CompanyCapture::default(),
        }
    }

    /// Authorizations older than `window` are settled before the card network lets them lapse.
    pub fn with_authorization_window(mut self, window: Duration) -> Self {
        self.authorization_window = window;
        self
    }

    /// Orders whose authorization is older than the window ends at `now + within`: what the
    /// ops page lists as near its end.
    pub async fn authorizations_ending_within(
        &self,
        within: Duration,
        limit: u32,
    ) -> Result<Vec<OrderId>, CheckoutError> {
        let before = self.clock.now() - self.authorization_window + within;
        Ok(self.store.authorizations_before(before, limit).await?)
    }

    /// Checkouts started from now on are charged this way (`--capture-method`).
    pub fn with_capture_method(mut self, capture: CaptureMethod) -> Self {
        self.capture = capture;
        self
    }

    /// The shop-wide capture method (`--capture-method`): what a retail customer's checkouts
    /// and those of a company without a setting of its own use.
    pub fn shop_capture_method(&self) -> CaptureMethod {
        self.capture
    }

    /// How a checkout starting now for `customer` is captured: decided once, here, and stored
    /// with the checkout. The buyer's company's wholesale terms decide when they set it; the
    /// shop's setting otherwise (retail customers included).
    async fn capture_method_for(&self, customer: CustomerId) -> Result<CaptureMethod, StoreError> {
        let company = match self.company_capture.get(customer) {
            Some(known) => known,
            None => {
                let read = self.store.company_capture_method(customer).await?;
                self.company_capture.put(customer, read);
                read
            }
        };
        Ok(company.unwrap_or(self.capture))
    }

    /// Reserves through the group batcher (`--group-reservations`). Starts its collector on
    /// the current runtime; it stops when the service is dropped.
    pub fn with_grouping(mut self, settings: &GroupSettings) -> Self {
        self.grouper = settings
            .enabled
            .then(|| Grouper::start(self.store.clone(), settings));
        self
    }

    async fn reserve(&self, new: NewCheckout) -> Result<Checkout, StoreError> {
        match &self.grouper {
            Some(grouper) => grouper.reserve(new).await,
            None => self.store.reserve_checkout(&new).await,
        }
    }

    pub fn gateway(&self) -> Arc<dyn PaymentGateway> {
        self.gateway.clone()
    }

    fn lease(&self, length: Duration) -> Lease<'_> {
        let now = self.clock.now();
        Lease {
            owner: &self.owner,
            now,
            until: now + length,
        }
    }

    /// (new) → reserved: every line reserved and the order created, in one transaction. A cart
    /// holding a flash-sale SKU needs the customer's admission token and gets the sale's window.
    /// A start's `Idempotency-Key` is recorded with the checkout in the same transaction.
    pub async fn start(
        &self,
        customer: CustomerId,
        cart: CartId,
        flash_sale_token: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Checkout, CheckoutError> {
        self.start_with_po_number(customer, cart, flash_sale_token, idempotency_key, None)
            .await
    }

    /// [`Self::start`] carrying the buyer's purchase-order number to the order (a company may
    /// require one: the reservation refuses a checkout without it).
    #[tracing::instrument(skip_all, fields(%customer, %cart))]
    pub async fn start_with_po_number(
        &self,
        customer: CustomerId,
        cart: CartId,
        flash_sale_token: Option<&str>,
        idempotency_key: Option<&str>,
        po_number: Option<crate::domain::PoNumber>,
    ) -> Result<Checkout, CheckoutError> {
        let now = self.clock.now();
        // Both reads at once: the capture method (read from the store once per buyer and
        // instance) costs no extra wait on the buyer's path.
        let (cart_and_sales, capture_method) = tokio::join!(
            self.store.cart_and_current_sales(customer, cart, now),
            self.capture_method_for(customer),
        );
        let (found, sales) = cart_and_sales?;
        let capture_method = capture_method?;
        let lines = found
            .ok_or(CheckoutError::Store(StoreError::NotFound("cart")))?
            .lines;
        let open_sales: Vec<OpenSale> = sales
            .into_iter()
            .filter(|sale| sale.is_open(now))
            .map(|sale| OpenSale {
                id: sale.id,
                sku: sale.sku,
            })
            .collect();
        // The gate decides on this first look at the cart; the reservation checks the same
        // rule on the lines it reserves, in its own transaction, and refuses if they differ.
        let sale_line = store::sale_line(
            lines.iter().map(|line| (&line.sku, line.quantity.get())),
            &open_sales,
        )?;
        let admitted = match sale_line {
            Some((sale, sku, units)) => {
                self.admit_units(customer, sale, sku, units, flash_sale_token)
                    .await?;
                Some((sale, units))
            }
            None => None,
        };
        let ttl = match admitted {
            Some((sale, _)) => self
                .sale(sale)
                .await?
                .map_or(self.windows.ttl, |s| s.reservation_ttl),
            None => self.windows.ttl,
        };
        let new = NewCheckout {
            id: CheckoutId::new(),
            order_id: OrderId::new(),
            customer_id: customer,
            cart_id: cart,
            now: self.clock.now(),
            ttl,
            max_lifetime: self.windows.max_lifetime,
            flash_sale: admitted.map(|(sale, _)| sale),
            flash_sale_units: admitted.map_or(0, |(_, units)| units),
            open_sales,
            idempotency_key: idempotency_key.map(str::to_owned),
            po_number,
            capture_method,
        };
        let reserved = observe::timed(SagaStep::Reserve, self.reserve(new)).await;
        count_reservation(&reserved);
        let checkout = reserved?;
        faults::hit(self.saga.fault, FaultPoint::AfterReserve).await;
        self.extend_admission(&checkout).await;
        Ok(checkout)
    }

    /// reserved → reserved with the expiry pushed, never past the maximum lifetime.
    pub async fn heartbeat(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Checkout, CheckoutError> {
        let current = self.get(customer, id).await?;
        let ttl = match current.flash_sale_id {
            Some(sale) => self
                .sale(sale)
                .await?
                .map_or(self.windows.ttl, |s| s.reservation_ttl),
            None => self.windows.ttl,
        };
        Ok(self
            .store
            .heartbeat_checkout(customer, id, self.clock.now(), ttl)
            .await?)
    }

    /// reserved → cancelled, units released at once. A checkout waiting for the customer's
    /// authentication (`requires_action`) is cancelled at the gateway first (its own key), then
    /// released; if the payment went through meanwhile, it is recorded as paid instead.
    pub async fn cancel(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Checkout, CheckoutError> {
        let current = self.get(customer, id).await?;
        if current.state == CheckoutState::RequiresAction {
            return self.cancel_authentication(&current).await;
        }
        let checkout = self
            .store
            .cancel_checkout(customer, id, self.clock.now())
            .await?;
        observe::checkout(CheckoutOutcome::Cancelled);
        self.settle_admission(&checkout).await;
        Ok(checkout)
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

    /// reserved → charging → (completed | requires_action | payment_failed), or still
    /// `charging` when the gateway's answer is unknown (recovery finishes it; a retry of the
    /// request with the same Idempotency-Key does too).
    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    /// reserved → completed on account (net terms): no gateway call; the store checks the
    /// company's terms and credit and places the order with its invoice in one transaction.
    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    pub async fn complete_on_account(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<(Checkout, crate::domain::Invoice), CheckoutError> {
        Ok(self
            .store
            .complete_on_account(customer, id, self.clock.now())
            .await?)
    }

    pub async fn complete(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        payment_method: &str,
    ) -> Result<Checkout, CheckoutError> {
        if !valid_payment_method(payment_method) {
            return Err(CheckoutError::BadPaymentMethod);
        }
        let lease = self.lease(self.saga.lease);
        let ticket = match self
            .store
            .begin_charge(customer, id, payment_method, lease)
            .await
        {
            Ok(ticket) => ticket,
            // Already paid or waiting for the customer: completing again changes nothing.
            Err(StoreError::CheckoutState(
                CheckoutState::Completed | CheckoutState::RequiresAction,
            )) => return self.get(customer, id).await,
            Err(e) => return Err(e.into()),
        };
        if ticket.opens_attempt {
            if let Some(minimum) = below_minimum_charge(ticket.checkout.total) {
                // No request went out under this attempt: hand the checkout back as it was.
                self.store.abort_charge(id, self.clock.now()).await?;
                return Err(CheckoutError::AmountTooSmall {
                    total: ticket.checkout.total,
                    minimum,
                });
            }
        }
        faults::hit(self.saga.fault, FaultPoint::AfterBeginCharge).await;
        self.drive_charge(&ticket, lease.until).await
    }

    /// The charge of a `charging` checkout, retried with the same key while the outcome is
    /// unknown. No database lock is held across the call: the `charging` state is what keeps
    /// the reservation from expiring.
    ///
    /// A refusal (bad payment method, our credentials) gives the checkout back to the customer
    /// only while no earlier request of this attempt can have run. Once one may have (its
    /// answer was lost, or this is a resumed charge), giving it back would make the next
    /// `complete` a new attempt with a new key, and a second charge (promise 3): the charge
    /// stays open instead, retried with the same key and reconciled through the gateway.
    ///
    /// `held` is the end of the lease the ticket was taken with. The lease is renewed while a
    /// call or a wait between tries runs, so retries slower than the lease are not taken over
    /// by another instance's recovery mid-call; if the lease was claimed again anyway, this
    /// instance leaves the checkout to the claimant.
    async fn drive_charge(
        &self,
        ticket: &ChargeTicket,
        mut held: DateTime<Utc>,
    ) -> Result<Checkout, CheckoutError> {
        let checkout = &ticket.checkout;
        let request = ChargeRequest {
            amount: checkout.total,
            payment_method: ticket.payment_method.clone(),
            checkout_id: checkout.id,
            order_id: checkout.order_id,
            customer_id: checkout.customer_id,
            idempotency_key: charge_key(checkout.id, checkout.attempt),
            capture_method: self.store.capture_method(checkout.id).await?,
        };
        let mut delays = self.saga.retry_delays.iter();
        let mut may_have_charged = !ticket.opens_attempt;
        loop {
            let call = observe::timed(SagaStep::Charge, self.gateway.create_and_confirm(&request));
            let Some(answer) = self.holding_lease(checkout.id, &mut held, call).await else {
                return self.reload(checkout.id).await;
            };
            count_gateway_call(&answer);
            faults::hit(self.saga.fault, FaultPoint::AfterGatewayCall).await;
            match answer {
                Ok(outcome) => {
                    let recorded =
                        observe::timed(SagaStep::Record, self.record_outcome(checkout.id, outcome))
                            .await;
                    if let Ok(after) = &recorded {
                        count_transition(CheckoutState::Charging, after);
                    }
                    return recorded;
                }
                Err(GatewayError::Unknown(_) | GatewayError::IdempotencyConflict) => {
                    may_have_charged = true;
                    if let Some(delay) = delays.next() {
                        let wait = tokio::time::sleep(*delay);
                        if self
                            .holding_lease(checkout.id, &mut held, wait)
                            .await
                            .is_none()
                        {
                            return self.reload(checkout.id).await;
                        }
                        continue;
                    }
                    tracing::warn!("charge outcome unknown; recovery will retry with the same key");
                    return self.retry_later(checkout.id).await;
                }
                Err(
                    refusal @ (GatewayError::InvalidRequest { .. }
                    | GatewayError::Authentication(_)),
                ) if may_have_charged => {
                    // Stripe refuses a request before looking at its key (401), or stores
                    // nothing for it (400): the refusal says nothing about the earlier request.
                    tracing::error!(error = %refusal, "refused after an unknown outcome; the charge stays open");
                    return self.retry_later(checkout.id).await;
                }
                Err(GatewayError::InvalidRequest { code, message }) => {
                    // Refused before any money could move: the customer may try another method.
                    self.store
                        .abort_charge(checkout.id, self.clock.now())
                        .await?;
                    return Err(CheckoutError::PaymentMethodRefused { code, message });
                }
                Err(GatewayError::Authentication(cause)) => {
                    tracing::error!(%cause, "the payment provider refused our credentials");
                    self.store
                        .abort_charge(checkout.id, self.clock.now())
                        .await?;
                    return Err(CheckoutError::Gateway("authentication failed".into()));
                }
                Err(GatewayError::IdempotencyKeyReused(cause)) => {
                    // An earlier request with this key had other parameters and may have
                    // charged: never retry blindly; the reconciler asks the gateway.
                    tracing::error!(%cause, "idempotency key reused with other parameters");
                    self.store
                        .defer_charge(checkout.id, self.clock.now() + self.saga.retry_later)
                        .await?;
                    return Err(CheckoutError::Gateway(
                        "payment state is being reconciled".into(),
                    ));
                }
            }
        }
    }

    /// Runs `work` while renewing the charge's lease every third of its length. `None` when the
    /// lease is no longer this instance's (claimed again after all, or the checkout left
    /// `charging`, say by a webhook): `work` is dropped and the caller stops driving the
    /// checkout. Dropping a gateway call is safe: its key makes the claimant's call the same
    /// request. A renewal that fails on the store is tried again at the next tick.
    async fn holding_lease<T>(
        &self,
        id: CheckoutId,
        held: &mut DateTime<Utc>,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        let every = (self.saga.lease / 3)
            .to_std()
            .unwrap_or(StdDuration::from_secs(1))
            .max(StdDuration::from_millis(10));
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Some(done),
                () = tokio::time::sleep(every) => {
                    let lease = self.lease(self.saga.lease);
                    match self.store.renew_charge_lease(id, *held, lease).await {
                        Ok(true) => *held = lease.until,
                        Ok(false) => {
                            tracing::warn!(checkout_id = %id, "charge lease lost; leaving the checkout to its new owner");
                            return None;
                        }
                        Err(e) => tracing::warn!(error = %e, "charge lease not renewed; will retry"),
                    }
                }
            }
        }
    }

    /// Gives the lease up until recovery tries the same key again; the checkout stays
    /// `charging`.
    async fn retry_later(&self, id: CheckoutId) -> Result<Checkout, CheckoutError> {
        self.store
            .defer_charge(id, self.clock.now() + self.saga.retry_later)
            .await?;
        self.reload(id).await
    }

    async fn reload(&self, id: CheckoutId) -> Result<Checkout, CheckoutError> {
        self.store
            .find_checkout(id)
            .await?
            .ok_or(CheckoutError::Store(StoreError::NotFound("checkout")))
    }

    /// Records what the gateway said, one transaction per outcome.
    async fn record_outcome(
        &self,
        id: CheckoutId,
        outcome: ChargeOutcome,
    ) -> Result<Checkout, CheckoutError> {
        let now = self.clock.now();
        match outcome {
            ChargeOutcome::Succeeded(intent) => self.record_success(id, &intent).await,
            ChargeOutcome::Authorized(intent) => self.record_authorization(id, &intent).await,
            ChargeOutcome::RequiresAction(intent) => {
                let waiting = self
                    .store
                    .record_requires_action(
                        id,
                        &intent.id,
                        intent.client_secret.as_deref(),
                        self.lease(self.saga.reconcile_after),
                    )
                    .await?;
                faults::hit(self.saga.fault, FaultPoint::AfterRecordRequiresAction).await;
                Ok(waiting)
            }
            ChargeOutcome::Declined {
                payment_intent_id,
                decline,
            } => {
                let code = decline.decline_code.as_deref().unwrap_or(&decline.code);
                Ok(self
                    .declined(id, payment_intent_id.as_deref(), code, now)
                    .await?)
            }
        }
    }

    /// charging | requires_action → payment_failed, units and admission handed back.
    async fn declined(
        &self,
        id: CheckoutId,
        payment_intent_id: Option<&str>,
        code: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Checkout, CheckoutError> {
        let checkout = self
            .store
            .record_charge_declined(id, payment_intent_id, code, now)
            .await?;
        faults::hit(self.saga.fault, FaultPoint::AfterRecordDecline).await;
        self.settle_admission(&checkout).await;
        Ok(checkout)
    }

    /// requires_action → cancelled (authentication abandoned), units and admission handed back.
    async fn cancelled(
        &self,
        id: CheckoutId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Checkout, CheckoutError> {
        let checkout = self.store.record_charge_cancelled(id, now).await?;
        faults::hit(self.saga.fault, FaultPoint::AfterRecordCancel).await;
        self.settle_admission(&checkout).await;
        Ok(checkout)
    }

    /// succeeded → completed (stock confirmed, order paid, outbox row), or, when the units were
    /// given back meanwhile and are gone, the money goes back.
    async fn record_success(
        &self,
        id: CheckoutId,
        intent: &PaymentIntent,
    ) -> Result<Checkout, CheckoutError> {
        let checkout = self
            .store
            .record_charge_succeeded(id, &intent.id, self.clock.now())
            .await?;
        faults::hit(self.saga.fault, FaultPoint::AfterRecordSuccess).await;
        if checkout.refund_due {
            return self.refund_late_success(checkout).await;
        }
        self.settle_admission(&checkout).await;
        Ok(checkout)
    }

    /// requires_capture → completed with the order `authorized` (stock committed, the
    /// `order.authorized` event written), or, when the units were given back meanwhile and are
    /// gone, the authorization is released.
    async fn record_authorization(
        &self,
        id: CheckoutId,
        intent: &PaymentIntent,
    ) -> Result<Checkout, CheckoutError> {
        let amount = if intent.amount_capturable > 0 {
            intent.amount_capturable
        } else {
            intent.amount
        };
        let checkout = self
            .store
            .record_charge_authorized(id, &intent.id, amount, self.clock.now())
            .await?;
        faults::hit(self.saga.fault, FaultPoint::AfterRecordSuccess).await;
        if checkout.refund_due {
            return self.refund_late_success(checkout).await;
        }
        self.settle_admission(&checkout).await;
        Ok(checkout)
    }

    /// Money due back goes back, with its own idempotency key (DESIGN §3): a late success whose
    /// units were gone, or an admin refund. An authorization nothing was captured from is
    /// cancelled instead (Stripe releases the hold; there is nothing to refund).
    async fn refund_late_success(&self, checkout: Checkout) -> Result<Checkout, CheckoutError> {
        Ok(self.refund_whole(checkout).await?.0)
    }

    /// [`Self::refund_late_success`], with what the refund call came to when one was made.
    async fn refund_whole(
        &self,
        checkout: Checkout,
    ) -> Result<(Checkout, Option<RefundReport>), CheckoutError> {
        let Some(intent) = checkout.payment_intent_id.clone() else {
            return Ok((checkout, None));
        };
        if self.store.capture_method(checkout.id).await? == CaptureMethod::Manual {
            if let Some(released) = self.release_authorization(&checkout, &intent).await? {
                return Ok((released, None));
            }
        }
        let request = RefundRequest {
            payment_intent_id: intent,
            amount: None,
            idempotency_key: format!("checkout-{}-refund", checkout.id),
        };
        faults::hit(self.saga.fault, FaultPoint::BeforeRefundCall).await;
        let answer = self.gateway.refund(&request).await;
        faults::hit(self.saga.fault, FaultPoint::AfterRefundCall).await;
        match answer {
            Ok(refund) => {
                let recorded = self.record_refund(checkout.id, &refund).await?;
                faults::hit(self.saga.fault, FaultPoint::AfterRecordRefund).await;
                Ok((recorded, Some(RefundReport::of(&refund))))
            }
            Err(e) => {
                tracing::warn!(error = %e, "refund failed; recovery will retry");
                Ok((checkout, Some(RefundReport::unknown())))
            }
        }
    }

    /// An authorization with nothing captured: cancelled at the gateway under its own key and
    /// recorded as money back. `None` when something was captured (a refund is due).
    async fn release_authorization(
        &self,
        checkout: &Checkout,
        intent_id: &str,
    ) -> Result<Option<Checkout>, CheckoutError> {
        let intent = match self.gateway.retrieve(intent_id).await {
            Ok(intent) => intent,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the authorization; recovery will retry");
                return Ok(Some(checkout.clone()));
            }
        };
        if intent.amount_received > 0 {
            return Ok(None);
        }
        if intent.status != IntentStatus::Canceled {
            let key = format!("checkout-{}-release", checkout.id);
            if let Err(e) = self.gateway.cancel(intent_id, &key).await {
                tracing::warn!(error = %e, "cannot release the authorization; recovery will retry");
                return Ok(Some(checkout.clone()));
            }
        }
        let released = self
            .store
            .record_refunded(checkout.id, None, self.clock.now())
            .await?;
        self.settle_admission(&released).await;
        Ok(Some(released))
    }

    /// A refund as the gateway reports it (its answer or a `refund.*` event): only a succeeded
    /// one marks the order refunded and gives the units back; a pending one (or one whose
    /// status is `null`) waits for Stripe's event; a failed or canceled one leaves the order
    /// paid and flagged. Either way the refund exists, so recovery never asks for it again.
    async fn record_refund(
        &self,
        id: CheckoutId,
        refund: &Refund,
    ) -> Result<Checkout, CheckoutError> {
        let now = self.clock.now();
        match refund.outcome() {
            RefundOutcome::Succeeded => {
                tracing::info!(checkout_id = %id, refund = %refund.id, "payment refunded");
                let refunded = self
                    .store
                    .record_refunded(id, Some(&refund.id), now)
                    .await?;
                self.settle_admission(&refunded).await;
                Ok(refunded)
            }
            RefundOutcome::Pending => {
                tracing::info!(checkout_id = %id, refund = %refund.id, status = ?refund.status, "refund pending at the gateway");
                Ok(self
                    .store
                    .record_refund_pending(id, &refund.id, now)
                    .await?)
            }
            RefundOutcome::Failed => {
                tracing::error!(checkout_id = %id, refund = %refund.id, status = ?refund.status, "the gateway did not refund; the order stays paid");
                Ok(self.store.record_refund_failed(id, &refund.id, now).await?)
            }
        }
    }

    /// `refund.updated`, `refund.failed`, `charge.refund.updated`: one of our refunds settled.
    /// A refund we did not record (made on Stripe's dashboard, perhaps partial) is left to
    /// `charge.refunded`, which knows whether the whole payment went back; one whose answer we
    /// lost is recorded by recovery, which asks again under the same idempotency key.
    async fn refund_event(&self, refund: &Refund) -> Result<(), CheckoutError> {
        let Some(id) = self.store.checkout_for_refund(&refund.id).await? else {
            if let Some(line_refund) = self.store.line_refund_by_gateway_id(&refund.id).await? {
                self.store
                    .record_line_refund(
                        line_refund,
                        line_refund_status(refund),
                        Some(&refund.id),
                        self.clock.now(),
                    )
                    .await?;
                return Ok(());
            }
            tracing::info!(refund = %refund.id, "event of a refund holdfast did not record");
            return Ok(());
        };
        self.record_refund(id, refund).await.map(drop)
    }

    /// An admin refund of a paid order: money back through the gateway (its own idempotency
    /// key), units back on the shelf. Recorded as due first, so a crash midway is finished by
    /// recovery. An order only authorized (manual capture, nothing shipped) is cancelled
    /// instead: every unit short, back in stock, the authorization released. An order placed
    /// on account involves no gateway: its invoice is voided and its credit given back.
    ///
    /// An order captured by shipments, or one with partial refunds, gets back what is left of
    /// what was captured: an order still authorized for units not shipped is closed first (those
    /// units short, the rest of the authorization released), then every unit shipped (or sold)
    /// and not yet refunded is refunded by line and put back in stock, never more money than
    /// was captured. Answers the checkout and what the refund call came to (`None`: nothing was
    /// refunded, only an authorization released).
    pub async fn refund_order(
        &self,
        order: OrderId,
    ) -> Result<(Checkout, Option<RefundReport>), CheckoutError> {
        let current = self.admin_order(order).await?;
        if current.status == OrderStatus::Authorized {
            self.ship(order, Vec::new(), true).await?;
            return Ok((self.reload(current.checkout_id).await?, None));
        }
        if current.authorized_amount.is_some() || self.has_partial_refunds(&current).await? {
            return self.refund_rest(current).await;
        }
        if current.invoice_id.is_some() {
            let checkout = self
                .store
                .refund_on_account(order, self.clock.now())
                .await?;
            return Ok((checkout, None));
        }
        let checkout = self.store.request_refund(order, self.clock.now()).await?;
        self.refund_whole(checkout).await
    }

    async fn has_partial_refunds(&self, order: &Order) -> Result<bool, CheckoutError> {
        Ok(match &order.payment_intent_id {
            Some(intent) => self.store.line_refunds_of_payment(intent).await?.is_some(),
            None => false,
        })
    }

    /// The whole refund of an order captured by shipments or partly refunded: see
    /// [`Self::refund_order`].
    async fn refund_rest(
        &self,
        current: Order,
    ) -> Result<(Checkout, Option<RefundReport>), CheckoutError> {
        let order = current.id;
        if current.status == OrderStatus::PartiallyFulfilled {
            let (closed, settled) = self.ship(order, Vec::new(), true).await?;
            if !settled {
                // The release's answer is unknown; recovery finishes it, then a refund can.
                let checkout = self.reload(current.checkout_id).await?;
                return Ok((checkout, Some(RefundReport::unknown())));
            }
            if closed.captured_amount == 0 {
                return Ok((self.reload(current.checkout_id).await?, None));
            }
        }
        let (_, report) = self.refund_by_line(order, Vec::new(), true, true).await?;
        Ok((self.reload(current.checkout_id).await?, Some(report)))
    }

    /// Manual capture: ships `lines` of an authorized order and captures their amount
    /// (`amount_to_capture`; `final_capture=false` while more is to ship, so each shipment
    /// captures its own part by multicapture). The order's `last` shipment, or the one that
    /// ships its last units, releases the rest of the authorization; units not shipped by then
    /// are short, back in stock and never captured. The shipment and its capture key are
    /// recorded before the call, its outcome after; recovery repeats a capture whose answer
    /// was lost with the same key. Answers the order and whether the capture is settled.
    #[tracing::instrument(skip_all, fields(order_id = %order))]
    pub async fn ship(
        &self,
        order: OrderId,
        lines: Vec<(Sku, u32)>,
        last: bool,
    ) -> Result<(Order, bool), CheckoutError> {
        let ticket = self
            .store
            .begin_shipment(&self.new_shipment(order, lines, last))
            .await?;
        faults::hit(self.saga.fault, FaultPoint::BeforeCaptureCall).await;
        self.capture_shipment(&ticket).await
    }

    /// A shipment of `order` starting now, under a fresh id and this instance's lease.
    fn new_shipment(&self, order: OrderId, lines: Vec<(Sku, u32)>, last: bool) -> NewShipment {
        let now = self.clock.now();
        NewShipment {
            id: uuid::Uuid::new_v4(),
            order,
            lines,
            last,
            lease_until: now + self.saga.lease,
            now,
        }
    }

    /// The capture of one recorded shipment, under its key. A shipment that ships nothing
    /// (only short lines close the order) releases the authorization by cancelling it.
    async fn capture_shipment(
        &self,
        ticket: &ShipmentTicket,
    ) -> Result<(Order, bool), CheckoutError> {
        let answer = if ticket.amount == 0 {
            self.gateway
                .cancel(&ticket.payment_intent_id, &ticket.capture_key)
                .await
        } else {
            self.gateway
                .capture(&CaptureRequest {
                    payment_intent_id: ticket.payment_intent_id.clone(),
                    amount_to_capture: ticket.amount,
                    final_capture: ticket.final_capture,
                    idempotency_key: ticket.capture_key.clone(),
                })
                .await
        };
        faults::hit(self.saga.fault, FaultPoint::AfterCaptureCall).await;
        let now = self.clock.now();
        match answer {
            Ok(intent) => {
                tracing::info!(shipment = %ticket.id, amount = ticket.amount, status = intent.status.as_str(), "shipment captured");
                let order = self.store.record_shipment_captured(ticket.id, now).await?;
                faults::hit(self.saga.fault, FaultPoint::AfterRecordCapture).await;
                debug_assert!(
                    order
                        .authorized_amount
                        .is_none_or(|a| order.captured_amount <= a),
                    "captured more than authorized"
                );
                Ok((order, true))
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(shipment = %ticket.id, error = %e, "capture outcome unknown; recovery repeats it with the same key");
                Ok((self.admin_order(ticket.order_id).await?, false))
            }
            Err(e) => {
                tracing::error!(shipment = %ticket.id, error = %e, "the gateway refused the capture");
                let order = self
                    .store
                    .record_shipment_failed(ticket.id, &e.to_string(), now)
                    .await?;
                Ok((order, true))
            }
        }
    }

    /// The authorization worker: an order still holding an authorization older than the
    /// window is closed before the card network lets the authorization lapse. What shipped was
    /// captured by its shipment; every unit not shipped is short (back in stock) and the rest
    /// of the authorization is released. Returns how many orders were settled.
    async fn settle_old_authorizations(&self, limit: u32) -> Result<usize, CheckoutError> {
        let before = self.clock.now() - self.authorization_window;
        let due = self.store.authorizations_before(before, limit).await?;
        for order in &due {
            tracing::warn!(order_id = %order, "authorization window over; closing the order");
            match self.ship(*order, Vec::new(), true).await {
                Ok(_) | Err(CheckoutError::Store(StoreError::ShipmentInProgress)) => {}
                Err(e) => {
                    tracing::warn!(order_id = %order, error = %e, "cannot settle the authorization; will retry")
                }
            }
        }
        Ok(due.len())
    }

    /// `payment_intent.canceled` for an order still holding its authorization (it lapsed at
    /// the card network, or was cancelled on Stripe's dashboard): nothing more can be
    /// captured, so the order is closed as its last shipment would close it (units not shipped
    /// back in stock), without a gateway call. `fulfilled` if something was captured,
    /// `cancelled` otherwise; never `authorized` for ever.
    async fn authorization_ended(&self, order: OrderId) -> Result<(), CheckoutError> {
        let new = self.new_shipment(order, Vec::new(), true);
        let ticket = self.store.begin_shipment(&new).await?;
        tracing::warn!(order_id = %order, "the authorization ended at the gateway; order closed");
        self.store
            .record_shipment_captured(ticket.id, new.now)
            .await?;
        Ok(())
    }

    /// A partial refund by line: exactly those units' amount back through the gateway (its own
    /// key), never more than was captured; `restock` puts the units back in stock once it
    /// succeeded. Recorded before the call, its answer after; Stripe's `charge.refunded`
    /// (`amount_refunded`) and `refund.*` events settle the same record, whichever comes
    /// first. Answers the order and what the refund came to (Stripe may fail it: the units
    /// are refundable again and the answer says why).
    #[tracing::instrument(skip_all, fields(order_id = %order))]
    pub async fn refund_lines(
        &self,
        order: OrderId,
        lines: Vec<(Sku, u32)>,
        restock: bool,
    ) -> Result<(Order, RefundReport), CheckoutError> {
        self.refund_by_line(order, lines, false, restock).await
    }

    /// Records a refund of `lines` (`rest`: of every unit still refundable) and asks the
    /// gateway for it.
    async fn refund_by_line(
        &self,
        order: OrderId,
        lines: Vec<(Sku, u32)>,
        rest: bool,
        restock: bool,
    ) -> Result<(Order, RefundReport), CheckoutError> {
        let now = self.clock.now();
        let ticket = self
            .store
            .begin_line_refund(&NewLineRefund {
                id: uuid::Uuid::new_v4(),
                order,
                lines,
                rest,
                restock,
                lease_until: now + self.saga.lease,
                now,
            })
            .await?;
        self.send_line_refund(&ticket).await
    }

    async fn send_line_refund(
        &self,
        ticket: &LineRefundTicket,
    ) -> Result<(Order, RefundReport), CheckoutError> {
        faults::hit(self.saga.fault, FaultPoint::BeforeRefundCall).await;
        let answer = self
            .gateway
            .refund(&RefundRequest {
                payment_intent_id: ticket.payment_intent_id.clone(),
                amount: Some(ticket.amount),
                idempotency_key: ticket.refund_key.clone(),
            })
            .await;
        faults::hit(self.saga.fault, FaultPoint::AfterRefundCall).await;
        let now = self.clock.now();
        match answer {
            Ok(refund) => {
                let status = line_refund_status(&refund);
                let order = self
                    .store
                    .record_line_refund(ticket.id, status, Some(&refund.id), now)
                    .await?;
                faults::hit(self.saga.fault, FaultPoint::AfterRecordRefund).await;
                if status == LineRefundStatus::Failed {
                    tracing::error!(refund = %ticket.id, reason = ?refund.failure_reason, "the gateway failed the refund");
                }
                Ok((order, RefundReport::of(&refund)))
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(refund = %ticket.id, error = %e, "refund outcome unknown; recovery repeats it with the same key");
                Ok((
                    self.admin_order(ticket.order_id).await?,
                    RefundReport::unknown(),
                ))
            }
            Err(e) => {
                tracing::error!(refund = %ticket.id, error = %e, "the gateway refused the refund");
                self.store
                    .record_line_refund(ticket.id, LineRefundStatus::Failed, None, now)
                    .await?;
                Err(CheckoutError::Gateway(e.to_string()))
            }
        }
    }

    /// `charge.refunded` for a payment with partial refunds: Stripe's `amount_refunded` is
    /// the running total. What it holds beyond what is recorded settles the open partial
    /// refunds it accounts for, oldest first, on the very rows the admin's answers settle.
    /// False when the payment has no partial refund (the whole-refund path decides).
    async fn converge_line_refunds(
        &self,
        intent_id: &str,
        amount_refunded: i64,
    ) -> Result<bool, CheckoutError> {
        let Some((recorded, open)) = self.store.line_refunds_of_payment(intent_id).await? else {
            return Ok(false);
        };
        let mut unexplained = amount_refunded - recorded;
        for (id, amount) in open {
            if amount <= unexplained {
                self.store
                    .record_line_refund(id, LineRefundStatus::Succeeded, None, self.clock.now())
                    .await?;
                unexplained -= amount;
            }
        }
        if unexplained > 0 {
            tracing::warn!(payment_intent = %intent_id, unexplained, "refunded at Stripe beyond the recorded refunds");
        }
        Ok(true)
    }

    /// `charge.dispute.created` puts the order on hold (`disputed`, with an `order.disputed`
    /// event so the warehouse stops); `charge.dispute.closed` records the outcome: won gives
    /// the order back its status, lost leaves it `refunded_by_dispute` with its stock as it
    /// is (an admin restock brings returned goods back). Other dispute events change nothing.
    async fn dispute_event(
        &self,
        event_type: &str,
        dispute_id: &str,
        intent_id: &str,
        status: &str,
    ) -> Result<(), CheckoutError> {
        let outcome = match (event_type, status) {
            ("charge.dispute.created", _) => store::DisputeStatus::Open,
            ("charge.dispute.closed", "lost") => store::DisputeStatus::Lost,
            // `won`, or `warning_closed`: an inquiry that never became a chargeback.
            ("charge.dispute.closed", _) => store::DisputeStatus::Won,
            _ => return Ok(()),
        };
        match self
            .store
            .record_dispute(intent_id, dispute_id, outcome, self.clock.now())
            .await?
        {
            Some(order) => {
                tracing::warn!(order_id = %order.id, %dispute_id, status, "dispute recorded");
            }
            None => {
                tracing::warn!(payment_intent = %intent_id, %dispute_id, "dispute of a payment of no known order")
            }
        }
        Ok(())
    }

    /// Any order by id, as the admin sees it.
    async fn admin_order(&self, order: OrderId) -> Result<Order, CheckoutError> {
        Ok(self
            .store
            .admin_order(order)
            .await?
            .ok_or(StoreError::NotFound("order"))?)
    }

    /// Partial refunds whose answer was lost: asked again with their own keys. Partial refunds
    /// Stripe has held pending for longer than the reconcile threshold (a lost `refund.*`
    /// event): read again and recorded as their event would have been.
    async fn recover_line_refunds(&self, limit: u32) -> Result<usize, CheckoutError> {
        let lease = self.lease(self.saga.lease);
        let stalled = self.store.claim_stalled_line_refunds(limit, lease).await?;
        for ticket in &stalled {
            if let Err(e) = self.send_line_refund(ticket).await {
                tracing::warn!(refund = %ticket.id, error = %e, "refund recovery failed");
            }
        }
        let settled_before = lease.now - self.saga.reconcile_after;
        let pending = self
            .store
            .claim_pending_line_refunds(settled_before, limit, lease)
            .await?;
        for (id, refund_id) in &pending {
            match self.gateway.retrieve_refund(refund_id).await {
                Ok(refund) => {
                    self.store
                        .record_line_refund(
                            *id,
                            line_refund_status(&refund),
                            Some(refund_id),
                            self.clock.now(),
                        )
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(refund = %refund_id, error = %e, "cannot read the refund; will retry");
                }
            }
        }
        Ok(stalled.len() + pending.len())
    }

    /// Shipments whose capture was left unsettled (crash, unknown answer): captured again with
    /// their own keys. Returns how many were claimed.
    async fn recover_shipments(&self, limit: u32) -> Result<usize, CheckoutError> {
        let lease = self.lease(self.saga.lease);
        let stalled = self.store.claim_stalled_shipments(limit, lease).await?;
        for ticket in &stalled {
            if let Err(e) = self.capture_shipment(ticket).await {
                tracing::warn!(shipment = %ticket.id, error = %e, "capture recovery failed; will retry");
            }
        }
        Ok(stalled.len())
    }

    /// A verified webhook event moves its checkout on; duplicates and late events never move
    /// one backwards (each store phase checks the state it starts from).
    #[tracing::instrument(skip_all, fields(event_id = %event.id, event_type = %event.event_type))]
    pub async fn handle_event(&self, event: &WebhookEvent) -> Result<(), CheckoutError> {
        match &event.object {
            EventObject::PaymentIntent(intent) => {
                self.handle_intent_event(&event.event_type, intent).await
            }
            EventObject::Charge {
                payment_intent: Some(intent_id),
                refunded,
                amount_refunded,
                ..
            } if event.event_type == "charge.refunded" => {
                if self
                    .converge_line_refunds(intent_id, *amount_refunded)
                    .await?
                {
                    return Ok(());
                }
                self.refunded_at_gateway(intent_id, *refunded).await
            }
            EventObject::Dispute {
                id,
                payment_intent: Some(intent_id),
                status,
            } if event.event_type.starts_with("charge.dispute.") => {
                self.dispute_event(&event.event_type, id, intent_id, status)
                    .await
            }
            EventObject::Refund(refund)
                if matches!(
                    event.event_type.as_str(),
                    "refund.updated" | "refund.failed" | "charge.refund.updated"
                ) =>
            {
                self.refund_event(refund).await
            }
            _ => Ok(()),
        }
    }

    async fn handle_intent_event(
        &self,
        event_type: &str,
        intent: &PaymentIntent,
    ) -> Result<(), CheckoutError> {
        let Some(checkout) = self.checkout_for_intent(intent).await? else {
            tracing::warn!(payment_intent = %intent.id, "event for a payment of no known checkout");
            return Ok(());
        };
        if event_type == "payment_intent.canceled" && checkout.state == CheckoutState::Completed {
            let order = self.store.admin_order(checkout.order_id).await?;
            if order.is_some_and(|o| {
                matches!(
                    o.status,
                    OrderStatus::Authorized | OrderStatus::PartiallyFulfilled
                )
            }) {
                return self.authorization_ended(checkout.order_id).await;
            }
        }
        let now = self.clock.now();
        let after = match event_type {
            "payment_intent.succeeded" => Some(self.record_success(checkout.id, intent).await?),
            "payment_intent.amount_capturable_updated"
                if intent.status == IntentStatus::RequiresCapture =>
            {
                Some(self.record_authorization(checkout.id, intent).await?)
            }
            "payment_intent.payment_failed" => {
                let code = intent
                    .last_payment_error
                    .as_ref()
                    .map(|d| d.decline_code.clone().unwrap_or_else(|| d.code.clone()))
                    .unwrap_or_else(|| "payment_failed".to_owned());
                Some(
                    self.declined(checkout.id, Some(&intent.id), &code, now)
                        .await?,
                )
            }
            "payment_intent.canceled" => Some(self.cancelled(checkout.id, now).await?),
            _ => None,
        };
        if let Some(after) = &after {
            count_transition(checkout.state, after);
        }
        Ok(())
    }

    /// `charge.refunded`: money went back through the gateway, by our own refund (whose event
    /// repeats what `record_refunded` did) or from Stripe's dashboard. A full refund of the
    /// payment a checkout kept ends it `refunded` exactly as our own refund path does; a
    /// partial one changes nothing. A refund that arrives before the success it undoes is
    /// refused, so Stripe delivers it again once the success is recorded (out of order, it
    /// must neither be lost nor let the late success sell the units).
    async fn refunded_at_gateway(&self, intent_id: &str, fully: bool) -> Result<(), CheckoutError> {
        if !fully {
            tracing::info!(payment_intent = %intent_id, "partial refund; the order stays as it is");
            return Ok(());
        }
        let Some(checkout) = self.checkout_of_payment(intent_id).await? else {
            tracing::warn!(payment_intent = %intent_id, "refund of a payment of no known checkout");
            return Ok(());
        };
        let kept = checkout.payment_intent_id.as_deref() == Some(intent_id);
        match checkout.state {
            CheckoutState::Refunded => Ok(()),
            state if !state.is_terminal() => Err(StoreError::CheckoutState(state).into()),
            _ if !kept => {
                tracing::warn!(checkout_id = %checkout.id, payment_intent = %intent_id, "refund of a payment the checkout did not keep");
                Ok(())
            }
            _ if self.refund_unsettled(&checkout).await? => {
                // Our own refund is pending or failed: its `refund.*` event settles it.
                tracing::info!(checkout_id = %checkout.id, "charge.refunded while our refund is unsettled; waiting for its refund event");
                Ok(())
            }
            _ => {
                let refunded = self
                    .store
                    .record_refunded(checkout.id, None, self.clock.now())
                    .await?;
                self.settle_admission(&refunded).await;
                Ok(())
            }
        }
    }

    /// The checkout's order carries a refund of ours that is pending or failed.
    async fn refund_unsettled(&self, checkout: &Checkout) -> Result<bool, CheckoutError> {
        let order = self.store.admin_order(checkout.order_id).await?;
        Ok(order
            .and_then(|o| o.refund_status)
            .is_some_and(|s| s == "pending" || s == "failed"))
    }

    /// By PaymentIntent id, or, while our record of the payment lags behind (its outcome
    /// still unknown), by the metadata of the intent as the gateway holds it.
    async fn checkout_of_payment(
        &self,
        intent_id: &str,
    ) -> Result<Option<Checkout>, CheckoutError> {
        if let Some(found) = self.store.checkout_by_payment_intent(intent_id).await? {
            return Ok(Some(found));
        }
        match self.gateway.retrieve(intent_id).await {
            Ok(intent) => self.checkout_for_intent(&intent).await,
            // Not a payment of this account.
            Err(GatewayError::InvalidRequest { .. }) => Ok(None),
            Err(e) => Err(CheckoutError::Gateway(e.to_string())),
        }
    }

    /// By PaymentIntent id first, metadata second (the webhook may beat the charge response).
    async fn checkout_for_intent(
        &self,
        intent: &PaymentIntent,
    ) -> Result<Option<Checkout>, CheckoutError> {
        if let Some(found) = self.store.checkout_by_payment_intent(&intent.id).await? {
            return Ok(Some(found));
        }
        let Some(id) = intent.checkout_id() else {
            return Ok(None);
        };
        Ok(self.store.find_checkout(id).await?)
    }

    /// One recovery batch: checkouts whose lease ran out (crashed instance, unknown outcome,
    /// authentication pending), money due back, and refunds pending for longer than the
    /// reconcile threshold. Returns how many were claimed.
    pub async fn recover_stalled(&self, limit: u32) -> Result<usize, CheckoutError> {
        let lease = self.lease(self.saga.lease);
        let tickets = self.store.claim_stalled(limit, lease).await?;
        for ticket in &tickets {
            if let Err(e) = self.recover(ticket, lease.until).await {
                tracing::warn!(checkout_id = %ticket.checkout.id, error = %e, "recovery step failed; will retry");
            }
        }
        Ok(tickets.len()
            + self.reconcile_pending_refunds(limit).await?
            + self.recover_shipments(limit).await?
            + self.recover_line_refunds(limit).await?
            + self.settle_old_authorizations(limit).await?)
    }

    /// Lost `refund.*` events: a refund pending at the gateway for longer than the reconcile
    /// threshold is read again and recorded as its event would have been ([`Self::record_refund`]);
    /// one still pending waits another threshold. Returns how many were read.
    async fn reconcile_pending_refunds(&self, limit: u32) -> Result<usize, CheckoutError> {
        let lease = self.lease(self.saga.lease);
        let settled_before = lease.now - self.saga.reconcile_after;
        let pending = self
            .store
            .claim_pending_refunds(settled_before, limit, lease)
            .await?;
        for (id, refund_id) in &pending {
            let refund = match self.gateway.retrieve_refund(refund_id).await {
                Ok(refund) => refund,
                Err(e) => {
                    tracing::warn!(checkout_id = %id, refund = %refund_id, error = %e, "cannot read the refund; will retry");
                    continue;
                }
            };
            if let Err(e) = self.record_refund(*id, &refund).await {
                tracing::warn!(checkout_id = %id, refund = %refund_id, error = %e, "recording the refund failed; will retry");
            }
        }
        Ok(pending.len())
    }

    async fn recover(
        &self,
        ticket: &ChargeTicket,
        held: DateTime<Utc>,
    ) -> Result<(), CheckoutError> {
        let checkout = &ticket.checkout;
        tracing::info!(checkout_id = %checkout.id, state = checkout.state.as_str(), "recovering checkout");
        if checkout.refund_due {
            self.refund_late_success(checkout.clone()).await?;
            return Ok(());
        }
        match checkout.state {
            CheckoutState::Charging => self.recover_charge(ticket, held).await?,
            CheckoutState::RequiresAction => self.reconcile_action(checkout).await?,
            _ => {}
        }
        Ok(())
    }

    /// Repeats the charge with its key. Whatever that ends in (unknown again, a reused key, a
    /// refusal after an unknown outcome, a store error), a charge in flight for longer than the
    /// reconcile threshold is settled from what the gateway holds, so no answer of the create
    /// can keep a paid checkout in `charging` for ever (promise 4).
    async fn recover_charge(
        &self,
        ticket: &ChargeTicket,
        held: DateTime<Utc>,
    ) -> Result<(), CheckoutError> {
        let id = ticket.checkout.id;
        // The batch was claimed together: a claim that lapsed while earlier checkouts of the
        // batch were driven may have been taken by another instance since.
        let lease = self.lease(self.saga.lease);
        if !self.store.renew_charge_lease(id, held, lease).await? {
            return Ok(());
        }
        let driven = self.drive_charge(ticket, lease.until).await;
        let still_charging = match &driven {
            Ok(after) => after.state == CheckoutState::Charging,
            Err(_) => self.reload(id).await?.state == CheckoutState::Charging,
        };
        let in_flight_for_long = ticket
            .charge_started_at
            .is_none_or(|since| self.clock.now() - since >= self.saga.reconcile_after);
        if still_charging && in_flight_for_long && self.settle_from_gateway(id).await? {
            return Ok(());
        }
        driven.map(|_| ())
    }

    /// The create gives no usable answer: ask the gateway what it holds for the checkout (by
    /// metadata; Stripe's search lags, hence only for charges in flight a while). True when a
    /// payment was found and recorded.
    async fn settle_from_gateway(&self, id: CheckoutId) -> Result<bool, CheckoutError> {
        let intents = match self.gateway.intents_for_checkout(id).await {
            Ok(intents) => intents,
            Err(e) => {
                tracing::warn!(error = %e, "cannot search the gateway; will retry");
                return Ok(false);
            }
        };
        let found = intents.iter().find(|i| {
            matches!(
                i.status,
                IntentStatus::Succeeded | IntentStatus::RequiresCapture
            )
        });
        match found {
            Some(paid) => {
                tracing::info!(checkout_id = %id, payment_intent_id = %paid.id, "charge settled from the gateway");
                if paid.status == IntentStatus::RequiresCapture {
                    self.record_authorization(id, paid).await?;
                } else {
                    self.record_success(id, paid).await?;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// requires_action → cancelled: the PaymentIntent is cancelled at the gateway (one key per
    /// checkout, so a retry is the same request), then the units and admission handed back. A
    /// payment that succeeded meanwhile is recorded as paid instead.
    async fn cancel_authentication(&self, checkout: &Checkout) -> Result<Checkout, CheckoutError> {
        let Some(intent_id) = checkout.payment_intent_id.as_deref() else {
            return Err(StoreError::CheckoutState(checkout.state).into());
        };
        let key = format!("checkout-{}-cancel", checkout.id);
        let after = self
            .gateway
            .cancel(intent_id, &key)
            .await
            .map_err(|e| CheckoutError::Gateway(e.to_string()))?;
        faults::hit(self.saga.fault, FaultPoint::AfterCancelCall).await;
        if after.status == IntentStatus::Succeeded {
            return self.record_success(checkout.id, &after).await;
        }
        if after.status == IntentStatus::RequiresCapture {
            return self.record_authorization(checkout.id, &after).await;
        }
        self.cancelled(checkout.id, self.clock.now()).await
    }

    /// How long a checkout may wait for the customer's authentication: its lifetime, or in a
    /// flash sale its reservation window (heartbeats push it), so an abandoned 3-D Secure step
    /// does not keep a sale unit from the next buyer for half an hour.
    fn authentication_deadline(checkout: &Checkout) -> DateTime<Utc> {
        match checkout.flash_sale_id {
            Some(_) => checkout.expires_at.min(checkout.max_expires_at),
            None => checkout.max_expires_at,
        }
    }

    /// Lost webhooks: a checkout waiting for authentication is checked with the gateway; when
    /// its wait is over ([`Self::authentication_deadline`]) the PaymentIntent is cancelled and
    /// the units released.
    async fn reconcile_action(&self, checkout: &Checkout) -> Result<(), CheckoutError> {
        let Some(intent_id) = checkout.payment_intent_id.as_deref() else {
            return Ok(());
        };
        let intent = match self.gateway.retrieve(intent_id).await {
            Ok(intent) => intent,
            Err(e) => {
                tracing::warn!(error = %e, "cannot retrieve the payment; will retry");
                return Ok(());
            }
        };
        let now = self.clock.now();
        match intent.status {
            IntentStatus::Succeeded => {
                self.record_success(checkout.id, &intent).await?;
            }
            IntentStatus::RequiresCapture => {
                self.record_authorization(checkout.id, &intent).await?;
            }
            IntentStatus::Canceled => {
                self.cancelled(checkout.id, now).await?;
            }
            IntentStatus::RequiresPaymentMethod => {
                self.declined(checkout.id, Some(&intent.id), "authentication_failed", now)
                    .await?;
            }
            _ if now >= Self::authentication_deadline(checkout) => {
                let key = format!("checkout-{}-cancel", checkout.id);
                let answer = self.gateway.cancel(intent_id, &key).await;
                faults::hit(self.saga.fault, FaultPoint::AfterCancelCall).await;
                match answer {
                    Ok(after) if after.status == IntentStatus::Succeeded => {
                        self.record_success(checkout.id, &after).await?;
                    }
                    Ok(_) => {
                        self.cancelled(checkout.id, now).await?;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot cancel the payment; will retry"),
                }
            }
            // Still waiting for the customer: look again later (the claim's lease says when).
            _ => {}
        }
        Ok(())
    }
}

/// A refund's outcome as a partial refund records it.
fn line_refund_status(refund: &Refund) -> LineRefundStatus {
    match refund.outcome() {
        RefundOutcome::Succeeded => LineRefundStatus::Succeeded,
        RefundOutcome::Failed => LineRefundStatus::Failed,
        RefundOutcome::Pending => LineRefundStatus::Pending,
    }
}

/// Metrics: how a reservation attempt ended.
fn count_reservation(result: &Result<Checkout, StoreError>) {
    match result {
        Ok(_) => observe::checkout(CheckoutOutcome::Reserved),
        Err(StoreError::InsufficientStock(_)) => {
            observe::checkout(CheckoutOutcome::InsufficientStock)
        }
        Err(_) => {}
    }
}

/// Metrics: a recorded outcome counts once, when it moved the checkout. Phases are idempotent
/// (a webhook repeating what the charge response said returns the checkout unchanged), so the
/// state before is what tells a move from a repeat.
fn count_transition(before: CheckoutState, after: &Checkout) {
    if before == after.state {
        return;
    }
    let outcome = match after.state {
        CheckoutState::Completed => CheckoutOutcome::Completed,
        CheckoutState::PaymentFailed => CheckoutOutcome::PaymentFailed,
        CheckoutState::RequiresAction => CheckoutOutcome::RequiresAction,
        CheckoutState::Cancelled => CheckoutOutcome::Cancelled,
        _ => return,
    };
    observe::checkout(outcome);
}

/// Metrics: what one charge call answered.
fn count_gateway_call(answer: &Result<ChargeOutcome, GatewayError>) {
    observe::gateway_call(match answer {
        Ok(ChargeOutcome::Succeeded(_)) => "succeeded",
        Ok(ChargeOutcome::Authorized(_)) => "authorized",
        Ok(ChargeOutcome::RequiresAction(_)) => "requires_action",
        Ok(ChargeOutcome::Declined { .. }) => "declined",
        Err(GatewayError::Unknown(_)) => "unknown",
        Err(GatewayError::IdempotencyConflict) => "idempotency_conflict",
        Err(GatewayError::InvalidRequest { .. }) => "invalid_request",
        Err(GatewayError::Authentication(_)) => "authentication_error",
        Err(GatewayError::IdempotencyKeyReused(_)) => "idempotency_key_reused",
    });
}
