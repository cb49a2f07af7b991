//! Flash sales (DESIGN §5): the admin opens a sale; buyers take an admission token; only token
//! holders reach the database. A token request for a known sale touches no store at all: the
//! sale and the customer are cached, and the gate answers alone.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{FlashSale, FlashSaleId, NewFlashSale, Sku};
use crate::flash_sale::GateFigures;

use super::auth::{Admin, CustomerAuth};
use super::extract::{AppJson, OptionalJson};
use super::views::rfc3339;
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/flash-sales", post(open))
        .route("/v1/admin/flash-sales/{id}", get(figures))
        .route("/v1/flash-sales/{id}/tokens", post(take_token))
}

/// Reservation window of a sale when the admin gives none (DESIGN §5: 5 min instead of 15).
const DEFAULT_SALE_TTL_SECONDS: i64 = 300;
const MAX_UNITS: u32 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenSale {
    sku: Sku,
    units: i64,
    #[serde(default)]
    starts_at: Option<DateTime<Utc>>,
    #[serde(default)]
    ends_at: Option<DateTime<Utc>>,
    #[serde(default)]
    reservation_ttl_seconds: Option<i64>,
}

#[derive(Serialize)]
struct SaleView {
    id: FlashSaleId,
    sku: Sku,
    units: u32,
    #[serde(serialize_with = "rfc3339")]
    starts_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    ends_at: Option<DateTime<Utc>>,
    reservation_ttl_seconds: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
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
            starts_at: sale.starts_at,
            ends_at: sale.ends_at,
            reservation_ttl_seconds: sale.reservation_ttl.num_seconds(),
            figures,
        }
    }
}

async fn open(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<OpenSale>,
) -> Result<(StatusCode, Json<SaleView>), ApiError> {
    let units = u32::try_from(body.units)
        .ok()
        .filter(|u| (1..=MAX_UNITS).contains(u))
        .ok_or_else(|| ApiError::validation(format!("units must be between 1 and {MAX_UNITS}")))?;
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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

#[derive(Serialize)]
struct TokenView {
    token: String,
    sale_id: FlashSaleId,
    #[serde(serialize_with = "rfc3339")]
    expires_at: DateTime<Utc>,
}

/// `201` for a first grant, `200` with the same token for a holder asking again, `409
/// sold_out` (or `sale_not_started` / `sale_ended`) for everyone else.
async fn take_token(
    CustomerAuth(customer): CustomerAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalJson(NoBody {}): OptionalJson<NoBody>,
) -> Result<Response, ApiError> {
    let sale = state
        .checkout
        .sale(parse_sale_id(&id)?)
        .await?
        .ok_or_else(|| not_found_of("flash sale"))?;
    let admission = state.checkout.take_token(customer.id, &sale).await?;
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
