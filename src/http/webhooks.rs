//! `POST /webhooks/stripe` (DESIGN §6): Stripe is the source of truth. Verify the signature
//! over the raw body, dedupe by event id, let the saga handle the event, and answer 2xx only
//! once that is durable, so Stripe retries anything we did not finish.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use secrecy::ExposeSecret as _;
use serde_json::{json, Value};

use crate::observe;
use crate::payments::{signature, WebhookEvent};

use super::extract::{is_json, unsupported_media_type, RawBody};
use super::openapi::{ErrorBody, WebhookReceived};
use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/stripe", post(stripe))
}

/// A signed Stripe event; 2xx only once it is durably handled, so Stripe retries the rest.
#[utoipa::path(
    post,
    operation_id = "stripe_webhook",
    path = "/webhooks/stripe",
    tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "`t=...,v1=...` over `t.payload`")),
    request_body(content = Object, description = "a Stripe event", content_type = "application/json"),
    responses(
        (status = 200, body = WebhookReceived),
        (status = 400, body = ErrorBody, description = "`signature_missing`, `invalid_signature`, `invalid_event`"),
        (status = 415, body = ErrorBody, description = "not JSON"),
        (status = 500, body = ErrorBody, description = "not handled yet; Stripe retries"),
    )
)]
async fn stripe(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    if !is_json(&headers) {
        return Err(unsupported_media_type());
    }
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::bad_request("signature_missing", "Stripe-Signature is required")
        })?;
    let secrets: Vec<&str> = state
        .webhook_secrets
        .iter()
        .map(|s| s.expose_secret())
        .collect();
    signature::verify(
        header,
        &body,
        &secrets,
        state.clock.now().timestamp(),
        signature::DEFAULT_TOLERANCE,
    )
    .map_err(|e| {
        observe::webhook_event("unknown", "invalid_signature");
        ApiError::bad_request("invalid_signature", e.to_string())
    })?;
    let event = WebhookEvent::parse(&body).map_err(|e| {
        observe::webhook_event("unknown", "invalid_event");
        ApiError::bad_request("invalid_event", e.to_string())
    })?;
    if state.store.webhook_seen(&event.id).await? {
        observe::webhook_event(&event.event_type, "duplicate");
        return Ok(Json(json!({"received": true, "duplicate": true})));
    }
    state.checkout.handle_event(&event).await.map_err(|e| {
        observe::webhook_event(&event.event_type, "failed");
        ApiError::internal(format!("webhook {} not handled: {e}", event.id))
    })?;
    state
        .store
        .record_webhook_event(
            &event.id,
            &event.event_type,
            event.payment_intent_id(),
            state.clock.now(),
        )
        .await?;
    observe::webhook_event(&event.event_type, "handled");
    Ok(Json(json!({"received": true})))
}
