//! Checkouts: start (reserve every line), heartbeat, cancel, read. The saga itself lives in
//! `crate::checkout`; this file only translates HTTP.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::domain::{CheckoutId, CheckoutState, PoNumber};

use super::auth::CustomerAuth;
use super::carts::parse_cart_id;
use super::extract::{JsonWithBytes, OptionalJson, Path};
use super::idempotent::{self, Outcome};
use super::limits::RateLimited;
use super::openapi::ErrorBody;
use super::views::CheckoutView;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/checkouts", post(start))
        .route("/v1/checkouts/{id}", get(one))
        .route("/v1/checkouts/{id}/heartbeat", post(heartbeat))
        .route("/v1/checkouts/{id}/cancel", post(cancel))
        .route("/v1/checkouts/{id}/complete", post(complete))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StartCheckout {
    cart_id: String,
    #[serde(default)]
    flash_sale_token: Option<String>,
    /// The buyer's purchase-order number (1 to 64 characters), kept on the order; required
    /// when the buyer's company says so.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    po_number: Option<PoNumber>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

fn parse_checkout_id(raw: &str) -> Result<CheckoutId, ApiError> {
    CheckoutId::parse(raw).map_err(|_| not_found_of("checkout"))
}

/// `Idempotency-Key` is optional here: with one, a retried start answers the first result.
#[utoipa::path(
    post,
    operation_id = "start_checkout",
    path = "/v1/checkouts",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "optional; a retry answers the first result")),
    request_body = StartCheckout,
    responses(
        (status = 429, body = ErrorBody, description = "`rate_limited`: over the per-customer budget; `Retry-After` says when to come back"),
        (status = 201, body = CheckoutView, description = "every line reserved until `expires_at`"),
        (status = 404, body = ErrorBody, description = "`cart_not_found`"),
        (status = 403, body = ErrorBody, description = "`admission_required`: a flash-sale item without a valid token"),
        (status = 409, body = ErrorBody, description = "`insufficient_stock` with per-SKU `details`, `cart_not_open`, `admission_in_use`, `price_changed`, `flash_sale_limit` with `details:[{sku, requested, limit}]` (a flash-sale line above what the buyer may have), `sold_out`, `idempotency_conflict` (the first request with this key still runs; `Retry-After` says when to retry)"),
        (status = 422, body = ErrorBody, description = "`cart_empty`, `one_flash_sale_per_checkout`, `po_number_required` (the buyer's company requires one)"),
        (status = 503, body = ErrorBody, description = "`admission_unavailable`: the flash-sale gate fails closed"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn start(
    RateLimited(customer): RateLimited,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonWithBytes(body, raw): JsonWithBytes<StartCheckout>,
) -> Result<Response, ApiError> {
    let cart = parse_cart_id(&body.cart_id)?;
    let key = idempotent::key_of(&headers)?;
    let (state_ref, token, key_ref, po_number) = (
        &state,
        body.flash_sale_token.as_deref(),
        key.as_ref().map(|k| k.as_str()),
        body.po_number.clone(),
    );
    // A keyed start whose first request reserved and was lost answers that checkout.
    let run = move |created: Option<CheckoutId>| async move {
        let checkout = match created {
            Some(id) => state_ref.checkout.get(customer.id, id).await?,
            None => {
                state_ref
                    .checkout
                    .start_with_po_number(customer.id, cart, token, key_ref, po_number)
                    .await?
            }
        };
        Ok(Outcome {
            status: StatusCode::CREATED,
            body: serde_json::to_value(CheckoutView::from(checkout)).unwrap_or_default(),
            definitive: true,
        })
    };
    match &key {
        Some(key) => {
            idempotent::run(
                &state,
                customer.id,
                key,
                ("POST", "/v1/checkouts", &raw),
                run,
            )
            .await
        }
        None => run(None)
            .await
            .map(|o| (o.status, Json(o.body)).into_response()),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Complete {
    /// e.g. `pm_card_visa`; with the simulator also `pm_card_chargeDeclined`,
    /// `pm_card_authenticationRequired`, `pm_card_chargeDeclinedInsufficientFunds`.
    payment_method: Option<String>,
    /// `true` instead of a `payment_method`: a company's buyer places the order on the
    /// company's net terms, within its credit limit; the order is `awaiting_payment_on_terms`
    /// with an invoice.
    on_account: Option<bool>,
}

/// Card or account: exactly one of the two.
enum PayBy {
    Card(String),
    OnAccount,
}

impl Complete {
    fn pay_by(&self) -> Result<PayBy, ApiError> {
        match (&self.payment_method, self.on_account) {
            (Some(method), None | Some(false)) => Ok(PayBy::Card(method.clone())),
            (None, Some(true)) => Ok(PayBy::OnAccount),
            _ => Err(ApiError::validation(
                "give either a payment_method or \"on_account\": true",
            )),
        }
    }
}

/// reserved → charging → outcome. `Idempotency-Key` is required; an outcome still unknown
/// (`charging`) is not stored, so retrying with the same key drives it to its end.
#[utoipa::path(
    post,
    operation_id = "complete_checkout",
    path = "/v1/checkouts/{id}/complete",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(
        ("id" = String, Path),
        ("Idempotency-Key" = String, Header, description = "required; a replay answers the stored result"),
    ),
    request_body = Complete,
    responses(
        (status = 429, body = ErrorBody, description = "`rate_limited`: over the per-customer budget; `Retry-After` says when to come back"),
        (status = 200, body = CheckoutView, description = "`state` is `completed`, `requires_action` (with `client_secret`), `payment_failed` (with `decline_code`) or still `charging`"),
        (status = 400, body = ErrorBody, description = "`idempotency_key_required`, `invalid_idempotency_key`"),
        (status = 404, body = ErrorBody, description = "`checkout_not_found`"),
        (status = 409, body = ErrorBody, description = "`checkout_expired`, `invalid_state`, `payment_in_progress`, `idempotency_conflict` (with `Retry-After`); on account: `credit_limit_exceeded` with `details:[{limit, outstanding, requested}]`, `invoices_overdue`"),
        (status = 422, body = ErrorBody, description = "`on_account_not_available`, `idempotency_key_reused`, `payment_method_refused`, `amount_too_small` (the total is below the payment provider's minimum charge, e.g. EUR 0.50; `details` has `total` and `minimum`), invalid payment method"),
        (status = 502, body = ErrorBody, description = "`payment_gateway_error`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn complete(
    RateLimited(customer): RateLimited,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonWithBytes(body, raw): JsonWithBytes<Complete>,
) -> Result<Response, ApiError> {
    let key = idempotent::key_of(&headers)?.ok_or_else(|| {
        ApiError::bad_request(
            "idempotency_key_required",
            "complete needs an Idempotency-Key header",
        )
    })?;
    let id = parse_checkout_id(&id)?;
    let pay_by = body.pay_by()?;
    let path = format!("/v1/checkouts/{id}/complete");
    idempotent::run(
        &state,
        customer.id,
        &key,
        ("POST", &path, &raw),
        |_| async {
            let (checkout, invoice) = match pay_by {
                PayBy::Card(method) => {
                    let checkout = state.checkout.complete(customer.id, id, &method).await?;
                    (checkout, None)
                }
                PayBy::OnAccount => {
                    let (checkout, invoice) =
                        state.checkout.complete_on_account(customer.id, id).await?;
                    (checkout, Some(invoice))
                }
            };
            let definitive = checkout.state != CheckoutState::Charging;
            let mut body = serde_json::to_value(CheckoutView::from(checkout)).unwrap_or_default();
            if let Some(invoice) = invoice {
                body["invoice_id"] = invoice.id.to_string().into();
            }
            Ok(Outcome {
                status: StatusCode::OK,
                body,
                definitive,
            })
        },
    )
    .await
}

/// One of the caller's checkouts.
#[utoipa::path(
    get,
    operation_id = "get_checkout",
    path = "/v1/checkouts/{id}",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CheckoutView),
        (status = 404, body = ErrorBody, description = "`checkout_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn one(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CheckoutView>, ApiError> {
    let checkout = state
        .checkout
        .get(customer.id, parse_checkout_id(&id)?)
        .await?;
    Ok(Json(checkout.into()))
}

/// Pushes the reservation's expiry to now + TTL, never past the checkout's maximum lifetime.
#[utoipa::path(
    post,
    operation_id = "heartbeat_checkout",
    path = "/v1/checkouts/{id}/heartbeat",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CheckoutView),
        (status = 404, body = ErrorBody, description = "`checkout_not_found`"),
        (status = 409, body = ErrorBody, description = "`checkout_expired`, `invalid_state`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn heartbeat(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Json<CheckoutView>, ApiError> {
    let checkout = state
        .checkout
        .heartbeat(customer.id, parse_checkout_id(&id)?)
        .await?;
    Ok(Json(checkout.into()))
}

/// Releases a reserved checkout's units at once. A checkout waiting for 3-D Secure
/// (`requires_action`) has its payment cancelled first; if it was paid meanwhile the answer
/// is the completed checkout.
#[utoipa::path(
    post,
    operation_id = "cancel_checkout",
    path = "/v1/checkouts/{id}/cancel",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CheckoutView),
        (status = 404, body = ErrorBody, description = "`checkout_not_found`"),
        (status = 409, body = ErrorBody, description = "`invalid_state`"),
        (status = 502, body = ErrorBody, description = "`payment_gateway_error`: the payment could not be cancelled yet"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn cancel(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Json<CheckoutView>, ApiError> {
    let checkout = state
        .checkout
        .cancel(customer.id, parse_checkout_id(&id)?)
        .await?;
    Ok(Json(checkout.into()))
}
