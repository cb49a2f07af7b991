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

use super::{hold_until, new_token, Admission, AdmissionGate, GateError, GateFigures, SaleTerms};
use crate::domain::{CheckoutId, CustomerId, FlashSaleId};

/// The longest any gate call may take, reconnecting included. A buyer waiting on the gate is a
/// buyer not served; past this, refusing is kinder than waiting. Two seconds leave room for a
/// burst of thousands of buyers queued on one multiplexed connection of a busy host, while a
/// dead Redis is still noticed at once (connection refused) and a frozen one within this bound.
pub const CALL_TIMEOUT: StdDuration = StdDuration::from_secs(2);

/// A connection attempt to a reachable Redis takes well under a millisecond on a LAN; half a
/// second means it is not reachable.
const CONNECTION_TIMEOUT: StdDuration = StdDuration::from_millis(500);

/// Status codes of `admit.lua`.
const ADMIT_SOLD_OUT: i64 = 0;
const ADMIT_GRANTED: i64 = 1;
const ADMIT_ALREADY_HOLDER: i64 = 2;

pub struct RedisGate {
    connection: ConnectionManager,
    key_prefix: String,
    scripts: Scripts,
}

struct Scripts {
    admit: Script,
    check: Script,
    extend: Script,
    release: Script,
    consume: Script,
    figures: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            admit: Script::new(include_str!("admit.lua")),
            check: Script::new(include_str!("check.lua")),
            extend: Script::new(include_str!("extend.lua")),
            release: Script::new(include_str!("release.lua")),
            consume: Script::new(include_str!("consume.lua")),
            figures: Script::new(include_str!("figures.lua")),
        }
    }

    fn all(&self) -> [&Script; 6] {
        [
            &self.admit,
            &self.check,
            &self.extend,
            &self.release,
            &self.consume,
            &self.figures,
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

    fn keys(&self, sale: FlashSaleId) -> SaleKeys {
        SaleKeys::new(&self.key_prefix, sale)
    }
}

#[async_trait]
impl AdmissionGate for RedisGate {
    fn name(&self) -> &'static str {
        "redis"
    }

    #[tracing::instrument(skip_all, fields(sale = %terms.sale_id, customer = %customer))]
    async fn admit(
        &self,
        terms: &SaleTerms,
        customer: CustomerId,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Admission, GateError> {
        terms.open_at(now)?;
        let keys = self.keys(terms.sale_id);
        let expires_at = hold_until(now, hold);
        let mut invocation = self.scripts.admit.prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.tokens)
            .key(&keys.sold)
            .key(&keys.buyers)
            .arg(now.timestamp_millis())
            .arg(expires_at.timestamp_millis())
            .arg(terms.units)
            .arg(customer.to_string())
            .arg(new_token());
        let mut connection = self.connection.clone();
        let (status, token, expiry_ms): (i64, String, i64) =
            bounded(invocation.invoke_async(&mut connection)).await?;
        let newly_granted = match status {
            ADMIT_GRANTED => true,
            ADMIT_ALREADY_HOLDER => false,
            ADMIT_SOLD_OUT => return Err(GateError::SoldOut),
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

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer))]
    async fn check(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, GateError> {
        let keys = self.keys(sale);
        let mut invocation = self.scripts.check.prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.tokens)
            .arg(now.timestamp_millis())
            .arg(customer.to_string());
        let mut connection = self.connection.clone();
        let live: Option<String> = bounded(invocation.invoke_async(&mut connection)).await?;
        // Compared here, in constant time, rather than in Lua, so response timing says nothing
        // about how much of a guessed token matched.
        Ok(live.is_some_and(|live| bool::from(live.as_bytes().ct_eq(token.as_bytes()))))
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer))]
    async fn extend(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        until: DateTime<Utc>,
    ) -> Result<(), GateError> {
        let keys = self.keys(sale);
        let mut invocation = self.scripts.extend.prepare_invoke();
        invocation
            .key(&keys.holders)
            .arg(until.timestamp_millis())
            .arg(customer.to_string());
        let mut connection = self.connection.clone();
        bounded(invocation.invoke_async::<()>(&mut connection)).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer, checkout = %checkout))]
    async fn release(
        &self,
        sale: FlashSaleId,
        customer: CustomerId,
        checkout: CheckoutId,
    ) -> Result<(), GateError> {
        let keys = self.keys(sale);
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.tokens)
            .key(&keys.released)
            .arg(customer.to_string())
            .arg(checkout.to_string());
        let mut connection = self.connection.clone();
        bounded(invocation.invoke_async::<()>(&mut connection)).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale, customer = %customer))]
    async fn consume(&self, sale: FlashSaleId, customer: CustomerId) -> Result<(), GateError> {
        let keys = self.keys(sale);
        let mut invocation = self.scripts.consume.prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.tokens)
            .key(&keys.sold)
            .key(&keys.buyers)
            .arg(customer.to_string());
        let mut connection = self.connection.clone();
        bounded(invocation.invoke_async::<()>(&mut connection)).await
    }

    #[tracing::instrument(skip_all, fields(sale = %sale))]
    async fn figures(
        &self,
        sale: FlashSaleId,
        now: DateTime<Utc>,
    ) -> Result<GateFigures, GateError> {
        let keys = self.keys(sale);
        let mut invocation = self.scripts.figures.prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.sold)
            .arg(now.timestamp_millis());
        let mut connection = self.connection.clone();
        let (holders, sold): (i64, i64) = bounded(invocation.invoke_async(&mut connection)).await?;
        Ok(GateFigures {
            holders: u32::try_from(holders)
                .map_err(|_| unexpected(format!("holder count {holders}")))?,
            sold: u32::try_from(sold).map_err(|_| unexpected(format!("sold count {sold}")))?,
        })
    }
}

/// The Redis keys of one sale.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SaleKeys {
    holders: String,
    tokens: String,
    sold: String,
    buyers: String,
    released: String,
}

impl SaleKeys {
    fn new(prefix: &str, sale: FlashSaleId) -> Self {
        // `{...}` is the cluster hash tag: only the sale id decides the slot.
        let base = format!("{prefix}sale:{{{sale}}}");
        Self {
            holders: format!("{base}:holders"),
            tokens: format!("{base}:tokens"),
            sold: format!("{base}:sold"),
            buyers: format!("{base}:buyers"),
            released: format!("{base}:released"),
        }
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

        for key in [&keys.holders, &keys.tokens, &keys.sold, &keys.buyers] {
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
