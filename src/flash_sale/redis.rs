//! The production admission gate (DESIGN §5): one Redis Lua script per call, so every
//! instance behind the load balancer counts against the same holders and the same sold units,
//! and `admit`'s count-then-grant is atomic across all of them (promise 1 stays with the store;
//! this keeps the crowd off its hot row).
//!
//! It fails fast and closed: every call is bounded by [`CALL_TIMEOUT`] and answers
//! [`GateError::Unavailable`] when Redis cannot be reached, so a Redis outage refuses buyers
//! quickly instead of admitting them uncounted or hanging their requests.
//!
//! Keys of a sale share the hash tag `{<sale id>}`, so a Redis Cluster keeps them in one slot,
//! as a multi-key script requires.

use std::fmt;
use std::future::Future;
use std::time::Duration as StdDuration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script};
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use subtle::ConstantTimeEq;

use super::{
    hold_until, new_token, Admission, AdmissionGate, Claim, GateError, GateFigures, RequestBudget,
    SaleRecord, SaleTerms,
};
use crate::domain::{CheckoutId, CustomerId, FlashSaleId};

/// The longest any gate call may take, reconnecting included. A buyer waiting on the gate is a
/// buyer not served; past this, refusing is kinder than waiting. Two seconds leave room for a
/// burst of thousands of buyers queued on one multiplexed connection of a busy host, while a
/// dead Redis is still noticed at once (connection refused) and a frozen one within this bound.
pub const CALL_TIMEOUT: StdDuration = StdDuration::from_secs(2);

/// A connection attempt to a reachable Redis takes well under a millisecond on a LAN; half a
/// second means it is not reachable.
const CONNECTION_TIMEOUT: StdDuration = StdDuration::from_millis(500);

/// Status codes of the scripts.
const NOT_LOADED: i64 = -1;
const OVER_BUDGET: i64 = -2;
const ADMIT_SOLD_OUT: i64 = 0;
const ADMIT_GRANTED: i64 = 1;
const ADMIT_ALREADY_HOLDER: i64 = 2;
const CLAIM_HELD: i64 = 1;
const CLAIM_NOT_HOLDER: i64 = 0;
const CLAIM_LIMIT: i64 = 2;

pub struct RedisGate {
    connection: ConnectionManager,
    key_prefix: String,
    scripts: Scripts,
}

struct Scripts {
    admit: Script,
    check: Script,
    claim: Script,
    extend: Script,
    release: Script,
    consume: Script,
    refund: Script,
    figures: Script,
    load: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            // The shared rate limit's script as a function, so an admission can take the
            // customer's request budget in the same call.
            admit: Script::new(&format!(
                "local function take_budget(KEYS, ARGV)\n{}\nend\n{}",
                include_str!("../http/rate_limit.lua"),
                include_str!("admit.lua")
            )),
            check: Script::new(include_str!("check.lua")),
            claim: Script::new(include_str!("claim.lua")),
            extend: Script::new(include_str!("extend.lua")),
            release: Script::new(include_str!("release.lua")),
            consume: Script::new(include_str!("consume.lua")),
            refund: Script::new(include_str!("refund.lua")),
            figures: Script::new(include_str!("figures.lua")),
            load: Script::new(include_str!("load.lua")),
        }
    }

    fn all(&self) -> [&Script; 9] {
        [
            &self.admit,
            &self.check,
            &self.claim,
            &self.extend,
            &self.release,
            &self.consume,
            &self.refund,
            &self.figures,
            &self.load,
        ]
    }
}

