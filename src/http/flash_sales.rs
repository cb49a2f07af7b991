//! Flash sales (DESIGN §5): the admin opens a sale; buyers take an admission token; only token
//! holders reach the database. A token request for a known sale from a customer this instance
//! has seen before touches no store at all: the sale and the customer are cached, and the gate
//! answers alone (a customer's very first request looks their token up once).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{FlashSale, FlashSaleId, NewFlashSale, Sku};
use crate::flash_sale::GateFigures;

use super::auth::{Admin, CustomerAuth};
use super::extract::{AppJson, OptionalJson, Path};
use super::openapi::{ErrorBody, GateFiguresSchema};
use super::views::rfc3339;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/flash-sales", post(open))
        .route("/v1/admin/flash-sales/{id}", get(figures))
        .route("/v1/flash-sales", get(current))
        .route("/v1/flash-sales/{id}/tokens", post(take_token))
}

/// Reservation window of a sale when the admin gives none (DESIGN §5: 5 min instead of 15).
const DEFAULT_SALE_TTL_SECONDS: i64 = 300;
const MAX_UNITS: u32 = 1_000_000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OpenSale {
    #[schema(value_type = String)]
    sku: Sku,
    #[schema(minimum = 1, maximum = 1000000)]
    units: i64,
    /// Units one buyer may buy over the whole sale; 1 when absent, never above `units`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000000)]
    max_per_buyer: Option<i64>,
    #[serde(default)]
    starts_at: Option<DateTime<Utc>>,
    #[serde(default)]
    ends_at: Option<DateTime<Utc>>,
    #[serde(default)]
    reservation_ttl_seconds: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct SaleView {
    #[schema(value_type = String)]
    id: FlashSaleId,
    #[schema(value_type = String)]
    sku: Sku,
    units: u32,
    max_per_buyer: u32,
    #[serde(serialize_with = "rfc3339")]
    starts_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    ends_at: Option<DateTime<Utc>>,
    reservation_ttl_seconds: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<GateFiguresSchema>)]
    figures: Option<GateFigures>,
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

impl SaleView {
    fn of(sale: FlashSale, figures: Option<GateFigures>) -> Self {
        Self {
            id: sale.id,
            sku: sale.sku,
            units: sale.units,
            max_per_buyer: sale.max_per_buyer,
            starts_at: sale.starts_at,
            ends_at: sale.ends_at,
            reservation_ttl_seconds: sale.reservation_ttl.num_seconds(),
            figures,
        }
    }
}

