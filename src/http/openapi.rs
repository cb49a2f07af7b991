//! `GET /openapi.json`: the OpenAPI 3 document of every route, generated from the handlers'
//! `#[utoipa::path]` attributes so the document cannot drift from the code (DESIGN §8, §9).
//! A test checks that every route the router serves is in [`ApiDoc`]'s `paths(...)` list and
//! the other way round: a new route without documentation fails the suite.
//!
//! The schemas here describe bodies written by hand elsewhere (the error body of
//! [`ApiError`](super::ApiError), money, lines): documentation only, never built.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{
    admin, admin_orders, carts, catalogue, checkouts, companies, demo, flash_sales, health,
    metrics, ops, orders, ui, webhooks, AppState,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "holdfast",
        description = "A checkout engine that never oversells and never double-charges. \
            Errors are always `{\"error\":{\"code\",\"message\",\"details\"}}`; lists are \
            `{\"data\":[...],\"next_cursor\":...}`; money is integer minor units plus an \
            ISO-4217 currency."
    ),
    paths(
        health::healthz,
        health::readyz,
        admin::create_customer,
        admin::create_product,
        admin::get_product,
        admin::update_product,
        admin::inventory,
        companies::create,
        companies::one,
        companies::set_price,
        companies::prices,
        companies::invoice,
        companies::pay_invoice,
        admin_orders::refund,
        admin_orders::ship,
        admin_orders::refund_lines,
        flash_sales::open,
        flash_sales::figures,
        flash_sales::take_token,
        flash_sales::current,
        ops::ops,
        catalogue::list,
        catalogue::one,
        carts::create,
        carts::one,
        carts::set_line,
        carts::remove_line,
        checkouts::start,
        checkouts::one,
        checkouts::heartbeat,
        checkouts::cancel,
        checkouts::complete,
        orders::list,
        orders::one,
        webhooks::stripe,
        demo::create_customer,
        demo::authenticate,
        metrics::metrics,
        openapi_json,
        ui::storefront,
        ui::ops_page,
        ui::asset,
    ),
    components(schemas(ErrorBody, ErrorDetail, MoneySchema)),
    modifiers(&BearerTokens, &EdgeErrors),
    tags(
        (name = "catalogue", description = "What anyone may see"),
        (name = "carts", description = "A customer's own carts"),
        (name = "checkouts", description = "Reserve, heartbeat, pay, cancel (the saga, DESIGN §3)"),
        (name = "orders", description = "A customer's own orders"),
        (name = "admin", description = "The admin token's routes"),
        (name = "webhooks", description = "Signed Stripe events"),
        (name = "demo", description = "Only with the built-in payment simulator"),
        (name = "operations", description = "Health, metrics, this document"),
        (name = "pages", description = "The storefront and the operations page"),
    )
)]
pub struct ApiDoc;

/// The two bearer schemes of DESIGN §8: the admin token and a customer's token.
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "admin_token",
                "The admin token (`--admin-token`, or `<data-dir>/admin-token`)",
            ),
            (
                "customer_token",
                "A customer's token, from `POST /v1/admin/customers`",
            ),
        ] {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(what.to_owned());
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

/// Answers the edge gives on any route, before a handler runs (`AppJson`, `AppQuery`, the body
/// limit): every operation with a body can meet 400, 413, 415 and 422, and every operation with a
/// query 400 and 422. Added here once rather than repeated in each handler's attribute, so a new
/// route is documented truthfully without remembering to list them.
struct EdgeErrors;

impl EdgeErrors {
    const BODY: [(&'static str, &'static str); 4] = [
        ("400", "`invalid_json`: the body is not JSON"),
        (
            "422",
            "`validation_failed`: an unknown field, a missing one, or a wrong type",
        ),
        ("413", "`payload_too_large`: the body is over 64 KiB"),
        (
            "415",
            "`unsupported_media_type`: the body is not `application/json`",
        ),
    ];
    const QUERY: [(&'static str, &'static str); 2] = [
        ("400", "`invalid_query`, `invalid_cursor`"),
        ("422", "`validation_failed`: `limit` outside 1..=500"),
    ];
}

impl Modify for EdgeErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let has_query = operation
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Query));
                let mut answers = Vec::new();
                if operation.request_body.is_some() {
                    answers.extend(Self::BODY);
                }
                if has_query {
                    answers.extend(Self::QUERY);
                }
                for (status, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

/// The contract's error body.
#[derive(ToSchema)]
#[schema(example = json!({"error": {"code": "insufficient_stock", "message": "not enough stock",
    "details": [{"sku": "tea-01", "requested": 3, "available": 1}]}}))]
#[allow(dead_code)] // documentation only: `ApiError` writes the body
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `insufficient_stock`, `route_not_found`.
    code: String,
    /// For people; may change.
    message: String,
    /// Structured context when the code has some (per-SKU shortfalls, current version).
    details: Option<serde_json::Value>,
}

/// Money: integer minor units and an ISO-4217 currency (promise 6).
#[derive(ToSchema)]
#[schema(as = Money, example = json!({"amount": 450, "currency": "EUR"}))]
#[allow(dead_code)] // documentation only: `domain::Money` is serialised by hand
pub struct MoneySchema {
    /// Minor units (cents), never negative.
    #[schema(minimum = 0)]
    amount: i64,
    #[schema(pattern = "^[A-Z]{3}$")]
    currency: String,
}

/// A cart line.
#[derive(ToSchema)]
#[schema(as = CartLine)]
#[allow(dead_code)] // documentation only
pub struct CartLineSchema {
    sku: String,
    #[schema(minimum = 1, maximum = 10000)]
    quantity: u32,
}

/// An order line, priced from the catalogue when the checkout reserved it.
#[derive(ToSchema)]
#[schema(as = OrderLine)]
#[allow(dead_code)] // documentation only
pub struct OrderLineSchema {
    sku: String,
    quantity: u32,
    unit_price: MoneySchema,
    line_total: MoneySchema,
}

/// A new customer: the token is shown once.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CustomerCreated {
    id: String,
    name: String,
    /// The customer's bearer token.
    token: String,
    /// The company the customer buys for, if any.
    company_id: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct Health {
    /// `ok`
    status: String,
}

#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct Readiness {
    /// `ready`, or `degraded` while a configured broker (Redis, NATS) is down: holdfast
    /// still serves everything that does not need it.
    status: String,
    /// `postgres` or `sqlite`
    store: String,
    /// Each configured broker by name (`redis`, `nats`): `{"status": "up" | "down"}`.
    #[schema(value_type = Object)]
    dependencies: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct WebhookReceived {
    received: bool,
    /// Present and `true` when this event id was handled before.
    duplicate: Option<bool>,
}

/// How a flash sale stands at the gate.
#[derive(ToSchema)]
#[schema(as = GateFigures)]
#[allow(dead_code)] // documentation only: `flash_sale::GateFigures` is the real one
pub struct GateFiguresSchema {
    /// Customers holding a live admission token.
    holders: u32,
    /// Units those holders hold (their checkouts' units of the sale's SKU).
    held: u32,
    /// Units paid for (refunds given back).
    sold: u32,
}

/// The document as JSON, built once: it depends on the code only.
fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the generated document serialises")
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}
