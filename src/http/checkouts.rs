//! Checkouts: start (reserve every line), heartbeat, cancel, read. The saga itself lives in
//! `crate::checkout`; this file only translates HTTP.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::domain::CheckoutId;

use super::auth::CustomerAuth;
use super::carts::parse_cart_id;
use super::extract::{AppJson, OptionalJson};
use super::views::CheckoutView;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/checkouts", post(start))
        .route("/v1/checkouts/{id}", get(one))
        .route("/v1/checkouts/{id}/heartbeat", post(heartbeat))
        .route("/v1/checkouts/{id}/cancel", post(cancel))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartCheckout {
    cart_id: String,
    #[serde(default)]
    #[allow(dead_code)]
    flash_sale_token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

fn parse_checkout_id(raw: &str) -> Result<CheckoutId, ApiError> {
    CheckoutId::parse(raw).map_err(|_| not_found_of("checkout"))
}

async fn start(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    AppJson(body): AppJson<StartCheckout>,
) -> Result<(StatusCode, Json<CheckoutView>), ApiError> {
    let cart = parse_cart_id(&body.cart_id)?;
    let checkout = state.checkout.start(customer.id, cart).await?;
    Ok((StatusCode::CREATED, Json(checkout.into())))
}

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
