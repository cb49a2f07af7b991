//! The flash-sale admission gate (DESIGN §5). When thousands of buyers chase a handful of
//! units, only as many buyers as there are units may hold an admission token at once; everyone
//! else hears "sold out" without touching the database. The store's guarded reservation still
//! keeps promise 1 (no oversell) on its own; the gate keeps the crowd away from the hot row and
//! answers the refused quickly, and by handing back the units of failed, cancelled and expired
//! checkouts it never refuses a buyer while a unit is really free (promise 2).
//!
//! Two gates keep the same semantics, checked by one conformance suite (`tests/api/gate.rs`):
//! [`RedisGate`] for several instances (one Lua script per call) and [`InProcessGate`] for the
//! embedded shape.
//!
//! Rules both gates share:
//! - A holder is live while `now < expires_at`; expired holders are dropped by the next `admit`.
//! - A sale admits while `live holders + sold < units`.
//! - A customer counts once: a holder asking again gets its own token back, and a customer whose
//!   unit was consumed is not admitted to the same sale again (the gate counts sold units per
//!   customer, so a second purchase through it would go uncounted and let one buyer too many in).
//! - When a call fails with [`GateError::Unavailable`] it may still have happened. That is safe
//!   by construction: retrying `admit` returns the same token, `release`/`consume` are idempotent,
//!   and an unclaimed admission expires with its hold.

mod in_process;
mod redis;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use rand::RngCore;
use serde::Serialize;

use crate::domain::{CheckoutId, CustomerId, FlashSaleId};

pub use self::in_process::InProcessGate;
pub use self::redis::RedisGate;

/// Every admission token starts with this, so a token is recognisable in logs and requests.
pub const TOKEN_PREFIX: &str = "fst_";

/// What the admin opened: how many units, and when buyers may come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleTerms {
    pub sale_id: FlashSaleId,
    pub units: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
}

impl SaleTerms {
    /// Whether buyers may be admitted at `now`: from `starts_at` (inclusive) until `ends_at`
    /// (exclusive).
    pub fn open_at(&self, now: DateTime<Utc>) -> Result<(), GateError> {
        if now < self.starts_at {
            return Err(GateError::NotStarted);
        }
        match self.ends_at {
            Some(ends_at) if now >= ends_at => Err(GateError::Ended),
            _ => Ok(()),
        }
    }
}

/// A buyer's right to check out one unit of a sale until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// `false` when the customer already held this token (the contract answers 200, not 201).
    pub newly_granted: bool,
}

/// How a sale stands: live holders and units paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct GateFigures {
    pub holders: u32,
    pub sold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the sale is sold out")]
    SoldOut,
    #[error("the sale has not started")]
    NotStarted,
    #[error("the sale has ended")]
    Ended,
    /// The gate's backend cannot be reached or answered nonsense. Callers fail closed: nobody
    /// is admitted while the gate cannot count.
    #[error("the admission gate is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait AdmissionGate: Send + Sync + 'static {
    /// Which gate this is, for logs and `/readyz`.
    fn name(&self) -> &'static str;

    /// One atomic step: drop expired holders; if this customer already holds a live token,
    /// return it (`newly_granted = false`); else admit if `holders + sold < units`, recording
    /// the holder with expiry `now + hold` (`newly_granted = true`); else `SoldOut`.
    /// `NotStarted` / `Ended` by the terms and `now`. `hold` is positive (configuration keeps
    /// reservation windows at one second or more).
    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Admission, GateError>;

    /// Whether `token` is this customer's live token for this sale (tokens are bound to their
    /// customer).
    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError>;

    /// Push the holder's expiry (a checkout was created with the token, or heartbeated).
    /// Never pulls an expiry earlier. No-op if the customer is not a holder.
    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError>;

    /// Hand back the unit this checkout held (it failed, was cancelled or expired), once per
    /// checkout: a second release for the same checkout (a webhook repeating what the saga
    /// already recorded, a repeated cancel) does nothing, so it can never take away an
    /// admission the customer was granted after the first one (that would free a unit the
    /// database still holds, and the next buyer would be refused while the gate said yes).
    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError>;

    /// The customer paid: remove the holder and count the unit as sold, atomically. Counts even
    /// if the hold already lapsed, because the payment, not the token, says the unit is gone.
    /// Idempotent per customer (a second consume does not count twice).
    async fn consume(&self, sale: FlashSaleId, customer: CustomerId) -> Result<(), GateError>;

    /// Live holders at `now` and units sold.
    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError>;
}

/// A fresh token: 128 random bits from the thread's CSPRNG, as hex after [`TOKEN_PREFIX`], so it
/// is safe in URLs, headers and JSON without escaping.
pub(crate) fn new_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// When a hold that starts at `now` ends. Saturates instead of panicking on an absurd `hold`.
pub(crate) fn hold_until(now: DateTime<Utc>, hold: Duration) -> DateTime<Utc> {
    now.checked_add_signed(hold)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(starts_at: DateTime<Utc>, ends_at: Option<DateTime<Utc>>) -> SaleTerms {
        SaleTerms {
            sale_id: FlashSaleId::new(),
            units: 1,
            starts_at,
            ends_at,
        }
    }

    #[test]
    fn a_sale_is_not_open_before_it_starts() {
        let start = Utc::now();
        let sale = terms(start, None);
        assert_eq!(
            sale.open_at(start - Duration::milliseconds(1)),
            Err(GateError::NotStarted)
        );
    }

    #[test]
    fn a_sale_opens_at_its_start_instant() {
        let start = Utc::now();
        assert_eq!(terms(start, None).open_at(start), Ok(()));
    }

    #[test]
    fn a_sale_without_an_end_stays_open() {
        let start = Utc::now();
        assert_eq!(
            terms(start, None).open_at(start + Duration::days(3650)),
            Ok(())
        );
    }

    #[test]
    fn a_sale_is_closed_from_its_end_instant_on() {
        let start = Utc::now();
        let end = start + Duration::minutes(10);
        let sale = terms(start, Some(end));
        assert_eq!(sale.open_at(end - Duration::milliseconds(1)), Ok(()));
        assert_eq!(sale.open_at(end), Err(GateError::Ended));
    }

    #[test]
    fn a_token_is_prefixed_url_safe_and_carries_128_bits() {
        let token = new_token();
        let body = token
            .strip_prefix(TOKEN_PREFIX)
            .expect("every token carries the prefix");
        assert_eq!(body.len(), 32);
        assert!(body.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn two_tokens_differ() {
        assert_ne!(new_token(), new_token());
    }

    #[test]
    fn an_absurd_hold_saturates_instead_of_panicking() {
        assert_eq!(
            hold_until(Utc::now(), Duration::MAX),
            DateTime::<Utc>::MAX_UTC
        );
    }
}
