//! Starting without a broker (DESIGN §1): Redis and NATS are needed only by flash sales and by
//! fulfilment events, so an outage of either must not stop the whole service from starting.
//! Holdfast then serves degraded: the gate answers [`GateError::Unavailable`] (`503
//! admission_unavailable`, it fails closed), events wait in the outbox (promise 5 keeps them),
//! and a reconnect loop with bounded backoff plugs the broker in once it answers, without a
//! restart. `/readyz` and the ops page say which broker is down.
//!
//! [`Broker`] is one broker's last known state: down until connected, then down again whenever a
//! call fails for want of it, up after the next call that succeeds. [`LateGate`] and
//! [`LateSink`] stand in for the real gate and sink until the reconnect loop sets them.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, CustomerId, FlashSaleId};
use crate::flash_sale::{
    Admission, AdmissionGate, Claim, GateError, GateFigures, SaleRecord, SaleTerms,
};
use crate::outbox::{EventSink, SinkError};
use crate::store::OutboxEvent;

/// The first pause of the reconnect loop; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(200);

/// The longest pause between two connection attempts: a broker that comes back is used within
/// this, and a broker that stays away costs one attempt per this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What `/readyz` and the ops page show of one broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokerStatus {
    /// `redis` or `nats`.
    pub name: &'static str,
    /// `up` or `down`.
    pub status: &'static str,
    /// Why it is down (the last failure); absent when up.
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Broker {
    name: &'static str,
    /// `None` while up, else the last failure. A std `Mutex`: held for a copy, never across an
    /// await.
    down: Mutex<Option<String>>,
}

impl Broker {
    /// A broker not connected yet.
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            down: Mutex::new(Some("not connected yet".to_owned())),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_up(&self) -> bool {
        self.lock().is_none()
    }

    pub fn mark_up(&self) {
        *self.lock() = None;
    }

    pub fn mark_down(&self, why: impl Into<String>) {
        *self.lock() = Some(why.into());
    }

    pub fn status(&self) -> BrokerStatus {
        let down = self.lock().clone();
        BrokerStatus {
            name: self.name,
            status: if down.is_some() { "down" } else { "up" },
            error: down,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The value is a plain copy: a panic elsewhere cannot leave it half written.
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every broker this process was configured with, in a fixed order (`redis`, `nats`).
#[derive(Debug, Clone, Default)]
pub struct Brokers(Vec<Arc<Broker>>);

impl Brokers {
    pub fn push(&mut self, broker: Arc<Broker>) {
        self.0.push(broker);
    }

    pub fn statuses(&self) -> Vec<BrokerStatus> {
        self.0.iter().map(|b| b.status()).collect()
    }

    pub fn all_up(&self) -> bool {
        self.0.iter().all(|b| b.is_up())
    }
}

/// Calls `attempt` until it succeeds or `stop` is cancelled, pausing [`BACKOFF_START`] after the
/// first failure and doubling up to [`BACKOFF_MAX`]. `None` when stopped first.
pub async fn connect_with_backoff<T, F, Fut>(
    broker: &Broker,
    stop: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut pause = BACKOFF_START;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        match outcome {
            Ok(connected) => {
                broker.mark_up();
                tracing::info!(broker = broker.name(), "connected; leaving degraded mode");
                return Some(connected);
            }
            Err(e) => {
                tracing::debug!(broker = broker.name(), error = %e, "still unreachable");
                broker.mark_down(e);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(BACKOFF_MAX);
    }
}

/// The flash-sale gate once connected; until then every call answers `Unavailable`.
pub struct LateGate {
    name: &'static str,
    inner: OnceLock<Arc<dyn AdmissionGate>>,
    broker: Arc<Broker>,
}

impl LateGate {
    pub fn new(name: &'static str, broker: Arc<Broker>) -> Self {
        Self {
            name,
            inner: OnceLock::new(),
            broker,
        }
    }

    /// Plugs the connected gate in; a second call is ignored (the first gate stays).
    pub fn set(&self, gate: Arc<dyn AdmissionGate>) {
        if self.inner.set(gate).is_ok() {
            self.broker.mark_up();
        }
    }

    fn gate(&self) -> Result<&Arc<dyn AdmissionGate>, GateError> {
        self.inner.get().ok_or_else(|| {
            GateError::Unavailable(format!("{} is not connected yet", self.broker.name()))
        })
    }

    /// Keeps the broker's state in step with what its calls find.
    fn observe<T>(&self, result: Result<T, GateError>) -> Result<T, GateError> {
        match &result {
            Err(GateError::Unavailable(why)) => self.broker.mark_down(why.clone()),
            _ => self.broker.mark_up(),
        }
        result
    }
}

#[async_trait]
impl AdmissionGate for LateGate {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: chrono::Duration,
    ) -> Result<Admission, GateError> {
        let gate = self.gate()?;
        self.observe(gate.admit(terms, customer, now, hold).await)
    }

    fn keeps_budgets(&self) -> bool {
        self.gate().is_ok_and(|gate| gate.keeps_budgets())
    }

    async fn admit_within(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: chrono::Duration,
        budget: &crate::flash_sale::RequestBudget,
    ) -> Result<Admission, GateError> {
        let gate = self.gate()?;
        self.observe(gate.admit_within(terms, customer, now, hold, budget).await)
    }

    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError> {
        let gate = self.gate()?;
        self.observe(gate.check(sale, customer, token, now).await)
    }

    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError> {
        let gate = self.gate()?;
        self.observe(gate.extend(sale, customer, until).await)
    }

    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        let gate = self.gate()?;
        self.observe(gate.release(sale, customer, checkout).await)
    }

    async fn claim(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        units: u32,
        now: DateTime<Utc>,
    ) -> Result<Claim, GateError> {
        let gate = self.gate()?;
        self.observe(gate.claim(terms, customer, units, now).await)
    }

    async fn consume(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
        units: u32,
    ) -> Result<(), GateError> {
        let gate = self.gate()?;
        self.observe(gate.consume(sale, customer, checkout, units).await)
    }

    async fn refund(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        let gate = self.gate()?;
        self.observe(gate.refund(sale, customer, checkout).await)
    }

    async fn load(&self, sale: FlashSaleId, record: &SaleRecord) -> Result<bool, GateError> {
        let gate = self.gate()?;
        self.observe(gate.load(sale, record).await)
    }

    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError> {
        let gate = self.gate()?;
        self.observe(gate.figures(sale, now).await)
    }
}

/// The event sink once connected; until then it is not [`EventSink::ready`], so the relay
/// leaves the outbox alone (no claim, no lease to wait out once the broker is back).
pub struct LateSink {
    inner: OnceLock<Arc<dyn EventSink>>,
    broker: Arc<Broker>,
}

impl LateSink {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            inner: OnceLock::new(),
            broker,
        }
    }

