//! `GET /metrics` in the Prometheus text format (DESIGN §9), without a token, and the
//! middleware that counts every answered request by its matched route. The route template,
//! not the path, is the label: `/v1/orders/{id}` stays one series however many orders exist.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::observe;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// The Prometheus text exposition format, version 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything counted so far. The outbox gauges are read from the store now, so it is exact at
/// scrape time whichever instance's relay is publishing.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", body = String,
         content_type = "text/plain"),
    )
)]
async fn metrics(State(state): State<AppState>) -> Response {
    match state.store.outbox_lag(state.clock.now()).await {
        Ok(lag) => observe::outbox_lag(lag.unpublished, lag.oldest_unpublished_age),
        // A scrape still answers: the gauge keeps its last value, and the log says why.
        Err(e) => tracing::warn!(error = %e, "cannot read the outbox lag for /metrics"),
    }
    let mut text = observe::render();
    text.push_str(&observe::store_connections(state.store.acquisitions()));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Counts the request once its answer is known. Installed with `Router::layer`, which wraps
/// each route after matching, so [`MatchedPath`] is there; the fallback has none.
pub(super) async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    observe::http_request(
        route.as_deref().unwrap_or("unmatched"),
        method,
        response.status().as_u16(),
    );
    response
}

/// A closed set, so an odd method cannot add series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
