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

use super::{
    hold_until, new_token, Admission, AdmissionGate, Claim, GateError, GateFigures, SaleRecord,
    SaleTerms,
};
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

    /// Runs `f` on the sale's ledger; a sale this process has not loaded is `NotLoaded`.
    fn with_ledger<T>(
        &self,
        sale: FlashSaleId,
        f: impl FnOnce(&mut SaleLedger) -> T,
    ) -> Result<T, GateError> {
        self.sales()
            .get_mut(&sale)
            .map(f)
            .ok_or(GateError::NotLoaded)
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
        self.with_ledger(terms.sale_id, |ledger| {
            ledger.admit(terms, customer, now, hold_until(now, hold))
        })?
    }

    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError> {
        self.with_ledger(sale, |ledger| ledger.check(customer, token, now))
    }

    async fn claim(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        units: u32,
        now: DateTime<Utc>,
    ) -> Result<Claim, GateError> {
        self.with_ledger(terms.sale_id, |ledger| {
            ledger.claim(terms, customer, units, now)
        })
    }

    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError> {
        self.with_ledger(sale, |ledger| ledger.extend(customer, until))
    }

    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        self.with_ledger(sale, |ledger| ledger.release(customer, checkout))
    }

    async fn consume(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
        units: u32,
    ) -> Result<(), GateError> {
        self.with_ledger(sale, |ledger| ledger.consume(customer, checkout, units))
    }

    async fn refund(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        self.with_ledger(sale, |ledger| ledger.refund(customer, checkout))
    }

    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError> {
        self.with_ledger(sale, |ledger| ledger.figures(now))
    }

    async fn load(&self, sale: FlashSaleId, record: &SaleRecord) -> Result<bool, GateError> {
        let mut sales = self.sales();
        if sales.contains_key(&sale) {
            return Ok(false);
        }
        sales.insert(sale, SaleLedger::from_record(record));
        Ok(true)
    }
}

#[derive(Debug, Clone)]
struct Hold {
    token: String,
    expires_at: DateTime<Utc>,
    units: u32,
}

/// One sale's holders, sold units and buyers; every method is one atomic step of the gate.
#[derive(Debug, Default)]
struct SaleLedger {
    holders: HashMap<CustomerId, Hold>,
    sold: u32,
    /// Units each buyer paid for (refunds deducted).
    bought: HashMap<CustomerId, u32>,
    /// Checkouts whose units were handed back: each is released once (see `release`).
    released: HashSet<CheckoutId>,
    /// Paid checkouts and the units each was counted for (0 once refunded).
    consumed: HashMap<CheckoutId, u32>,
}

impl SaleLedger {
    fn from_record(record: &SaleRecord) -> Self {
        let mut ledger = Self::default();
        for hold in &record.holders {
            ledger.holders.insert(
                hold.customer,
                Hold {
                    token: new_token(),
                    expires_at: hold.until,
                    units: hold.units,
                },
            );
        }
        for &(customer, checkout, units) in &record.paid {
            ledger.count_sold(customer, checkout, units);
        }
        ledger
            .consumed
            .extend(record.refunded.iter().map(|checkout| (*checkout, 0)));
        ledger.released.extend(record.ended.iter().copied());
        ledger.released.extend(record.refunded.iter().copied());
        ledger
    }

    fn bought(&self, customer: CustomerId) -> u32 {
        self.bought.get(&customer).copied().unwrap_or(0)
    }

    /// Units held by live holders other than `except`.
    fn held(&self, now: DateTime<Utc>, except: Option<CustomerId>) -> u64 {
        self.holders
            .iter()
            .filter(|(who, hold)| Some(**who) != except && hold.expires_at > now)
            .map(|(_, hold)| u64::from(hold.units))
            .sum()
    }

