//! Liveness and readiness: `/healthz` says the process answers, `/readyz` that the store does,
//! and which configured broker is down (`degraded`: still serving, see `crate::brokers`).

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

/// The store answers too; a broker that is down makes it `degraded`, not unready.
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
    // Only up or down: the failure text stays on the admin ops view.
    let dependencies: serde_json::Map<String, Value> = state
        .brokers
        .statuses()
        .into_iter()
        .map(|b| (b.name.to_owned(), json!({"status": b.status})))
        .collect();
    let status = if state.brokers.all_up() {
        "ready"
    } else {
        "degraded"
    };
    Ok(Json(json!({
        "status": status,
        "store": state.store.kind().as_str(),
        "dependencies": dependencies,
    })))
}
