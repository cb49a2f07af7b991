//! Liveness and readiness: `/healthz` says the process answers, `/readyz` that the store does.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::openapi::{ErrorBody, Health, Readiness};
use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The store answers too.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, body = Readiness),
        (status = 503, body = ErrorBody, description = "`unavailable`: the store does not answer"),
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::unavailable(format!("store not ready: {e}")))?;
    Ok(Json(
        json!({"status": "ready", "store": state.store.kind().as_str()}),
    ))
}
