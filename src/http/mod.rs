//! The HTTP edge: one router, one state, our own extractors and the contract's error body.
//! A handler extracts, parses into domain types, makes one call into the checkout service or
//! the store, and maps the result (DESIGN §8 is the contract).

mod admin;
mod admin_orders;
mod auth;
mod buyer_prices;
mod carts;
mod catalogue;
mod checkouts;
mod companies;
mod demo;
mod error;
mod extract;
mod flash_sales;
mod health;
mod idempotent;
mod limits;
mod metrics;
mod openapi;
mod ops;
mod orders;
mod server;
mod snapshot;
mod ui;
mod views;
mod webhooks;

use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::checkout::CheckoutService;
use crate::domain::Clock;
use crate::store::Store;

pub use auth::{new_customer_token, token_digest, token_hash};
pub use error::ApiError;
pub use limits::{RateLimit, HEADER_LIMIT};
pub use openapi::ApiDoc;
pub use server::serve;
pub use snapshot::Catalogue;

/// Request bodies above this answer 413.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub checkout: Arc<CheckoutService>,
    pub clock: Arc<dyn Clock>,
    /// SHA-256 of the admin token: the token itself is not kept in memory here.
    pub admin_token_digest: [u8; 32],
    /// A checkout's maximum lifetime (bounds a flash sale's reservation window).
    pub max_lifetime: chrono::Duration,
    /// Customers by token hash: tokens never change, so a known token needs no store call.
    pub customers: Arc<auth::CustomerCache>,
    /// Webhook signing secrets; any of them verifies (rotation).
    pub webhook_secrets: Arc<Vec<secrecy::SecretString>>,
    /// Per-customer budget of the calls that reserve stock or move money.
    pub rate_limit: Arc<RateLimit>,
    /// A request not answered within this gets `408`.
    pub request_timeout: std::time::Duration,
    /// The built-in payment simulator when it is the gateway: the demo routes need it.
    pub simulator: Option<crate::payments::StripeSimulator>,
    /// The public catalogue in memory (`GET /v1/products*`).
    pub catalogue: Arc<Catalogue>,
    /// Company price lists for the catalogue a buyer sees, held for a moment.
    pub company_prices: Arc<buyer_prices::CompanyPrices>,
    /// Redis and NATS as configured, up or down: `/readyz` and the ops page show them.
    pub brokers: crate::brokers::Brokers,
}

/// Responses that failed (5xx, or an error before any answer).
static RESPONSES_FAILED: crate::telemetry::Summarised =
    crate::telemetry::Summarised::new("responses failed (5xx)");

pub fn router(state: AppState) -> Router {
    crate::observe::install();
    let request_id = HeaderName::from_static("x-request-id");
    let timeout = state.request_timeout;
    Router::new()
        .merge(health::router())
        .merge(admin::router())
        .merge(companies::router())
        .merge(admin_orders::router())
        .merge(catalogue::router())
        .merge(carts::router())
        .merge(checkouts::router())
        .merge(orders::router())
        .merge(flash_sales::router())
        .merge(webhooks::router())
        .merge(ops::router())
        .merge(demo::router())
        .merge(metrics::router())
        .merge(openapi::router())
        .merge(ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            reload_catalogue_after_writes,
        ))
        .layer(axum::middleware::from_fn(run_to_completion))
        .with_state(state)
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("a handler panicked").into_response()
        }))
        .layer(axum::middleware::from_fn(limits::reject_oversized))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |e: tower::BoxError| {
                    limits::timed_out(timeout, e)
                }))
                .timeout(timeout),
        )
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            })
            // One line per 5xx would be one line per request at saturation: summarised. The
            // cause of a 500 is logged where it happens (`ApiError::internal`).
            .on_failure(|class: tower_http::classify::ServerErrorsFailureClass, _latency: std::time::Duration, _span: &tracing::Span| {
                RESPONSES_FAILED.warn(&class);
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// A write that may move availability answers once the in-memory catalogue shows it, so a
/// client reads its own writes. Cart edits, heartbeats, tokens and customers leave products
/// alone and skip the wait.
async fn reload_catalogue_after_writes(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    let path = req.uri().path();
    let moves_products = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && !path.starts_with("/v1/carts")
        && !path.ends_with("/heartbeat")
        && !path.ends_with("/tokens")
        && !path.ends_with("/customers");
    let resp = next.run(req).await;
    if moves_products && resp.status().is_success() {
        state.catalogue.changed_and_reloaded().await;
    }
    resp
}

/// A request, once routed and its body read, runs to its end in a task of its own, whether or
/// not its client still waits (it went away, or the request timeout answered `408`). Dropped
/// half-way, a store call could leave its pooled connection inside a transaction nobody ends
/// (sqlx 0.8 does not roll back a `BEGIN` whose round trip was cancelled), and every later
/// statement on that connection would fail; a charge would stay `charging` until recovery took
/// it over. The body is read before, where a client that stops sending can still be given up on
/// (and is bounded there as the extractors bound it: `413 payload_too_large`).
async fn run_to_completion(
    req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(body) => body,
        Err(e) => return body_refused(e).into_response(),
    };
    let req = Request::from_parts(parts, axum::body::Body::from(body));
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => ApiError::internal(format!("a request's task failed: {e}")).into_response(),
    }
}

fn body_refused(e: axum::Error) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cause {
        if err.is::<http_body_util::LengthLimitError>() {
            return limits::payload_too_large();
        }
        cause = err.source();
    }
    ApiError::bad_request("bad_request", format!("the body could not be read: {e}"))
}

async fn not_found() -> Response {
    ApiError::not_found("route_not_found", "no such route").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
    .into_response()
}
