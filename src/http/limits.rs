//! Limits on hostile or careless callers (DESIGN §7, §8): a per-customer rate limit on the
//! calls that reserve stock or move money, bounded headers and bodies, and a request timeout.
//! Every refusal is the contract's JSON error body (promise 7) and happens before any handler
//! runs, so a refused request changes nothing.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::domain::{Customer, CustomerId};
use crate::flash_sale::RequestBudget;

use super::auth::CustomerAuth;
use super::{ApiError, AppState, BODY_LIMIT};

/// Request headers (names, values and their separators) above this answer `431`. Real clients
/// send a few hundred bytes; a bearer token is at most 512.
pub const HEADER_LIMIT: usize = 16 * 1024;

/// What hyper itself accepts before our middleware sees the request: a backstop that bounds
/// the memory a connection may hold while its headers arrive. Between [`HEADER_LIMIT`] and this
/// the answer is our JSON `431`; beyond it hyper answers a bare `431` and closes.
pub const HEADER_BUFFER_LIMIT: usize = 64 * 1024;

/// Per-customer budget on `POST /v1/checkouts`, `.../complete` and flash-sale tokens: N per
/// second with a burst of 2N (DESIGN §8), so a well-behaved client never meets it.
///
/// With Redis configured the budget is shared by every instance (one script call per
/// limited request, the same GCRA rule as in memory); otherwise each instance keeps its own in
/// memory, which bounds what one customer can do to any single instance. When Redis cannot be
/// asked the request passes (the limit is for fairness, not safety) and a summary line says so.
pub struct RateLimit {
    limiter: Option<DefaultKeyedRateLimiter<CustomerId>>,
    checks: AtomicU64,
    rate: u32,
    shared: Option<SharedBudget>,
}

struct SharedBudget {
    client: redis::Client,
    connection: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    key_prefix: String,
    script: redis::Script,
}

/// Redis asked for a shared budget answers within this, or the request passes.
const SHARED_BUDGET_TIMEOUT: Duration = Duration::from_millis(500);

static SHARED_BUDGET_UNAVAILABLE: crate::telemetry::Summarised =
    crate::telemetry::Summarised::new("rate limit: Redis unavailable, requests passed unlimited");

impl RateLimit {
    /// How many checks pass between two sweeps of idle customers out of the limiter's map.
    const SWEEP_EVERY: u64 = 4096;

    /// `0` switches the limit off.
    pub fn per_second(rate: u32) -> Self {
        let limiter = NonZeroU32::new(rate).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            checks: AtomicU64::new(0),
            rate,
            shared: None,
        }
    }

    /// The budget is kept in Redis at `url`, under `key_prefix`, shared by every instance
    /// that names the same ones. Connects on first use.
    pub fn shared_through(mut self, url: &str, key_prefix: &str) -> Result<Self, String> {
        if self.limiter.is_none() {
            return Ok(self);
        }
        let client = redis::Client::open(url)
            .map_err(|e| format!("the Redis URL is not valid ({:?})", e.kind()))?;
        self.shared = Some(SharedBudget {
            client,
            connection: tokio::sync::OnceCell::new(),
            key_prefix: key_prefix.to_owned(),
            script: redis::Script::new(include_str!("rate_limit.lua")),
        });
        Ok(self)
    }

    /// Takes one request from `customer`'s budget, or says how long to wait.
    pub async fn check(&self, customer: CustomerId) -> Result<(), ApiError> {
        if let Some(shared) = &self.shared {
            return match self.check_shared(shared, customer).await {
                Ok(0) => Ok(()),
                Ok(wait_ms) => Err(rate_limited(Duration::from_millis(wait_ms))),
                Err(cause) => {
                    SHARED_BUDGET_UNAVAILABLE.warn(&cause);
                    Ok(())
                }
            };
        }
        self.check_in_memory(customer)
    }

    /// For a gate that keeps the budgets in the same Redis (one script call takes the request
    /// and decides the admission): the customer's shared budget to take there. Without a
    /// shared budget, this instance's own is checked here (no I/O) and `None` is the answer.
    pub fn budget_for_gate(&self, customer: CustomerId) -> Result<Option<RequestBudget>, ApiError> {
        match &self.shared {
            Some(shared) => Ok(Some(self.budget_of(shared, customer))),
            None => self.check_in_memory(customer).map(|()| None),
        }
    }

    fn budget_of(&self, shared: &SharedBudget, customer: CustomerId) -> RequestBudget {
        RequestBudget {
            key: format!("{}rate:{customer}", shared.key_prefix),
            interval_ms: (1000 / u64::from(self.rate.max(1))).max(1),
            burst: u64::from(self.rate).saturating_mul(2).max(1),
        }
    }

    /// The budget of this instance alone.
    fn check_in_memory(&self, customer: CustomerId) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(Self::SWEEP_EVERY)
        {
            // Customers whose budget is full again are indistinguishable from new ones; without
            // this the map would keep every customer ever seen.
            limiter.retain_recent();
        }
        limiter
            .check_key(&customer)
            .map_err(|not_until| rate_limited(not_until.wait_time_from(limiter.clock().now())))
    }

    async fn check_shared(
        &self,
        shared: &SharedBudget,
        customer: CustomerId,
    ) -> Result<u64, String> {
        let call = async {
            let connection = shared
                .connection
                .get_or_try_init(|| {
                    redis::aio::ConnectionManager::new_with_config(
                        shared.client.clone(),
                        redis::aio::ConnectionManagerConfig::new()
                            .set_connection_timeout(SHARED_BUDGET_TIMEOUT)
                            .set_response_timeout(SHARED_BUDGET_TIMEOUT)
                            .set_number_of_retries(0),
                    )
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut connection = connection.clone();
            let budget = self.budget_of(shared, customer);
            shared
                .script
                .key(budget.key)
                .arg(budget.interval_ms)
                .arg(budget.burst)
                .invoke_async::<u64>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(SHARED_BUDGET_TIMEOUT * 2, call)
            .await
            .map_err(|_| "Redis did not answer in time".to_owned())?
    }
}

pub(super) fn rate_limited(wait: Duration) -> ApiError {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many requests for this customer; retry after the Retry-After seconds",
    )
    .retry_after(seconds.max(1))
}

/// A customer's request on a rate-limited route: authenticated first, so an unauthenticated
/// flood gets `401`s and never spends a real customer's budget.
pub struct RateLimited(pub Customer);

impl FromRequestParts<AppState> for RateLimited {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let CustomerAuth(customer) = CustomerAuth::from_request_parts(parts, state).await?;
        state.rate_limit.check(customer.id).await?;
        Ok(Self(customer))
    }
}