impl fmt::Debug for RedisGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password, so only the prefix is shown.
        f.debug_struct("RedisGate")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl RedisGate {
    /// Connects to `url` and loads the scripts. Every key this gate touches starts with
    /// `key_prefix` (production: `holdfast:`; each test its own).
    pub async fn connect(url: &str, key_prefix: String) -> Result<Self, GateError> {
        let client = Self::client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECTION_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            // No retry loop inside the manager: its first backoff step alone is a second or
            // more, while each call here is bounded by CALL_TIMEOUT anyway. After a failure
            // the next call makes one fresh attempt, so the gate recovers as soon as Redis is
            // back and a refused connection fails at once.
            .set_number_of_retries(0);
        let mut connection = bounded(ConnectionManager::new_with_config(client, config)).await?;
        let scripts = Scripts::load();
        for script in scripts.all() {
            // Loading up front turns a wrong URL into a startup error, and spares the first
            // burst of buyers a NOSCRIPT round trip each. After a Redis restart the script
            // cache is empty again; `invoke_async` reloads on NOSCRIPT by itself.
            bounded(script.prepare_invoke().load_async(&mut connection)).await?;
        }
        Ok(Self {
            connection,
            key_prefix,
            scripts,
        })
    }

    /// Whether `url` is a Redis URL this gate can use, without connecting: a start-up with a
    /// bad URL fails, one with an unreachable Redis starts degraded.
    pub fn check_url(url: &str) -> Result<(), GateError> {
        Self::client(url).map(|_| ())
    }

    fn client(url: &str) -> Result<Client, GateError> {
        Client::open(url).map_err(|e| {
            // The error text can quote the URL, password included; say only what is wrong.
            GateError::Unavailable(format!("the Redis URL is not valid ({:?})", e.kind()))
        })
    }

    /// One call of the admit script, taking one request from `budget` first when given.
    #[tracing::instrument(skip_all, fields(sale = %terms.sale_id, customer = %customer))]
    async fn admit_taking(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
        budget: Option<&RequestBudget>,
    ) -> Result<Admission, GateError> {
        terms.open_at(now)?;
        let expires_at = hold_until(now, hold);
        let mut invocation = self.invocation(&self.scripts.admit, terms.sale_id);
        invocation
            .arg(now.timestamp_millis())
            .arg(expires_at.timestamp_millis())
            .arg(terms.units)
            .arg(terms.max_per_buyer)
            .arg(customer.to_string())
            .arg(new_token());
        if let Some(budget) = budget {
            invocation
                .key(&budget.key)
                .arg(budget.interval_ms)
                .arg(budget.burst);
        }
        let mut connection = self.connection.clone();
        let (status, token, expiry_ms): (i64, String, i64) =
            bounded(invocation.invoke_async(&mut connection)).await?;
        let newly_granted = match status {
            ADMIT_GRANTED => true,
            ADMIT_ALREADY_HOLDER => false,
            ADMIT_SOLD_OUT => return Err(GateError::SoldOut),
            NOT_LOADED => return Err(GateError::NotLoaded),
            OVER_BUDGET => {
                return Err(GateError::RateLimited(
                    u64::try_from(expiry_ms).unwrap_or(1),
                ))
            }
            other => return Err(unexpected(format!("admit status {other}"))),
        };
        let expires_at = DateTime::from_timestamp_millis(expiry_ms)
            .ok_or_else(|| unexpected(format!("hold expiry {expiry_ms} ms")))?;
        Ok(Admission {
            token,
            expires_at,
            newly_granted,
        })
    }

    /// An invocation of `script` with every key of the sale, in [`SaleKeys::all`] order (a
    /// Redis Cluster needs every key a script touches named).
    fn invocation<'a>(
        &self,
        script: &'a Script,
        sale: FlashSaleId,
    ) -> ::redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in SaleKeys::new(&self.key_prefix, sale).all() {
            invocation.key(key);
        }
        invocation
    }

    /// Runs a script that answers only "done" (0) or "not loaded" (-1).
    async fn run(&self, invocation: ::redis::ScriptInvocation<'_>) -> Result<(), GateError> {
        let mut connection = self.connection.clone();
        let status: i64 = bounded(invocation.invoke_async(&mut connection)).await?;
        match status {
            NOT_LOADED => Err(GateError::NotLoaded),
            0 => Ok(()),
            other => Err(unexpected(format!("status {other}"))),
        }
    }
}

