//! Carts: a customer sees and changes only their own; another customer's cart id is simply not
//! found (no existence leak).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::domain::{CartId, Quantity, Sku};

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
        (status = 422, body = ErrorBody, description = "quantity out of range; `ordering_rules`: outside the product's min_quantity, increment or max_quantity, details `[{sku, rule, quantity, allowed}]`"),
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
    line_meets_rules(&state, &sku, body.quantity).await?;
    let cart = state
        .store
        .set_cart_line(customer.id, cart, &sku, body.quantity, state.clock.now())
        .await?;
    Ok(Json(cart.into()))
}

/// A line outside its product's ordering rules is refused before the cart changes. The rules
/// come from the in-memory catalogue (this instance's own admin edits are in it before they
/// are answered); the reservation checks them again under its locks, so a rule changed
/// meanwhile never sells a line outside it. A SKU the snapshot does not know yet is looked up.
async fn line_meets_rules(state: &AppState, sku: &Sku, quantity: Quantity) -> Result<(), ApiError> {
    let from_snapshot = state.catalogue.snapshot().and_then(|snapshot| {
        snapshot
            .find(sku.as_str())
            .map(|i| snapshot.products[i].rules())
    });
    let rules = match from_snapshot {
        Some(rules) => rules,
        // Unknown here: the store answers `product_not_found` if it is unknown there too.
        None => match state.store.product(sku).await? {
            Some(product) => product.rules,
            None => return Ok(()),
        },
    };
    match rules.breach(sku, quantity.get()) {
        None => Ok(()),
        Some(breach) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ordering_rules",
            format!(
                "{} must be ordered in quantities meeting its {}",
                breach.sku, breach.rule
            ),
        )
        .details([breach])),
    }
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
