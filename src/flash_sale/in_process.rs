//! The embedded shape's admission gate (DESIGN §1, §5): the same semantics as the Redis Lua
//! scripts, kept in this process's memory. Correct only while one process serves the shop,
//! which is exactly the embedded shape; production runs [`super::RedisGate`].
//!
//! Each call is one critical section over a sale's [`SaleLedger`], which is what makes
//! `admit` atomic here, as the Lua script is in Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use subtle::ConstantTimeEq;

use super::{hold_until, new_token, Admission, AdmissionGate, GateError, GateFigures, SaleTerms};
use crate::domain::{CheckoutId, CustomerId, FlashSaleId};

/// A std `Mutex`, not tokio's: every critical section is a few map operations with no `.await`
/// inside, so a blocking lock is cheaper and can never be held across a suspension point.
#[derive(Debug, Default)]
pub struct InProcessGate {
    sales: Mutex<HashMap<FlashSaleId, SaleLedger>>,
}

impl InProcessGate {
    pub fn new() -> Self {
        Self::default()
    }

    fn sales(&self) -> MutexGuard<'_, HashMap<FlashSaleId, SaleLedger>> {
        // A panic while holding the lock cannot leave a ledger half-changed in a way that
        // breaks its counts (each method finishes its map edits or makes none), so a poisoned
        // lock is still safe to use.
        self.sales
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the sale's ledger, or answers `default` if the sale has no ledger yet, without
    /// creating one (reads and no-ops must not grow the map).
    fn with_existing<T>(
        &self,
        sale: FlashSaleId,
        default: T,
        f: impl FnOnce(&mut SaleLedger) -> T,
    ) -> T {
        match self.sales().get_mut(&sale) {
            Some(ledger) => f(ledger),
            None => default,
        }
    }
}

#[async_trait]
impl AdmissionGate for InProcessGate {
    fn name(&self) -> &'static str {
        "in_process"
    }

    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Admission, GateError> {
        terms.open_at(now)?;
        let mut sales = self.sales();
        let ledger = sales.entry(terms.sale_id).or_default();
        ledger.admit(terms.units, customer, now, hold_until(now, hold))
    }

    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError> {
        Ok(self.with_existing(sale, false, |ledger| ledger.check(customer, token, now)))
    }

    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError> {
        self.with_existing(sale, (), |ledger| ledger.extend(customer, until));
        Ok(())
    }

    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        self.with_existing(sale, (), |ledger| ledger.release(customer, checkout));
        Ok(())
    }

    async fn consume(&self, sale: FlashSaleId, customer: CustomerId) -> Result<(), GateError> {
        // A payment can land for a sale this process never admitted into (a restart lost the
        // memory); it still counts, so the ledger is created here.
        self.sales().entry(sale).or_default().consume(customer);
        Ok(())
    }

    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError> {
        Ok(self.with_existing(sale, GateFigures::default(), |ledger| ledger.figures(now)))
    }
}

#[derive(Debug, Clone)]
struct Hold {
    token: String,
    expires_at: DateTime<Utc>,
}

/// One sale's holders, sold count and buyers; every method is one atomic step of the gate.
#[derive(Debug, Default)]
struct SaleLedger {
    holders: HashMap<CustomerId, Hold>,
    sold: u32,
    buyers: HashSet<CustomerId>,
    /// Checkouts whose unit was handed back: each is released once (see `release`).
    released: HashSet<CheckoutId>,
}

impl SaleLedger {
    fn admit(
        &mut self,
        units: u32,
        customer: CustomerId,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Admission, GateError> {
        self.holders.retain(|_, hold| hold.expires_at > now);
        if let Some(hold) = self.holders.get(&customer) {
            return Ok(Admission {
                token: hold.token.clone(),
                expires_at: hold.expires_at,
                newly_granted: false,
            });
        }
        let taken = u64::try_from(self.holders.len())
            .unwrap_or(u64::MAX)
            .saturating_add(u64::from(self.sold));
        if self.buyers.contains(&customer) || taken >= u64::from(units) {
            return Err(GateError::SoldOut);
        }
        let token = new_token();
        self.holders.insert(
            customer,
            Hold {
                token: token.clone(),
                expires_at,
            },
        );
        Ok(Admission {
            token,
            expires_at,
            newly_granted: true,
        })
    }

    fn check(&self, customer: CustomerId, token: &str, now: DateTime<Utc>) -> bool {
        match self.holders.get(&customer) {
            // Constant-time so response timing says nothing about how much of a guess matched.
            Some(hold) if hold.expires_at > now => {
                bool::from(hold.token.as_bytes().ct_eq(token.as_bytes()))
            }
            _ => false,
        }
    }

    fn extend(&mut self, customer: CustomerId, until: DateTime<Utc>) {
        if let Some(hold) = self.holders.get_mut(&customer) {
            hold.expires_at = hold.expires_at.max(until);
        }
    }

    fn release(&mut self, customer: CustomerId, checkout: CheckoutId) {
        if self.released.insert(checkout) {
            self.holders.remove(&customer);
        }
    }

    fn consume(&mut self, customer: CustomerId) {
        self.holders.remove(&customer);
        if self.buyers.insert(customer) {
            self.sold = self.sold.saturating_add(1);
        }
    }

    fn figures(&self, now: DateTime<Utc>) -> GateFigures {
        let live = self
            .holders
            .values()
            .filter(|hold| hold.expires_at > now)
            .count();
        GateFigures {
            holders: u32::try_from(live).unwrap_or(u32::MAX),
            sold: self.sold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minutes(n: i64) -> Duration {
        Duration::minutes(n)
    }

    #[test]
    fn a_holder_is_live_until_the_instant_its_hold_ends() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        let admission = ledger
            .admit(1, buyer, now, now + minutes(5))
            .expect("one unit is free");

        assert!(ledger.check(
            buyer,
            &admission.token,
            now + minutes(5) - Duration::milliseconds(1)
        ));
        assert!(!ledger.check(buyer, &admission.token, now + minutes(5)));
    }

    #[test]
    fn a_holder_is_swept_only_by_the_next_admission() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        ledger
            .admit(2, CustomerId::new(), now, now + minutes(1))
            .expect("two units are free");
        let later = now + minutes(2);
        assert_eq!(
            ledger.holders.len(),
            1,
            "nothing sweeps before an admission"
        );

        ledger
            .admit(2, CustomerId::new(), later, later + minutes(1))
            .expect("the lapsed unit is free again");

        assert_eq!(ledger.holders.len(), 1);
    }

    #[test]
    fn extending_never_pulls_an_expiry_earlier() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        ledger
            .admit(1, buyer, now, now + minutes(5))
            .expect("one unit is free");

        ledger.extend(buyer, now + minutes(1));

        assert_eq!(ledger.holders[&buyer].expires_at, now + minutes(5));
    }

    #[test]
    fn a_customer_who_bought_is_not_admitted_again() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        ledger
            .admit(5, buyer, now, now + minutes(5))
            .expect("units are free");
        ledger.consume(buyer);

        assert_eq!(
            ledger.admit(5, buyer, now, now + minutes(5)),
            Err(GateError::SoldOut)
        );
    }

    #[test]
    fn a_token_of_another_length_does_not_match() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        let admission = ledger
            .admit(1, buyer, now, now + minutes(5))
            .expect("one unit is free");

        assert!(!ledger.check(buyer, &admission.token[..admission.token.len() - 1], now));
        assert!(!ledger.check(buyer, "", now));
    }
}