#[async_trait]
impl AdmissionGate for RedisGate {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Admission, GateError> {
        self.admit_taking(terms, customer, now, hold, None).await
    }

    fn keeps_budgets(&self) -> bool {
        true
    }

    async fn admit_within(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
        budget: &RequestBudget,
    ) -> Result<Admission, GateError> {
        self.admit_taking(terms, customer, now, hold, Some(budget))
            .await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer))]
    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError> {
        let mut invocation = self.invocation(&self.scripts.check, sale);
        invocation
            .arg(now.timestamp_millis())
            .arg(customer.to_string());
        let mut connection = self.connection.clone();
        let (status, live): (i64, String) =
            bounded(invocation.invoke_async(&mut connection)).await?;
        match status {
            NOT_LOADED => Err(GateError::NotLoaded),
            // Compared here, in constant time, rather than in Lua, so response timing says
            // nothing about how much of a guessed token matched.
            1 => Ok(!live.is_empty() && bool::from(live.as_bytes().ct_eq(token.as_bytes()))),
            _ => Ok(false),
        }
    }

    #[tracing::instrument(skip_all, fields(sale = %terms.sale_id, customer = %customer))]
    async fn claim(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        units: u32,
        now: DateTime<Utc>,
    ) -> Result<Claim, GateError> {
        let mut invocation = self.invocation(&self.scripts.claim, terms.sale_id);
        invocation
            .arg(now.timestamp_millis())
            .arg(terms.units)
            .arg(terms.max_per_buyer)
            .arg(customer.to_string())
            .arg(units);
        let mut connection = self.connection.clone();
        let (status, allowed): (i64, i64) =
            bounded(invocation.invoke_async(&mut connection)).await?;
        match status {
            CLAIM_HELD => Ok(Claim::Held),
            CLAIM_NOT_HOLDER => Ok(Claim::NotHolder),
            CLAIM_LIMIT => {
                Ok(Claim::Limit(u32::try_from(allowed).map_err(|_| {
                    unexpected(format!("claim allows {allowed}"))
                })?))
            }
            NOT_LOADED => Err(GateError::NotLoaded),
            other => Err(unexpected(format!("claim status {other}"))),
        }
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer))]
    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError> {
        let mut invocation = self.invocation(&self.scripts.extend, sale);
        invocation
            .arg(until.timestamp_millis())
            .arg(customer.to_string());
        self.run(invocation).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer, checkout = %checkout))]
    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        let mut invocation = self.invocation(&self.scripts.release, sale);
        invocation
            .arg(customer.to_string())
            .arg(checkout.to_string());
        self.run(invocation).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer, checkout = %checkout))]
    async fn consume(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
        units: u32,
    ) -> Result<(), GateError> {
        let mut invocation = self.invocation(&self.scripts.consume, sale);
        invocation
            .arg(customer.to_string())
            .arg(checkout.to_string())
            .arg(units);
        self.run(invocation).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer, checkout = %checkout))]
    async fn refund(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        let mut invocation = self.invocation(&self.scripts.refund, sale);
        invocation
            .arg(customer.to_string())
            .arg(checkout.to_string());
        self.run(invocation).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale))]
    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError> {
        let mut invocation = self.invocation(&self.scripts.figures, sale);
        invocation.arg(now.timestamp_millis());
        let mut connection = self.connection.clone();
        let (holders, held, sold): (i64, i64, i64) =
            bounded(invocation.invoke_async(&mut connection)).await?;
        if holders == NOT_LOADED {
            return Err(GateError::NotLoaded);
        }
        let count =
            |n: i64, what: &str| u32::try_from(n).map_err(|_| unexpected(format!("{what} {n}")));
        Ok(GateFigures {
            holders: count(holders, "holder count")?,
            held: count(held, "held units")?,
            sold: count(sold, "sold units")?,
        })
    }

    #[tracing::instrument(skip_all, fields(sale = %sale))]
    async fn load(&self, sale: FlashSaleId, record: &SaleRecord) -> Result<bool, GateError> {
        let mut invocation = self.invocation(&self.scripts.load, sale);
        invocation.arg(record.holders.len());
        for hold in &record.holders {
            invocation
                .arg(hold.customer.to_string())
                .arg(hold.until.timestamp_millis())
                .arg(hold.units)
                .arg(new_token());
        }
        invocation.arg(record.paid.len());
        for (customer, checkout, units) in &record.paid {
            invocation
                .arg(customer.to_string())
                .arg(checkout.to_string())
                .arg(*units);
        }
        invocation.arg(record.refunded.len());
        for checkout in &record.refunded {
            invocation.arg(checkout.to_string());
        }
        invocation.arg(record.ended.len());
        for checkout in &record.ended {
            invocation.arg(checkout.to_string());
        }
        let mut connection = self.connection.clone();
        let loaded: i64 = bounded(invocation.invoke_async(&mut connection)).await?;
        Ok(loaded == 1)
    }
}

