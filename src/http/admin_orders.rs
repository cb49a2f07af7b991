//! Admin actions on orders: mark a paid order shipped (`fulfilled`), or refund it (money back
//! through the gateway, units back in stock).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use crate::domain::OrderId;

use super::auth::Admin;
use super::extract::OptionalJson;
use super::views::OrderView;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/orders/{id}/refund", post(refund))
        .route("/v1/admin/orders/{id}/shipments", post(ship))
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

fn parse_order_id(raw: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(raw).map_err(|_| not_found_of("order"))
}

async fn current(state: &AppState, id: OrderId) -> Result<Json<OrderView>, ApiError> {
    let order = state
        .store
        .admin_order(id)
        .await?
        .ok_or_else(|| not_found_of("order"))?;
    Ok(Json(order.into()))
}

/// `200` with the refunded order, or `202` with the order still `paid` when the refund is
/// recorded but the gateway has not confirmed it yet (recovery finishes it).
async fn refund(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    let checkout = state.checkout.refund_order(id).await?;
    let status = if checkout.refund_due {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, current(&state, id).await?).into_response())
}

async fn ship(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Json<OrderView>, ApiError> {
    let id = parse_order_id(&id)?;
    let order = state.store.mark_fulfilled(id, state.clock.now()).await?;
    Ok(Json(order.into()))
}
