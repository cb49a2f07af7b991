//! Carts: a customer sees and changes only their own; another customer's cart id is simply not
//! found (no existence leak).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::domain::{CartId, Quantity};

use super::admin::parse_sku;
use super::auth::CustomerAuth;
use super::extract::{AppJson, OptionalJson, Path};
use super::openapi::ErrorBody;
use super::views::CartView;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/carts", post(create))
        .route("/v1/carts/{id}", get(one))
        .route(
            "/v1/carts/{id}/lines/{sku}",
            put(set_line).delete(remove_line),
        )
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

/// A new, empty cart of the caller's.
#[utoipa::path(
    post,
    operation_id = "create_cart",
    path = "/v1/carts",
    tag = "carts",
    security(("customer_token" = [])),
    responses((status = 201, body = CartView), (status = 401, body = ErrorBody, description = "no token, or an unknown one"))
)]
async fn create(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<(StatusCode, Json<CartView>), ApiError> {
    let cart = state
        .store
        .create_cart(customer.id, state.clock.now())
        .await?;
    Ok((StatusCode::CREATED, Json(cart.into())))
}

pub(super) fn parse_cart_id(raw: &str) -> Result<CartId, ApiError> {
    CartId::parse(raw).map_err(|_| not_found_of("cart"))
}

/// One of the caller's carts.
#[utoipa::path(
    get,
    operation_id = "get_cart",
    path = "/v1/carts/{id}",
    tag = "carts",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CartView),
        (status = 404, body = ErrorBody, description = "`cart_not_found` (also another customer's cart)"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn one(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CartView>, ApiError> {
    let cart = state
        .store
        .cart(customer.id, parse_cart_id(&id)?)
        .await?
        .ok_or_else(|| not_found_of("cart"))?;
    Ok(Json(cart.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetLine {
    #[schema(value_type = u32, minimum = 1, maximum = 10000)]
    quantity: Quantity,
}

/// Sets the quantity of a SKU in an open cart.
#[utoipa::path(
    put,
    operation_id = "set_cart_line",
    path = "/v1/carts/{id}/lines/{sku}",
    tag = "carts",
    security(("customer_token" = [])),
    params(("id" = String, Path), ("sku" = String, Path)),
    request_body = SetLine,
    responses(
        (status = 200, body = CartView),
        (status = 404, body = ErrorBody, description = "`cart_not_found`, `product_not_found`"),
        (status = 409, body = ErrorBody, description = "`cart_not_open`: a checkout holds it"),
        (status = 422, body = ErrorBody, description = "quantity out of range"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn set_line(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path((id, sku)): Path<(String, String)>,
    AppJson(body): AppJson<SetLine>,
) -> Result<Json<CartView>, ApiError> {
    let cart = parse_cart_id(&id)?;
    let sku = parse_sku(&sku)?;
    let cart = state
        .store
        .set_cart_line(customer.id, cart, &sku, body.quantity, state.clock.now())
        .await?;
    Ok(Json(cart.into()))
}

/// Removes a SKU from an open cart.
#[utoipa::path(
    delete,
    operation_id = "remove_cart_line",
    path = "/v1/carts/{id}/lines/{sku}",
    tag = "carts",
    security(("customer_token" = [])),
    params(("id" = String, Path), ("sku" = String, Path)),
    responses(
        (status = 200, body = CartView),
        (status = 404, body = ErrorBody, description = "`cart_not_found`, `product_not_found`"),
        (status = 409, body = ErrorBody, description = "`cart_not_open`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn remove_line(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path((id, sku)): Path<(String, String)>,
) -> Result<Json<CartView>, ApiError> {
    let cart = parse_cart_id(&id)?;
    let sku = parse_sku(&sku)?;
    let cart = state
        .store
        .remove_cart_line(customer.id, cart, &sku, state.clock.now())
        .await?;
    Ok(Json(cart.into()))
}