    /// Plugs the connected sink in; a second call is ignored (the first sink stays).
    pub fn set(&self, sink: Arc<dyn EventSink>) {
        if self.inner.set(sink).is_ok() {
            self.broker.mark_up();
        }
    }
}

#[async_trait]
impl EventSink for LateSink {
    fn ready(&self) -> bool {
        self.inner.get().is_some()
    }

    async fn publish(&self, event: &OutboxEvent) -> Result<(), SinkError> {
        let sink = self.inner.get().ok_or_else(|| {
            SinkError::Unavailable(format!("{} is not connected yet", self.broker.name()))
        })?;
        let result = sink.publish(event).await;
        match &result {
            Err(e @ (SinkError::Unavailable(_) | SinkError::Timeout(_))) => {
                self.broker.mark_down(e.to_string())
            }
            Err(_) => {}
            Ok(()) => self.broker.mark_up(),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_is_down_until_connected_and_says_why() {
        let broker = Broker::new("redis");
        assert_eq!(broker.status().status, "down");
        broker.mark_up();
        assert_eq!(
            broker.status(),
            BrokerStatus {
                name: "redis",
                status: "up",
                error: None
            }
        );
        broker.mark_down("connection refused");
        assert_eq!(broker.status().error.as_deref(), Some("connection refused"));
    }

    #[tokio::test]
    async fn a_late_gate_refuses_until_its_gate_is_plugged_in() {
        let broker = Broker::new("redis");
        let gate = LateGate::new("redis", broker.clone());
        let sale = FlashSaleId::new();
        let refused = gate.figures(sale, Utc::now()).await;
        assert!(matches!(refused, Err(GateError::Unavailable(_))));
        gate.set(Arc::new(crate::flash_sale::InProcessGate::new()));
        assert!(broker.is_up());
        assert_eq!(gate.load(sale, &SaleRecord::default()).await, Ok(true));
        assert_eq!(
            gate.figures(sale, Utc::now()).await,
            Ok(GateFigures::default())
        );
    }

    #[tokio::test]
    async fn the_backoff_loop_retries_until_the_attempt_succeeds() {
        tokio::time::pause();
        let broker = Broker::new("nats");
        let stop = CancellationToken::new();
        let mut attempts = 0;
        let connected = connect_with_backoff(&broker, &stop, || {
            attempts += 1;
            let n = attempts;
            async move {
                if n < 4 {
                    Err(format!("refused {n}"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(connected, Some(4));
        assert!(broker.is_up());
    }
}
