//! Runs a mutating handler under its `Idempotency-Key` (DESIGN §4): replay, 409 for a
//! concurrent duplicate, 422 for a reused key, and only definitive outcomes stored.

use std::future::Future;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Duration;

use crate::domain::CustomerId;
use crate::idempotency::{fingerprint, IdempotencyKey};
use crate::store::IdempotencyStart;

use super::{ApiError, AppState};

pub const HEADER: &str = "idempotency-key";

/// How long a first request holds its key before a retry may take over (a crashed request).
const LOCK_FOR_SECONDS: i64 = 60;

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

pub async fn run<F, Fut>(
    state: &AppState,
    customer: CustomerId,
    key: &IdempotencyKey,
    request: (&str, &str, &[u8]),
    handler: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Outcome, ApiError>>,
{
    let (method, path, body) = request;
    let print = fingerprint(method, path, body);
    let start = state
        .store
        .idempotency_begin(
            customer,
            key.as_str(),
            &print,
            state.clock.now(),
            Duration::seconds(LOCK_FOR_SECONDS),
        )
        .await?;
    match start {
        IdempotencyStart::Replay { status, body } => Ok(replayed(status, body)),
        IdempotencyStart::InFlight => Err(ApiError::conflict(
            "idempotency_conflict",
            "a request with this Idempotency-Key is still in progress",
        )),
        IdempotencyStart::Mismatch => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with different parameters",
        )),
        IdempotencyStart::Proceed => {
            let result = handler().await;
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
            } else {
                state
                    .store
                    .idempotency_abandon(customer, key.as_str())
                    .await?;
            }
            result.map(|outcome| (outcome.status, axum::Json(outcome.body)).into_response())
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
