//! Admin actions on orders: mark a paid order shipped (`fulfilled`), ship lines of an
//! authorized order (manual capture: each shipment captures what it ships), or refund it
//! (money back through the gateway, units back in stock).

use axum::extract::State;

use super::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::checkout::RefundReport;
use crate::domain::{OrderId, Quantity, Sku};

use super::auth::Admin;
use super::extract::{AppJson, OptionalJson};
use super::openapi::ErrorBody;
use super::views::OrderView;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/orders/{id}/refund", post(refund))
        .route("/v1/admin/orders/{id}/shipments", post(ship))
        .route("/v1/admin/orders/{id}/refunds", post(refund_lines))
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
/// recorded but the gateway has not confirmed it yet (recovery finishes it) or Stripe holds it
/// `pending` (`refund_status: "pending"`; its `refund.updated` event finishes it). A refund
/// Stripe failed leaves the order `paid` with `refund_status: "failed"` and Stripe's
/// `refund_failure_reason` (`200`). An order captured by shipments, or with partial refunds,
/// gets back what is left of what was captured (an order still holding an authorization for
/// unshipped units is closed first); an `authorized` one is cancelled.
/// An order placed on account (`awaiting_payment_on_terms`, or `paid` on terms) is refunded at
/// once (`200`): its invoice is `void`, its open balance given back to the company's credit.
#[utoipa::path(
    post,
    operation_id = "refund_order",
    path = "/v1/admin/orders/{id}/refund",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = OrderView, description = "refunded"),
        (status = 202, body = OrderView, description = "refund recorded, not yet confirmed by the gateway, or `refund_status: pending` at Stripe"),
        (status = 404, body = ErrorBody, description = "`order_not_found`"),
        (status = 409, body = ErrorBody, description = "`invalid_order_state`: the order cannot be refunded in its status (not paid, or shipped)"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn refund(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    let (checkout, report) = state.checkout.refund_order(id).await?;
    let Json(mut order) = current(&state, id).await?;
    let unsettled = report.as_ref().is_some_and(|r| !r.settled());
    reported(&mut order, report);
    let status =
        if unsettled || checkout.refund_due || order.refund_status.as_deref() == Some("pending") {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
    Ok((status, Json(order)).into_response())
}

/// The answer to a refund request shows what its refund came to: `refund_status` and, when
/// Stripe failed it, `refund_failure_reason`.
fn reported(order: &mut OrderView, report: Option<RefundReport>) {
    if let Some(report) = report {
        order.refund_status = Some(report.status.to_owned());
        order.refund_failure_reason = report.failure_reason;
    }
}

/// Units of one SKU in a shipment.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ShipmentLine {
    #[schema(value_type = String)]
    sku: Sku,
    #[schema(value_type = u32, minimum = 1, maximum = 10000)]
    quantity: Quantity,
}

/// A shipment: no body (or `{}`) marks a paid order shipped; `lines` ship part of an
/// authorized order (manual capture); `last: true` closes the order, every unit not shipped
/// by then being short (back in stock, never captured).
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ShipmentBody {
    #[serde(default)]
    lines: Option<Vec<ShipmentLine>>,
    #[serde(default)]
    last: bool,
}

/// Marks a paid order shipped (`fulfilled`), or, under manual capture, ships lines of an
/// authorized order and captures their amount: the order is `partially_fulfilled`, then
/// `fulfilled` after its last shipment.
#[utoipa::path(
    post,
    operation_id = "ship_order",
    path = "/v1/admin/orders/{id}/shipments",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    request_body(content = Option<ShipmentBody>, description = "optional: lines shipped now"),
    responses(
        (status = 200, body = OrderView, description = "shipped (and captured)"),
        (status = 202, body = OrderView, description = "shipment recorded, its capture not confirmed by the gateway yet (recovery finishes it)"),
        (status = 404, body = ErrorBody, description = "`order_not_found`"),
        (status = 409, body = ErrorBody, description = "`invalid_order_state`: not paid (no lines) or not authorized (lines); `shipment_in_progress`"),
        (status = 422, body = ErrorBody, description = "`invalid_shipment`: a SKU not of the order, more units than are left, or nothing to ship"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn ship(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ShipmentBody>,
) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    if body.lines.is_none() && !body.last {
        let order = state.store.mark_fulfilled(id, state.clock.now()).await?;
        return Ok(Json(OrderView::from(order)).into_response());
    }
    let lines = body
        .lines
        .unwrap_or_default()
        .into_iter()
        .map(|line| (line.sku, line.quantity.get()))
        .collect();
    let (order, settled) = state.checkout.ship(id, lines, body.last).await?;
    let status = if settled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(OrderView::from(order))).into_response())
}

/// A partial refund by line: these units' amount goes back; `restock` puts them back in stock.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LineRefundBody {
    lines: Vec<ShipmentLine>,
    #[serde(default)]
    restock: bool,
}

/// Refunds exactly the units named (their order prices), never more than was captured in all;
/// `restock: true` puts them back in stock, once each. `200` once Stripe refunded (the order's
/// `refunded` amount grew; `refunded` status once everything captured went back) or failed it
/// (`refund_status: "failed"` with `refund_failure_reason`; the units are refundable again),
/// `202` while Stripe holds the refund `pending` or its answer is not known yet.
#[utoipa::path(
    post,
    operation_id = "refund_order_lines",
    path = "/v1/admin/orders/{id}/refunds",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    request_body = LineRefundBody,
    responses(
        (status = 200, body = OrderView, description = "refunded"),
        (status = 202, body = OrderView, description = "recorded; Stripe has not settled it yet"),
        (status = 404, body = ErrorBody, description = "`order_not_found`"),
        (status = 409, body = ErrorBody, description = "`invalid_order_state`: not paid or shipped"),
        (status = 422, body = ErrorBody, description = "`invalid_refund`: a SKU not of the order, more units than refundable, more than captured"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn refund_lines(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AppJson(body): AppJson<LineRefundBody>,
) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    let lines = body
        .lines
        .into_iter()
        .map(|line| (line.sku, line.quantity.get()))
        .collect();
    let (order, report) = state.checkout.refund_lines(id, lines, body.restock).await?;
    let status = if report.settled() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut view = OrderView::from(order);
    reported(&mut view, Some(report));
    Ok((status, Json(view)).into_response())
}