    fn admit(
        &mut self,
        terms: &SaleTerms,
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
        let taken = self.held(now, None).saturating_add(u64::from(self.sold));
        if self.bought(customer) >= terms.max_per_buyer || taken >= u64::from(terms.units) {
            return Err(GateError::SoldOut);
        }
        let token = new_token();
        self.holders.insert(
            customer,
            Hold {
                token: token.clone(),
                expires_at,
                units: 1,
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

    fn claim(
        &mut self,
        terms: &SaleTerms,
        customer: CustomerId,
        units: u32,
        now: DateTime<Utc>,
    ) -> Claim {
        if self
            .holders
            .get(&customer)
            .is_none_or(|hold| hold.expires_at <= now)
        {
            return Claim::NotHolder;
        }
        let allowed = fitting(
            terms,
            self.bought(customer),
            self.sold,
            self.held(now, Some(customer)),
        );
        if units > allowed {
            return Claim::Limit(allowed);
        }
        if let Some(hold) = self.holders.get_mut(&customer) {
            hold.units = units;
        }
        Claim::Held
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

    fn consume(&mut self, customer: CustomerId, checkout: CheckoutId, units: u32) {
        if self.consumed.contains_key(&checkout) {
            return;
        }
        // A checkout released before its (late) payment gave its hold up then; the customer's
        // hold now, if any, is a newer admission.
        if !self.released.contains(&checkout) {
            self.holders.remove(&customer);
        }
        self.count_sold(customer, checkout, units);
    }

    fn count_sold(&mut self, customer: CustomerId, checkout: CheckoutId, units: u32) {
        self.consumed.insert(checkout, units);
        self.sold = self.sold.saturating_add(units);
        let bought = self.bought.entry(customer).or_default();
        *bought = bought.saturating_add(units);
    }

    fn refund(&mut self, customer: CustomerId, checkout: CheckoutId) {
        match self.consumed.get_mut(&checkout) {
            Some(units) => {
                let back = std::mem::take(units);
                self.sold = self.sold.saturating_sub(back);
                if let Some(bought) = self.bought.get_mut(&customer) {
                    *bought = bought.saturating_sub(back);
                }
            }
            None => self.release(customer, checkout),
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
            held: u32::try_from(self.held(now, None)).unwrap_or(u32::MAX),
            sold: self.sold,
        }
    }
}

/// How many units a holder may claim: what is left of the buyer's limit, and of the sale
/// after what is sold and what the other holders hold.
fn fitting(terms: &SaleTerms, bought: u32, sold: u32, held_by_others: u64) -> u32 {
    let buyer = terms.max_per_buyer.saturating_sub(bought);
    let sale = u64::from(terms.units)
        .saturating_sub(u64::from(sold))
        .saturating_sub(held_by_others);
    buyer.min(u32::try_from(sale).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minutes(n: i64) -> Duration {
        Duration::minutes(n)
    }

    fn terms(units: u32) -> SaleTerms {
        SaleTerms {
            sale_id: FlashSaleId::new(),
            units,
            max_per_buyer: 1,
            starts_at: Utc::now() - minutes(1),
            ends_at: None,
        }
    }

    #[test]
    fn a_holder_is_live_until_the_instant_its_hold_ends() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        let admission = ledger
            .admit(&terms(1), buyer, now, now + minutes(5))
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
            .admit(&terms(2), CustomerId::new(), now, now + minutes(1))
            .expect("two units are free");
        let later = now + minutes(2);
        assert_eq!(
            ledger.holders.len(),
            1,
            "nothing sweeps before an admission"
        );

        ledger
            .admit(&terms(2), CustomerId::new(), later, later + minutes(1))
            .expect("the lapsed unit is free again");

        assert_eq!(ledger.holders.len(), 1);
    }

    #[test]
    fn extending_never_pulls_an_expiry_earlier() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        ledger
            .admit(&terms(1), buyer, now, now + minutes(5))
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
            .admit(&terms(5), buyer, now, now + minutes(5))
            .expect("units are free");
        ledger.consume(buyer, CheckoutId::new(), 1);

        assert_eq!(
            ledger.admit(&terms(5), buyer, now, now + minutes(5)),
            Err(GateError::SoldOut)
        );
    }

    #[test]
    fn a_token_of_another_length_does_not_match() {
        let mut ledger = SaleLedger::default();
        let now = Utc::now();
        let buyer = CustomerId::new();
        let admission = ledger
            .admit(&terms(1), buyer, now, now + minutes(5))
            .expect("one unit is free");

        assert!(!ledger.check(buyer, &admission.token[..admission.token.len() - 1], now));
        assert!(!ledger.check(buyer, "", now));
    }
}
