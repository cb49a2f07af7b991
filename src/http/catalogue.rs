//! The public catalogue: what anyone may see of a product, including live availability.
//! Answered from the in-memory snapshot (`snapshot.rs`) with an `ETag`; a matching
//! `If-None-Match` answers `304` with no body. A company's buyer (their token given) is answered
//! the prices they would pay (`buyer_prices.rs`), without an `ETag`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::Path;
use axum::routing::get;
use axum::{Json, Router};

use super::admin::{parse_cursor_sku, parse_sku};
use super::auth::MaybeCustomer;
use super::buyer_prices::for_buyer;
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
        (status = 200, body = ListView<ProductView>, description = "with an `ETag`"),
        (status = 304, description = "`If-None-Match` names the current `ETag`"),
        (status = 400, body = ErrorBody, description = "`invalid_cursor`, `invalid_query`"),
        (status = 422, body = ErrorBody, description = "limit out of range"),
    )
)]
async fn list(
    State(state): State<AppState>,
    MaybeCustomer(buyer): MaybeCustomer,
    headers: HeaderMap,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<Response, ApiError> {
    let after = params.cursor.as_deref().map(parse_cursor_sku).transpose()?;
    let limit = params.limit()?;
    if let Some(prices) = buyer_price_list(&state, buyer.as_ref()).await? {
        let snapshot = state.catalogue.snapshot();
        let page = page_of_views(&state, snapshot.as_deref(), after.as_ref(), limit).await?;
        return Ok(Json(ListView {
            data: page.data.iter().map(|v| for_buyer(v, &prices)).collect(),
            next_cursor: page.next_cursor,
        })
        .into_response());
    }
    let Some(snapshot) = state.catalogue.snapshot() else {
        let page = state.store.list_products(after.as_ref(), limit).await?;
        return Ok(Json(ListView {
            data: page.items.iter().map(ProductView::from).collect(),
            next_cursor: page.next,
        })
        .into_response());
    };
    let etag = snapshot.list_etag(params.cursor.as_deref(), limit);
    if not_modified(&headers, &etag) {
        return Ok(unchanged(&etag));
    }
    let start = snapshot.page_start(after.as_ref().map(|s| s.as_str()));
    let end = start
        .saturating_add(limit as usize)
        .min(snapshot.products.len());
    let next_cursor = (end < snapshot.products.len() && end > start)
        .then(|| snapshot.products[end - 1].sku.as_str());
    Ok(tagged(
        &etag,
        json(snapshot.page_body(start, end, next_cursor)),
    ))
}

/// One product.
#[utoipa::path(
    get,
    operation_id = "get_catalogue_product",
    path = "/v1/products/{sku}",
    tag = "catalogue",
    params(("sku" = String, Path)),
    responses(
        (status = 200, body = ProductView, description = "with an `ETag`"),
        (status = 304, description = "`If-None-Match` names the current `ETag`"),
        (status = 404, body = ErrorBody, description = "`product_not_found`"),
    )
)]
async fn one(
    State(state): State<AppState>,
    MaybeCustomer(buyer): MaybeCustomer,
    headers: HeaderMap,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    if let Some(prices) = buyer_price_list(&state, buyer.as_ref()).await? {
        let view = match state.catalogue.snapshot() {
            Some(snapshot) => snapshot
                .find(sku.as_str())
                .map(|at| snapshot.products[at].clone()),
            None => state
                .store
                .product(&sku)
                .await?
                .as_ref()
                .map(ProductView::from),
        }
        .ok_or_else(|| not_found_of("product"))?;
        return Ok(Json(for_buyer(&view, &prices)).into_response());
    }
    let Some(snapshot) = state.catalogue.snapshot() else {
        let product = state
            .store
            .product(&sku)
            .await?
            .ok_or_else(|| not_found_of("product"))?;
        return Ok(Json(ProductView::from(&product)).into_response());
    };
    let at = snapshot
        .find(sku.as_str())
        .ok_or_else(|| not_found_of("product"))?;
    let etag = &snapshot.etags[at];
    if not_modified(&headers, etag) {
        return Ok(unchanged(etag));
    }
    Ok(tagged(etag, json(snapshot.bodies[at].clone())))
}

/// The price list of the buyer's company, if the caller is a company's buyer.
async fn buyer_price_list(
    state: &AppState,
    buyer: Option<&crate::domain::Customer>,
) -> Result<
    Option<std::sync::Arc<std::collections::HashMap<String, crate::domain::CompanyPrice>>>,
    ApiError,
> {
    let Some(company) = buyer.and_then(|b| b.company_id) else {
        return Ok(None);
    };
    Ok(Some(
        state
            .company_prices
            .of(state.store.as_ref(), company)
            .await?,
    ))
}

/// One page of the public views, from the snapshot (or the store before it is loaded).
async fn page_of_views(
    state: &AppState,
    snapshot: Option<&super::snapshot::Snapshot>,
    after: Option<&crate::domain::Sku>,
    limit: u32,
) -> Result<ListView<ProductView>, ApiError> {
    let Some(snapshot) = snapshot else {
        let page = state.store.list_products(after, limit).await?;
        return Ok(ListView {
            data: page.items.iter().map(ProductView::from).collect(),
            next_cursor: page.next,
        });
    };
    let start = snapshot.page_start(after.map(|s| s.as_str()));
    let end = start
        .saturating_add(limit as usize)
        .min(snapshot.products.len());
    let data = &snapshot.products[start..end];
    let next_cursor = (end < snapshot.products.len())
        .then(|| data.last().map(|p| p.sku.to_string()))
        .flatten();
    Ok(ListView {
        data: data.to_vec(),
        next_cursor,
    })
}

/// A JSON body serialised beforehand (the snapshot's bytes).
fn json(body: impl Into<axum::body::Body>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

/// `If-None-Match` holds `etag` (or `*`), by the weak comparison RFC 9110 asks for.
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    let bare = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == bare)
}

fn unchanged(etag: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, value);
    }
    resp
}

fn tagged(etag: &str, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, value);
    }
    resp
}
