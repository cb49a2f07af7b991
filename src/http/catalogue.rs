//! The public catalogue: what anyone may see of a product, including live availability.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use super::admin::{parse_cursor_sku, parse_sku};
use super::extract::AppQuery;
use super::views::{ListParams, ListView, ProductView};
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/products", get(list))
        .route("/v1/products/{sku}", get(one))
}

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