/// The Redis keys of one sale.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SaleKeys {
    /// Set once the sale is loaded; gone after a `FLUSHALL` or a restart without persistence.
    loaded: String,
    holders: String,
    tokens: String,
    held: String,
    sold: String,
    bought: String,
    released: String,
    consumed: String,
}

impl SaleKeys {
    fn new(prefix: &str, sale: FlashSaleId) -> Self {
        // `{...}` is the cluster hash tag: only the sale id decides the slot.
        let base = format!("{prefix}sale:{{{sale}}}");
        Self {
            loaded: format!("{base}:loaded"),
            holders: format!("{base}:holders"),
            tokens: format!("{base}:tokens"),
            held: format!("{base}:held"),
            sold: format!("{base}:sold"),
            bought: format!("{base}:bought"),
            released: format!("{base}:released"),
            consumed: format!("{base}:consumed"),
        }
    }

    /// In the order every script names them as `KEYS[1..8]`.
    fn all(&self) -> [&str; 8] {
        [
            &self.loaded,
            &self.holders,
            &self.tokens,
            &self.held,
            &self.sold,
            &self.bought,
            &self.released,
            &self.consumed,
        ]
    }
}

/// Runs one Redis exchange within [`CALL_TIMEOUT`]. A call that times out may still have run
/// on the server; every script is safe to repeat (see the module doc of `flash_sale`).
async fn bounded<T>(call: impl Future<Output = Result<T, RedisError>>) -> Result<T, GateError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(GateError::Unavailable(format!("redis: {e}"))),
        Err(_) => Err(GateError::Unavailable(format!(
            "redis did not answer within {} ms",
            CALL_TIMEOUT.as_millis()
        ))),
    }
}

/// A reply the scripts never produce: the server is not the one we think, or the keys were
/// changed behind the gate's back. Refusing is the closed failure.
fn unexpected(what: String) -> GateError {
    GateError::Unavailable(format!("unexpected reply from redis: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_sale_starts_with_the_prefix_and_shares_one_hash_tag() {
        let sale = FlashSaleId::new();
        let keys = SaleKeys::new("holdfast:", sale);

        for key in keys.all() {
            assert!(
                key.starts_with(&format!("holdfast:sale:{{{sale}}}:")),
                "{key}"
            );
        }
        assert_eq!(keys.holders, format!("holdfast:sale:{{{sale}}}:holders"));
    }

    #[test]
    fn two_sales_never_share_a_key() {
        let a = SaleKeys::new("p:", FlashSaleId::new());
        let b = SaleKeys::new("p:", FlashSaleId::new());
        assert_ne!(a.holders, b.holders);
        assert_ne!(a.sold, b.sold);
    }

    #[tokio::test]
    async fn a_redis_url_that_does_not_parse_is_refused_without_echoing_it() {
        let err = RedisGate::connect("not a url with secret-password", "t:".into())
            .await
            .expect_err("garbage is not a Redis URL");

        let GateError::Unavailable(message) = err else {
            panic!("expected Unavailable, got {err:?}");
        };
        assert!(!message.contains("secret-password"), "{message}");
    }
}