/// Refuses oversized headers (`431 headers_too_large`) and bodies whose declared length is over
/// the limit (`413 payload_too_large`) on every route, before routing or reading anything.
/// Bodies without a length (chunked) are cut off by `DefaultBodyLimit` as they are read.
pub async fn reject_oversized(request: Request, next: Next) -> Response {
    if header_bytes(request.headers()) > HEADER_LIMIT {
        return close(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request headers are larger than {} KiB",
                HEADER_LIMIT / 1024
            ),
        ));
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > BODY_LIMIT as u64) {
        return close(payload_too_large());
    }
    next.run(request).await
}

pub(super) fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is larger than {} KiB", BODY_LIMIT / 1024),
    )
}

/// Size of the headers as sent: `name: value\r\n` for each.
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The error, and the connection closed after it: what is left of the request is unread.
fn close(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The answer to a request that outlived `--request-timeout-seconds` (a client dribbling its
/// body, or a handler stuck behind a slow dependency). Dropping the handler is safe: every
/// saga phase is one transaction and a charge in flight is owned by its lease (DESIGN §3).
pub async fn timed_out(timeout: Duration, error: tower::BoxError) -> Response {
    if error.is::<tower::timeout::error::Elapsed>() {
        close(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request was not received and answered within {} s",
                timeout.as_secs()
            ),
        ))
    } else {
        ApiError::internal(error).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_passes_and_the_next_call_is_told_when_to_retry() {
        // One a second: a refill between these calls would take a whole second.
        let limit = RateLimit::per_second(1);
        let ada = CustomerId::new();

        let passed = (0..2)
            .filter(|_| limit.check_in_memory(ada).is_ok())
            .count();
        let refused = limit
            .check_in_memory(ada)
            .expect_err("the third call is over the burst");

        assert_eq!(passed, 2);
        assert_eq!(
            (refused.status(), refused.code()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        let response = refused.into_response();
        let retry: u64 = response.headers()[header::RETRY_AFTER]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("whole seconds");
        assert!(retry >= 1);
    }

    #[test]
    fn each_customer_has_a_budget_of_their_own() {
        let limit = RateLimit::per_second(1);
        let (ada, bob) = (CustomerId::new(), CustomerId::new());
        while limit.check_in_memory(ada).is_ok() {}

        assert!(limit.check_in_memory(bob).is_ok());
    }

    #[test]
    fn a_rate_of_zero_never_refuses() {
        let limit = RateLimit::per_second(0);
        let ada = CustomerId::new();

        assert!((0..10_000).all(|_| limit.check_in_memory(ada).is_ok()));
    }

    #[test]
    fn header_bytes_count_names_values_and_separators() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("12345"));
        assert_eq!(header_bytes(&headers), 3 + 5 + 4);
    }
}
