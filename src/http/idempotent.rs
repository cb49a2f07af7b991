//! Runs a mutating handler under its `Idempotency-Key` (DESIGN §4): replay, 409 for a
//! concurrent duplicate, 422 for a reused key, and only definitive outcomes stored.

use std::future::Future;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Duration;

use crate::domain::{CheckoutId, CustomerId};
use crate::idempotency::{fingerprint, IdempotencyKey};
use crate::store::IdempotencyStart;

use super::{ApiError, AppState};

pub const HEADER: &str = "idempotency-key";

/// How long a request holds its key without renewing it (DESIGN §4): a key whose request died
/// with its process is free again at most this long after the last renewal.
pub const LEASE_SECONDS: i64 = 5;

/// How often a running request renews its lease, well inside it.
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_millis(1_500);

/// The `Idempotency-Key` header, if any; a malformed one is a 400.
pub fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(raw) = headers.get(HEADER) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .and_then(|v| IdempotencyKey::parse(v).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                crate::idempotency::KeyError.to_string(),
            )
        })
}

/// What a handler answered, and whether it is final enough to replay.
pub struct Outcome {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub definitive: bool,
}

/// Runs `handler` under `key`. The handler gets the checkout a start with this key already
/// reserved, if its first request was lost after the reservation committed (it then answers
/// that checkout instead of starting again); every other route ignores it.
pub async fn run<F, Fut>(
    state: &AppState,
    customer: CustomerId,
    key: &IdempotencyKey,
    request: (&str, &str, &[u8]),
    handler: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<CheckoutId>) -> Fut,
    Fut: Future<Output = Result<Outcome, ApiError>>,
{
    let (method, path, body) = request;
    let print = fingerprint(method, path, body);
    let now = state.clock.now();
    let start = state
        .store
        .idempotency_begin(
            customer,
            key.as_str(),
            &print,
            now,
            Duration::seconds(LEASE_SECONDS),
        )
        .await?;
    let created = match start {
        IdempotencyStart::Replay { status, body } => return Ok(replayed(status, body)),
        IdempotencyStart::InFlight { until } => {
            let wait = u64::try_from((until - now).num_milliseconds()).unwrap_or(0);
            return Err(ApiError::conflict(
                "idempotency_conflict",
                "a request with this Idempotency-Key is still in progress",
            )
            .retry_after(wait.div_ceil(1_000).max(1)));
        }
        IdempotencyStart::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with different parameters",
            ))
        }
        IdempotencyStart::Proceed => None,
        IdempotencyStart::Created(checkout) => Some(checkout),
    };
    let result = holding(state, customer, key, handler(created)).await;
    let (status, body, definitive) = match &result {
        Ok(outcome) => (outcome.status, outcome.body.clone(), outcome.definitive),
        Err(error) => {
            let transient = error.status().is_server_error()
                || error.status() == StatusCode::CONFLICT
                || error.status() == StatusCode::TOO_MANY_REQUESTS;
            (error.status(), serde_json::Value::Null, !transient)
        }
    };
    if definitive {
        let stored = match &result {
            Ok(_) => body.to_string(),
            Err(error) => error.body_json().to_string(),
        };
        state
            .store
            .idempotency_finish(customer, key.as_str(), status.as_u16(), &stored)
            .await?;
    } else if created.is_none() {
        // A key that reserved a checkout keeps it: a later retry must still find it.
        state
            .store
            .idempotency_abandon(customer, key.as_str())
            .await?;
    }
    result.map(|outcome| (outcome.status, axum::Json(outcome.body)).into_response())
}

/// Runs `work` while renewing the key's lease, so the lease outlives the request exactly as
/// long as its process does.
async fn holding<T>(
    state: &AppState,
    customer: CustomerId,
    key: &IdempotencyKey,
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + RENEW_EVERY, RENEW_EVERY);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = renew.tick() => {
                let until = state.clock.now() + Duration::seconds(LEASE_SECONDS);
                if let Err(e) = state.store.idempotency_renew(customer, key.as_str(), until).await {
                    tracing::warn!(error = %e, "idempotency lease not renewed");
                }
            }
        }
    }
}

fn replayed(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
