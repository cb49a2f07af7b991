//! Demo conveniences, only when the built-in Stripe simulator is the gateway (the embedded
//! shape, `--demo`): the storefront makes a customer for its visitor, and plays the customer's
//! 3-D Secure step. With a real Stripe key both answer 404 like any unknown route, so a
//! production instance offers neither self-service customers nor simulated payments.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::CustomerName;
use crate::payments::StripeSimulator;

use super::auth::CustomerAuth;
use super::extract::{AppJson, OptionalJson, Path};
use super::openapi::ErrorBody;
use super::{new_customer_token, token_hash, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/demo/customers", post(create_customer))
        .route(
            "/v1/demo/payments/{payment_intent_id}/authenticate",
            post(authenticate),
        )
}

fn simulator(state: &AppState) -> Result<&StripeSimulator, ApiError> {
    state
        .simulator
        .as_ref()
        .ok_or_else(|| ApiError::not_found("route_not_found", "no such route"))
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

#[derive(Serialize, ToSchema)]
pub(super) struct DemoCustomer {
    id: String,
    name: String,
    /// The customer's bearer token, shown once.
    token: String,
}

/// A customer for a storefront visitor, named like a guest.
#[utoipa::path(
    post,
    operation_id = "create_demo_customer",
    path = "/v1/demo/customers",
    tag = "demo",
    responses(
        (status = 201, body = DemoCustomer),
        (status = 404, body = ErrorBody, description = "not the simulator: no such route"),
    )
)]
async fn create_customer(
    State(state): State<AppState>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Response, ApiError> {
    simulator(&state)?;
    let token = new_customer_token();
    // The token's own randomness makes a short, distinct guest name.
    let suffix: String = token.chars().skip(4).take(6).collect();
    let name = CustomerName::parse(&format!("Guest {suffix}"))
        .map_err(|_| ApiError::internal("guest name rejected"))?;
    let customer = state
        .store
        .create_customer(&name, &token_hash(&token))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(DemoCustomer {
            id: customer.id.to_string(),
            name: customer.name,
            token,
        }),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Authenticate {
    /// `true` passes 3-D Secure, `false` fails it.
    succeed: bool,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Authenticated {
    payment_intent_id: String,
    /// The PaymentIntent's status as Stripe spells it, e.g. `succeeded`.
    status: &'static str,
}

/// The customer's 3-D Secure step for a payment in `requires_action`. The simulator then
/// delivers the signed webhook, which moves the checkout on exactly as Stripe's would.
#[utoipa::path(
    post,
    operation_id = "authenticate_demo_payment",
    path = "/v1/demo/payments/{payment_intent_id}/authenticate",
    tag = "demo",
    security(("customer_token" = [])),
    params(("payment_intent_id" = String, Path, description = "`pi_...` of one of the caller's checkouts")),
    request_body = Authenticate,
    responses(
        (status = 200, body = Authenticated),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "not the simulator, or not the caller's payment"),
        (status = 409, body = ErrorBody, description = "the payment is not waiting for authentication"),
    )
)]
async fn authenticate(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(payment_intent_id): Path<String>,
    AppJson(body): AppJson<Authenticate>,
) -> Result<Json<Authenticated>, ApiError> {
    let simulator = simulator(&state)?;
    let not_found = || ApiError::not_found("payment_not_found", "payment not found");
    // Another customer's payment is simply not found, as with carts and orders.
    let checkout = state
        .store
        .checkout_by_payment_intent(&payment_intent_id)
        .await?
        .filter(|c| c.customer_id == customer.id)
        .ok_or_else(not_found)?;
    let intent = simulator
        .authenticate(&payment_intent_id, body.succeed)
        .map_err(|e| ApiError::conflict("invalid_state", e.to_string()))?;
    tracing::info!(checkout_id = %checkout.id, succeed = body.succeed, "simulated 3-D Secure");
    Ok(Json(Authenticated {
        payment_intent_id: intent.id,
        status: intent.status.as_str(),
    }))
}
