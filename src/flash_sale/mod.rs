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
//! Rules both gates share (all counts in units of the sale's SKU):
//! - A holder is live while `now < expires_at`; expired holders are dropped by the next `admit`.
//! - An admission holds one unit; `claim` at checkout resizes it to the units of the sale
//!   SKU's line, within the buyer's limit and what the sale has left. A sale admits while
//!   `units held by live holders + units sold < units`, and never lets that sum exceed `units`.
//! - A buyer's paid units count against `max_per_buyer` for the whole sale: a buyer who bought
//!   the limit is not admitted again.
//! - Each checkout counts once: `release`, `consume` and `refund` are idempotent per checkout,
//!   so a repeat (a webhook after the saga, a retried call) never counts twice nor takes away
//!   an admission granted since.
//! - A refund of a paid checkout gives its units back to the sale.
//! - A gate that does not know a sale (a restart of the embedded shape, Redis keys lost)
//!   answers [`GateError::NotLoaded`] until it is loaded from the database
//!   ([`AdmissionGate::load`]); callers rebuild, and fail closed meanwhile.
//! - When a call fails with [`GateError::Unavailable`] it may still have happened. That is safe
//!   by construction: retrying `admit` returns the same token, the rest is idempotent, and an
//!   unclaimed admission expires with its hold.

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
    /// Units one buyer may buy over the whole sale.
    pub max_per_buyer: u32,
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

/// A buyer's right to check out units of a sale until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// `false` when the customer already held this token (the contract answers 200, not 201).
    pub newly_granted: bool,
}

/// How a sale stands: live holders, the units they hold, and units paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct GateFigures {
    pub holders: u32,
    pub held: u32,
    pub sold: u32,
}

/// What `claim` decided for a checkout's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The holder now holds exactly the units asked for.
    Held,
    /// The customer holds no live admission to the sale.
    NotHolder,
    /// More than the buyer may have: at most this many (what is left of the buyer's limit,
    /// or of the sale).
    Limit(u32),
}

/// A live checkout of a sale, as the database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHold {
    pub customer: CustomerId,
    pub checkout: CheckoutId,
    pub units: u32,
    pub until: DateTime<Utc>,
}

/// A sale as the database records it, to load the gate from: who holds units (live
/// checkouts), who paid for how many, and which checkouts ended without a payment they kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaleRecord {
    pub holders: Vec<RecordedHold>,
    /// `(customer, checkout, units)` of each paid checkout.
    pub paid: Vec<(CustomerId, CheckoutId, u32)>,
    /// Refunded checkouts: paid once, their units back in the sale.
    pub refunded: Vec<CheckoutId>,
    /// Checkouts that ended without a payment (failed, cancelled, expired).
    pub ended: Vec<CheckoutId>,
}

/// One request to take from a customer's request budget kept in the gate's store (the shared
/// rate limit, `src/http/rate_limit.lua`): its key, the milliseconds one request costs and the
/// burst. A gate that keeps budgets ([`AdmissionGate::keeps_budgets`]) takes it in the same
/// atomic step as the admission, so a refused buyer costs one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBudget {
    pub key: String,
    pub interval_ms: u64,
    pub burst: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the sale is sold out")]
    SoldOut,
    #[error("the sale has not started")]
    NotStarted,
    #[error("the sale has ended")]
    Ended,
    /// The gate does not know this sale (never loaded here, a restart, Redis keys lost): it
    /// must be loaded from the database first. Nobody is admitted meanwhile.
    #[error("the admission gate has not loaded this sale")]
    NotLoaded,
    /// The gate's backend cannot be reached or answered nonsense. Callers fail closed: nobody
    /// is admitted while the gate cannot count.
    #[error("the admission gate is unavailable: {0}")]
    Unavailable(String),
    /// The customer's request budget is spent; nothing else changed. Retry after this many ms.
    #[error("over the request budget; retry in {0} ms")]
    RateLimited(u64),
}

#[async_trait]
pub trait AdmissionGate: Send + Sync + 'static {
    /// Which gate this is, for logs and `/readyz`.
    fn name(&self) -> &'static str;

    /// One atomic step: drop expired holders; if this customer already holds a live token,
    /// return it (`newly_granted = false`); else admit, holding one unit, if the buyer has
    /// bought fewer than `max_per_buyer` units and `held + sold < units`, recording the holder
    /// with expiry `now + hold` (`newly_granted = true`); else `SoldOut`. `NotStarted` /
    /// `Ended` by the terms and `now`. `hold` is positive (configuration keeps reservation
    /// windows at one second or more).
    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Admission, GateError>;

    /// Whether this gate keeps the customers' shared request budgets, so that
    /// [`Self::admit_within`] can take one with the admission.
    fn keeps_budgets(&self) -> bool {
        false
    }

    /// [`Self::admit`], after taking one request from `budget` in the same atomic step: over
    /// budget, `RateLimited` and nothing else changes. Asked only of a gate that
    /// [`Self::keeps_budgets`].
    async fn admit_within(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
        budget: &RequestBudget,
    ) -> Result<Admission, GateError> {
        let _ = (terms, customer, now, hold, budget);
        Err(GateError::Unavailable(format!(
            "the {} gate keeps no request budgets",
            self.name()
        )))
    }

    /// Whether `token` is this customer's live token for this sale (tokens are bound to their
    /// customer).
    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError>;

    /// A checkout is about to reserve `units` of the sale's SKU: one atomic step resizes the
    /// customer's live hold to `units` if that stays within what the buyer may still buy and
    /// within the sale (`held by others + sold + units <= units of the sale`); otherwise the
    /// hold is unchanged and the answer says how many would fit.
    async fn claim(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        units: u32,
        now: DateTime<Utc>,
    ) -> Result<Claim, GateError>;

    /// Push the holder's expiry (a checkout was created with the token, or heartbeated).
    /// Never pulls an expiry earlier. No-op if the customer is not a holder.
    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError>;

    /// Hand back the units this checkout held (it failed, was cancelled or expired), once per
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

    /// The checkout was paid: its hold ends and its `units` count as sold, to the sale and to
    /// the buyer, atomically. Counts even if the hold already lapsed, because the payment, not
    /// the token, says the units are gone. Once per checkout.
    async fn consume(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
        units: u32,
    ) -> Result<(), GateError>;

    /// The checkout's money went back: the units it was counted for return to the sale and to
    /// the buyer's limit. Once per checkout; a checkout never consumed is released instead.
    async fn refund(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError>;

    /// Live holders at `now`, the units they hold, and units sold.
    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError>;

    /// Loads a sale from what the database records, in one atomic step, unless the gate knows
    /// the sale already (then nothing changes: a concurrent load, or the sale was live all
    /// along). Every live checkout becomes a holder (with a fresh token: a rebuilt holder
    /// already has its checkout). True when this call loaded it.
    async fn load(&self, sale: FlashSaleId, record: &SaleRecord) -> Result<bool, GateError>;
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
            max_per_buyer: 1,
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
