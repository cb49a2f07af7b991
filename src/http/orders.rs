//! A customer's orders: their own, and for a company's buyer those of every buyer of the
//! company.

use axum::extract::State;

use super::extract::Path;
use axum::routing::get;
use axum::{Json, Router};

use crate::domain::OrderId;

use super::auth::CustomerAuth;
use super::extract::AppQuery;
use super::openapi::ErrorBody;
use super::views::{ListParams, ListView, OrderView};
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/orders", get(list))
        .route("/v1/orders/{id}", get(one))
}

/// The caller's orders, oldest first; a company's buyer sees those of every buyer of the
/// company.
#[utoipa::path(
    get,
    operation_id = "list_orders",
    path = "/v1/orders",
    tag = "orders",
    security(("customer_token" = [])),
    params(ListParams),
    responses(
        (status = 200, body = ListView<OrderView>),
        (status = 400, body = ErrorBody, description = "`invalid_cursor`, `invalid_query`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn list(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<Json<ListView<OrderView>>, ApiError> {
    if let Some(cursor) = params.cursor.as_deref() {
        if !cursor.parse::<i64>().is_ok_and(|seq| seq >= 0) {
            return Err(ApiError::bad_request(
                "invalid_cursor",
                "the cursor is not valid",
            ));
        }
    }
    let page = state
        .store
        .list_orders(customer.id, params.cursor.as_deref(), params.limit()?)
        .await?;
    Ok(Json(ListView {
        data: page.items.into_iter().map(OrderView::from).collect(),
        next_cursor: page.next,
    }))
}

/// One of the caller's orders, or, for a company's buyer, of another buyer of the company.
#[utoipa::path(
    get,
    operation_id = "get_order",
    path = "/v1/orders/{id}",
    tag = "orders",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = OrderView),
        (status = 404, body = ErrorBody, description = "`order_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn one(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id = OrderId::parse(&id).map_err(|_| not_found_of("order"))?;
    let order = state
        .store
        .order(customer.id, id)
        .await?
        .ok_or_else(|| not_found_of("order"))?;
    Ok(Json(order.into()))
}
