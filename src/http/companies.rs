//! Admin routes of wholesale: companies (currency, payment terms, credit limit) and their price
//! lists. A company's buyers are customers created with its `company_id`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{
    CaptureMethod, Company, CompanyId, CompanyPrice, Currency, CustomerName, Invoice, InvoiceId,
    Money, NewCompany, PaymentTerms, PriceTiers, Sku,
};

use super::admin::parse_sku;
use super::auth::Admin;
use super::extract::{AppJson, Path};
use super::openapi::ErrorBody;
use super::views::{rfc3339, ListView, PriceTierSchema};
use super::{error::not_found_of, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/companies", post(create))
        .route("/v1/admin/companies/{id}", get(one))
        .route("/v1/admin/companies/{id}/prices", get(prices))
        .route("/v1/admin/companies/{id}/prices/{sku}", put(set_price))
        .route("/v1/admin/invoices/{id}", get(invoice))
        .route("/v1/admin/invoices/{id}/payments", post(pay_invoice))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateCompany {
    /// 1 to 200 characters.
    #[schema(value_type = String)]
    name: CustomerName,
    /// ISO 4217, e.g. `EUR`: the currency of its credit limit.
    #[schema(value_type = String)]
    currency: Currency,
    /// `prepaid` (pays by card), `net_15`, `net_30` or `net_60`.
    #[schema(value_type = String)]
    payment_terms: PaymentTerms,
    /// Minor units of `currency` the company may owe on account at once.
    #[schema(minimum = 0)]
    credit_limit: i64,
    /// Every checkout of its buyers must carry a `po_number` (default false).
    #[serde(default)]
    po_number_required: bool,
    /// `automatic` (charged at checkout) or `manual` (authorized at checkout, captured by the
    /// shipments). Left out: its buyers' checkouts follow the shop's `--capture-method`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    capture_method: Option<CaptureMethod>,
}

#[derive(Serialize, ToSchema)]
pub struct CompanyView {
    id: String,
    name: String,
    currency: String,
    /// `prepaid`, `net_15`, `net_30` or `net_60`.
    payment_terms: String,
    /// Minor units of `currency`.
    credit_limit: i64,
    po_number_required: bool,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    /// How its buyers' checkouts are charged now: `automatic` or `manual` (the company's own
    /// setting, or the shop's `--capture-method` when it has none).
    capture_method: String,
    /// `company` when the company sets `capture_method`, `shop` when it follows the shop.
    capture_method_source: &'static str,
}

impl CompanyView {
    /// The company as shown, its capture method resolved against the shop's `shop` setting.
    fn of(c: Company, shop: CaptureMethod) -> Self {
        Self {
            capture_method: c.capture_method.unwrap_or(shop).as_str().to_owned(),
            capture_method_source: if c.capture_method.is_some() {
                "company"
            } else {
                "shop"
            },
            id: c.id.to_string(),
            name: c.name,
            currency: c.currency.as_str().to_owned(),
            payment_terms: c.payment_terms.as_str().to_owned(),
            credit_limit: c.credit_limit,
            po_number_required: c.po_number_required,
            created_at: c.created_at,
        }
    }
}

/// Opens a company; its buyers are created with `POST /v1/admin/customers {name, company_id}`.
#[utoipa::path(
    post,
    operation_id = "create_company",
    path = "/v1/admin/companies",
    tag = "admin",
    security(("admin_token" = [])),
    request_body = CreateCompany,
    responses(
        (status = 201, body = CompanyView),
        (status = 422, body = ErrorBody, description = "invalid name, currency, terms or a negative credit limit"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn create(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateCompany>,
) -> Result<(StatusCode, Json<CompanyView>), ApiError> {
    if body.credit_limit < 0 {
        return Err(ApiError::validation("credit_limit must not be negative"));
    }
    let new = NewCompany {
        name: body.name,
        currency: body.currency,
        payment_terms: body.payment_terms,
        credit_limit: body.credit_limit,
        po_number_required: body.po_number_required,
        capture_method: body.capture_method,
    };
    let company = state.store.create_company(&new, state.clock.now()).await?;
    let shop = state.checkout.shop_capture_method();
    Ok((StatusCode::CREATED, Json(CompanyView::of(company, shop))))
}

fn parse_company_id(raw: &str) -> Result<CompanyId, ApiError> {
    CompanyId::parse(raw).map_err(|_| not_found_of("company"))
}

async fn company_of(state: &AppState, raw: &str) -> Result<Company, ApiError> {
    state
        .store
        .company(parse_company_id(raw)?)
        .await?
        .ok_or_else(|| not_found_of("company"))
}

/// One company.
#[utoipa::path(
    get,
    operation_id = "get_company",
    path = "/v1/admin/companies/{id}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CompanyView),
        (status = 404, body = ErrorBody, description = "`company_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn one(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CompanyView>, ApiError> {
    let shop = state.checkout.shop_capture_method();
    Ok(Json(CompanyView::of(company_of(&state, &id).await?, shop)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetPrice {
    /// A fixed price per unit, minor units of the product's currency.
    #[schema(minimum = 0)]
    amount: Option<i64>,
    /// Or a percentage off the product's price at the line's quantity (0 to 100; the discount
    /// is rounded down to whole minor units).
    #[schema(minimum = 0, maximum = 100)]
    percent_off: Option<u32>,
    /// Volume prices of the company's own, ascending; they win where they apply.
    #[schema(value_type = Option<Vec<PriceTierSchema>>)]
    tiers: Option<PriceTiers>,
}

#[derive(Serialize, ToSchema)]
pub struct CompanyPriceView {
    #[schema(value_type = String)]
    sku: Sku,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent_off: Option<u32>,
    #[schema(value_type = Vec<PriceTierSchema>)]
    tiers: PriceTiers,
}

impl CompanyPriceView {
    fn of(sku: Sku, price: CompanyPrice) -> Self {
        Self {
            sku,
            amount: price.amount,
            percent_off: price.percent_off,
            tiers: price.tiers,
        }
    }
}

/// Sets the company's price of a SKU (`amount` or `percent_off`, optional `tiers`), replacing
/// the one it had. Checkouts started from now on pay it.
#[utoipa::path(
    put,
    operation_id = "set_company_price",
    path = "/v1/admin/companies/{id}/prices/{sku}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path), ("sku" = String, Path)),
    request_body = SetPrice,
    responses(
        (status = 200, body = CompanyPriceView),
        (status = 404, body = ErrorBody, description = "`company_not_found`, `product_not_found`"),
        (status = 422, body = ErrorBody, description = "both or neither of amount and percent_off, or invalid tiers"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn set_price(
    _: Admin,
    State(state): State<AppState>,
    Path((id, sku)): Path<(String, String)>,
    AppJson(body): AppJson<SetPrice>,
) -> Result<Json<CompanyPriceView>, ApiError> {
    let company = parse_company_id(&id)?;
    let sku = parse_sku(&sku)?;
    let price = CompanyPrice::new(
        body.amount,
        body.percent_off,
        body.tiers.unwrap_or_default(),
    )
    .map_err(|e| ApiError::validation(e.to_string()))?;
    state
        .store
        .set_company_price(company, &sku, &price, state.clock.now())
        .await?;
    state.company_prices.forget(company);
    Ok(Json(CompanyPriceView::of(sku, price)))
}

/// The company's price list, by SKU.
#[utoipa::path(
    get,
    operation_id = "list_company_prices",
    path = "/v1/admin/companies/{id}/prices",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = ListView<CompanyPriceView>),
        (status = 404, body = ErrorBody, description = "`company_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn prices(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ListView<CompanyPriceView>>, ApiError> {
    let company = company_of(&state, &id).await?;
    let list: Vec<CompanyPriceView> = state
        .store
        .company_prices(company.id)
        .await?
        .into_iter()
        .map(|(sku, price)| CompanyPriceView::of(sku, price))
        .collect();
    Ok(Json(ListView {
        data: list,
        next_cursor: None,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceView {
    id: String,
    number: i64,
    company_id: String,
    order_id: String,
    #[schema(value_type = super::openapi::MoneySchema)]
    amount: Money,
    #[schema(value_type = super::openapi::MoneySchema)]
    paid: Money,
    /// What is still owed, minor units.
    balance: i64,
    /// `open`, `paid`, or `void` (its order refunded; `paid` keeps what had been paid).
    status: String,
    /// Open past its due date: further orders on account are refused until it is paid.
    overdue: bool,
    #[serde(serialize_with = "rfc3339")]
    due_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
}

impl InvoiceView {
    fn of(invoice: Invoice, now: DateTime<Utc>) -> Self {
        Self {
            overdue: invoice.is_overdue(now),
            balance: invoice.balance(),
            id: invoice.id.to_string(),
            number: invoice.number,
            company_id: invoice.company_id.to_string(),
            order_id: invoice.order_id.to_string(),
            amount: invoice.amount,
            paid: invoice.paid,
            status: invoice.status,
            due_at: invoice.due_at,
            created_at: invoice.created_at,
        }
    }
}

fn parse_invoice_id(raw: &str) -> Result<InvoiceId, ApiError> {
    InvoiceId::parse(raw).map_err(|_| not_found_of("invoice"))
}

/// The invoice of an order placed on account.
#[utoipa::path(
    get,
    operation_id = "get_invoice",
    path = "/v1/admin/invoices/{id}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = InvoiceView),
        (status = 404, body = ErrorBody, description = "`invoice_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn invoice(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<InvoiceView>, ApiError> {
    let invoice = state
        .store
        .invoice(parse_invoice_id(&id)?)
        .await?
        .ok_or_else(|| not_found_of("invoice"))?;
    Ok(Json(InvoiceView::of(invoice, state.clock.now())))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Payment {
    /// Minor units of the invoice's currency, 1 up to its balance.
    #[schema(minimum = 1)]
    amount: i64,
}

/// Records a payment (partial or whole) against an open invoice; the company's credit is given
/// back by the amount, and an invoice paid in full marks its order `paid`.
#[utoipa::path(
    post,
    operation_id = "pay_invoice",
    path = "/v1/admin/invoices/{id}/payments",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path)),
    request_body = Payment,
    responses(
        (status = 200, body = InvoiceView),
        (status = 404, body = ErrorBody, description = "`invoice_not_found`"),
        (status = 422, body = ErrorBody, description = "`payment_exceeds_balance` (also any payment of a paid invoice), or an amount below 1"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn pay_invoice(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AppJson(body): AppJson<Payment>,
) -> Result<Json<InvoiceView>, ApiError> {
    let id = parse_invoice_id(&id)?;
    if body.amount < 1 {
        return Err(ApiError::validation("amount must be at least 1"));
    }
    let now = state.clock.now();
    let invoice = state
        .store
        .record_invoice_payment(id, body.amount, now)
        .await?;
    Ok(Json(InvoiceView::of(invoice, now)))
}
