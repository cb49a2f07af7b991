//! The storefront (`/`) and the operations page (`/ops`) (DESIGN §9): plain HTML, CSS and
//! vanilla JavaScript compiled into the binary with `include_str!`, so there is no build step
//! and nothing to deploy beside the service. The pages hold no data of their own; they call
//! the public API exactly as any client would (the storefront with a customer token in
//! `localStorage`, the operations page with the admin token in `sessionStorage`).
//!
//! Scripts and styles are separate files served from `/ui/{file}`, never inline, so the
//! pages can carry a `Content-Security-Policy` that refuses every script but our own.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::openapi::ErrorBody;
use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(storefront))
        .route("/ops", get(ops_page))
        .route("/ui/{file}", get(asset))
}

const SHOP_HTML: &str = include_str!("shop.html");
const OPS_HTML: &str = include_str!("ops.html");

/// Every file the pages load, by the name they use.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("style.css"),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("common.js"),
    ),
    (
        "shop.js",
        "text/javascript; charset=utf-8",
        include_str!("shop.js"),
    ),
    (
        "ops.js",
        "text/javascript; charset=utf-8",
        include_str!("ops.js"),
    ),
];

/// Only our own files, and API calls to this origin; no framing (clickjacking).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn page(html: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Pages change with the binary; a stale cached page would call routes that moved.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The storefront: catalogue, cart, checkout with its reservation countdown, payment, order.
#[utoipa::path(
    get,
    operation_id = "storefront_page",
    path = "/",
    tag = "pages",
    responses((status = 200, description = "The storefront page", content_type = "text/html"))
)]
async fn storefront() -> Response {
    page(SHOP_HTML)
}

/// The operations page; it asks for the admin token and reads `/v1/admin/*` with it.
#[utoipa::path(
    get,
    operation_id = "operations_page",
    path = "/ops",
    tag = "pages",
    responses((status = 200, description = "The operations page", content_type = "text/html"))
)]
async fn ops_page() -> Response {
    page(OPS_HTML)
}

/// A script or style sheet of the pages.
#[utoipa::path(
    get,
    operation_id = "page_asset",
    path = "/ui/{file}",
    tag = "pages",
    params(("file" = String, Path, description = "`style.css`, `common.js`, `shop.js` or `ops.js`")),
    responses(
        (status = 200, description = "The file", content_type = "text/javascript"),
        (status = 404, body = ErrorBody, description = "no such file"),
    )
)]
async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::not_found("not_found", "no such file"))?;
    let mut response = ([(header::CONTENT_TYPE, *content_type)], *body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
