//! The public catalogue: what anyone may see of a product, including live availability.

use axum::extract::State;

use super::extract::Path;
use axum::routing::get;
use axum::{Json, Router};

use super::admin::{parse_cursor_sku, parse_sku};
use super::extract::AppQuery;
use super::openapi::ErrorBody;
use super::views::{ListParams, ListView, ProductView};
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/products", get(list))
        .route("/v1/products/{sku}", get(one))
}

/// The catalogue with live availability, by SKU.
#[utoipa::path(
    get,
    operation_id = "list_products",
    path = "/v1/products",
    tag = "catalogue",
    params(ListParams),
    responses(
        (status = 200, body = ListView<ProductView>),
        (status = 400, body = ErrorBody, description = "`invalid_cursor`, `invalid_query`"),
        (status = 422, body = ErrorBody, description = "limit out of range"),
    )
)]
async fn list(
    State(state): State<AppState>,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<Json<ListView<ProductView>>, ApiError> {
    let after = params.cursor.as_deref().map(parse_cursor_sku).transpose()?;
    let page = state
        .store
        .list_products(after.as_ref(), params.limit()?)
        .await?;
    Ok(Json(ListView {
        data: page.items.iter().map(ProductView::from).collect(),
        next_cursor: page.next,
    }))
}

/// One product.
#[utoipa::path(
    get,
    operation_id = "get_catalogue_product",
    path = "/v1/products/{sku}",
    tag = "catalogue",
    params(("sku" = String, Path)),
    responses(
        (status = 200, body = ProductView),
        (status = 404, body = ErrorBody, description = "`product_not_found`"),
    )
)]
async fn one(
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<ProductView>, ApiError> {
    let sku = parse_sku(&sku)?;
    let product = state
        .store
        .product(&sku)
        .await?
        .ok_or_else(|| not_found_of("product"))?;
    Ok(Json(ProductView::from(&product)))
}