/// Opens a sale of `units` of one SKU behind the admission gate.
#[utoipa::path(
    post,
    operation_id = "open_flash_sale",
    path = "/v1/admin/flash-sales",
    tag = "admin",
    security(("admin_token" = [])),
    request_body = OpenSale,
    responses(
        (status = 201, body = SaleView),
        (status = 404, body = ErrorBody, description = "`product_not_found`"),
        (status = 409, body = ErrorBody, description = "`units_exceed_available`"),
        (status = 422, body = ErrorBody, description = "invalid units, window or times"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn open(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<OpenSale>,
) -> Result<(StatusCode, Json<SaleView>), ApiError> {
    let units = u32::try_from(body.units)
        .ok()
        .filter(|u| (1..=MAX_UNITS).contains(u))
        .ok_or_else(|| ApiError::validation(format!("units must be between 1 and {MAX_UNITS}")))?;
    let max_per_buyer = u32::try_from(body.max_per_buyer.unwrap_or(1))
        .ok()
        .filter(|m| (1..=units).contains(m))
        .ok_or_else(|| {
            ApiError::validation(format!(
                "max_per_buyer must be between 1 and units ({units})"
            ))
        })?;
    let ttl = body
        .reservation_ttl_seconds
        .unwrap_or(DEFAULT_SALE_TTL_SECONDS);
    if !(1..=state.max_lifetime.num_seconds()).contains(&ttl) {
        return Err(ApiError::validation(format!(
            "reservation_ttl_seconds must be between 1 and {}",
            state.max_lifetime.num_seconds()
        )));
    }
    let starts_at = body.starts_at.unwrap_or_else(|| state.clock.now());
    if body.ends_at.is_some_and(|end| end <= starts_at) {
        return Err(ApiError::validation("ends_at must be after starts_at"));
    }
    let new = NewFlashSale {
        id: FlashSaleId::new(),
        sku: body.sku,
        units,
        max_per_buyer,
        starts_at,
        ends_at: body.ends_at,
        reservation_ttl: Duration::seconds(ttl),
    };
    let sale = state.checkout.open_sale(&new).await?;
    Ok((StatusCode::CREATED, Json(SaleView::of(sale, None))))
}

fn parse_sale_id(raw: &str) -> Result<FlashSaleId, ApiError> {
    FlashSaleId::parse(raw).map_err(|_| not_found_of("flash sale"))
}

/// A sale with its live figures: token holders and units sold.
#[utoipa::path(
    get,
    operation_id = "get_flash_sale",
    path = "/v1/admin/flash-sales/{id}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = SaleView),
        (status = 404, body = ErrorBody, description = "`flash_sale_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn figures(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SaleView>, ApiError> {
    let sale = state
        .checkout
        .sale(parse_sale_id(&id)?)
        .await?
        .ok_or_else(|| not_found_of("flash sale"))?;
    let figures = state.checkout.sale_figures(sale.id).await?;
    Ok(Json(SaleView::of(sale, Some(figures))))
}

/// The sales open now or planned, for the storefront: `{data, next_cursor}` (never more than
/// a few at a time, so one page).
#[utoipa::path(
    get,
    operation_id = "list_flash_sales",
    path = "/v1/flash-sales",
    tag = "catalogue",
    responses((status = 200, body = SaleList))
)]
async fn current(State(state): State<AppState>) -> Result<Json<SaleList>, ApiError> {
    let sales = state.store.current_flash_sales(state.clock.now()).await?;
    Ok(Json(SaleList {
        data: sales
            .into_iter()
            .map(|sale| SaleView::of(sale, None))
            .collect(),
        next_cursor: None,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
struct SaleList {
    data: Vec<SaleView>,
    next_cursor: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

#[derive(Serialize, ToSchema)]
struct TokenView {
    token: String,
    #[schema(value_type = String)]
    sale_id: FlashSaleId,
    #[serde(serialize_with = "rfc3339")]
    expires_at: DateTime<Utc>,
}

/// `201` for a first grant, `200` with the same token for a holder asking again, `409
/// sold_out` (or `sale_not_started` / `sale_ended`) for everyone else.
#[utoipa::path(
    post,
    operation_id = "take_flash_sale_token",
    path = "/v1/flash-sales/{id}/tokens",
    tag = "checkouts",
    security(("customer_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 429, body = ErrorBody, description = "`rate_limited`: over the per-customer budget; `Retry-After` says when to come back"),
        (status = 201, body = TokenView, description = "a first grant"),
        (status = 200, body = TokenView, description = "the same token again, for a holder"),
        (status = 404, body = ErrorBody, description = "`flash_sale_not_found`"),
        (status = 409, body = ErrorBody, description = "`sold_out`, `sale_not_started`, `sale_ended`"),
        (status = 503, body = ErrorBody, description = "`admission_unavailable`: the gate fails closed"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
    )
)]
async fn take_token(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Response, ApiError> {
    let id = parse_sale_id(&id)?;
    // The per-customer budget, as `RateLimited` takes it, before anything else. For a sale
    // this instance knows, a gate that keeps the shared budgets takes it in the admission's
    // own call: a refused buyer costs that one call and nothing else.
    let cached = state.checkout.cached_sale(id);
    let budget = if cached.is_some() && state.checkout.gate_keeps_budgets() {
        state.rate_limit.budget_for_gate(customer.id)?
    } else {
        state.rate_limit.check(customer.id).await?;
        None
    };
    let sale = match cached {
        Some(sale) => sale,
        None => state
            .checkout
            .sale(id)
            .await?
            .ok_or_else(|| not_found_of("flash sale"))?,
    };
    let admission = state
        .checkout
        .take_token(customer.id, &sale, budget.as_ref())
        .await?;
    let status = if admission.newly_granted {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = TokenView {
        token: admission.token,
        sale_id: sale.id,
        expires_at: admission.expires_at,
    };
    Ok((status, Json(view)).into_response())
}
