//! `GET /v1/admin/ops`: one read for the operations page (DESIGN §9): checkouts by state,
//! orders by status, outbox lag, the last failures and compensations, the flash sales, orders
//! on hold for a dispute and authorizations near their end.
//! Admin only; the page itself (`/ops`) holds no data and asks for the token.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::Money;
use crate::store::{FailureRow, FlashSaleRow};

use super::auth::Admin;
use super::openapi::{ErrorBody, MoneySchema};
use super::views::rfc3339;
use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/ops", get(ops))
}

/// How many failures the page lists: enough to see a pattern, few enough to read.
const RECENT_FAILURES: u32 = 20;
const FLASH_SALES: u32 = 20;
/// How many disputed orders and ending authorizations the page lists.
const ORDERS_LISTED: u32 = 50;

#[derive(Serialize, ToSchema)]
pub(super) struct OpsView {
    /// Count per checkout state, e.g. `{"reserved": 3, "completed": 10}`.
    checkouts_by_state: BTreeMap<String, i64>,
    /// Count per order status.
    orders_by_status: BTreeMap<String, i64>,
    outbox: OutboxView,
    /// Newest first.
    recent_failures: Vec<FailureView>,
    /// Newest first.
    flash_sales: Vec<FlashSaleView>,
    /// The configured brokers (`redis`, `nats`), up or down; empty in the embedded shape.
    dependencies: Vec<DependencyView>,
    /// Open invoices past their due date, the longest overdue first: their companies buy on
    /// account again once they are paid.
    overdue_invoices: Vec<OverdueInvoiceView>,
    /// Orders on hold for a dispute (their fulfilment stopped), most recent first.
    disputed_orders: Vec<String>,
    /// Manual capture: orders whose authorization the worker settles within a day (ship what
    /// can ship before then), oldest first.
    authorizations_ending: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct OverdueInvoiceView {
    id: String,
    number: i64,
    company_id: String,
    order_id: String,
    /// What is still owed.
    #[schema(value_type = MoneySchema)]
    balance: Money,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    due_at: DateTime<Utc>,
}

/// How many overdue invoices the page lists.
const OVERDUE_INVOICES: u32 = 50;

#[derive(Serialize, ToSchema)]
struct DependencyView {
    /// `redis` or `nats`.
    name: &'static str,
    /// `up` or `down`: down, holdfast serves degraded (flash sales answer 503, events wait in
    /// the outbox) and reconnects by itself.
    status: &'static str,
    /// The last failure, while down.
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct OutboxView {
    unpublished: i64,
    /// `null` when every event is published.
    oldest_unpublished_age_seconds: Option<f64>,
}

#[derive(Serialize, ToSchema)]
struct FailureView {
    checkout_id: String,
    order_id: String,
    /// `payment_failed`, `cancelled`, `expired` or `refunded`; `completed` for a paid order
    /// whose refund is pending or failed.
    state: &'static str,
    #[schema(value_type = MoneySchema)]
    total: Money,
    decline_code: Option<String>,
    payment_intent_id: Option<String>,
    /// A late payment for units already gone: the money is going back.
    refund_due: bool,
    /// The order's refund at the gateway: `pending`, `failed` (the money did not go back:
    /// the order stays paid for an operator to settle) or `succeeded`; `null` before any.
    refund_status: Option<String>,
    /// The gateway's refund id.
    refund_id: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    at: DateTime<Utc>,
}

impl From<FailureRow> for FailureView {
    fn from(f: FailureRow) -> Self {
        Self {
            checkout_id: f.checkout_id.to_string(),
            order_id: f.order_id.to_string(),
            state: f.state.as_str(),
            total: f.total,
            decline_code: f.decline_code,
            payment_intent_id: f.payment_intent_id,
            refund_due: f.refund_due,
            refund_status: f.refund_status,
            refund_id: f.refund_id,
            at: f.updated_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct FlashSaleView {
    id: String,
    sku: String,
    units: i64,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    starts_at: DateTime<Utc>,
    #[schema(value_type = Option<String>, format = DateTime)]
    ends_at: Option<String>,
    /// Admission tokens held now, as the gate counts them; `null` when the gate cannot be
    /// asked (the page still shows what the database knows).
    tokens_held: Option<u32>,
    /// Live checkouts holding one of the sale's units.
    in_checkout: i64,
    /// Units paid for.
    sold: i64,
}

impl From<FlashSaleRow> for FlashSaleView {
    fn from(f: FlashSaleRow) -> Self {
        Self {
            id: f.id.to_string(),
            sku: f.sku.as_str().to_owned(),
            units: f.units,
            starts_at: f.starts_at,
            ends_at: f
                .ends_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            tokens_held: None,
            in_checkout: f.in_checkout,
            sold: f.sold,
        }
    }
}

/// What an operator needs on one screen.
#[utoipa::path(
    get,
    operation_id = "operations_view",
    path = "/v1/admin/ops",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, body = OpsView),
        (status = 401, body = ErrorBody, description = "no or an unknown token"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn ops(_: Admin, State(state): State<AppState>) -> Result<Json<OpsView>, ApiError> {
    let store = &state.store;
    let lag = store.outbox_lag(state.clock.now()).await?;
    let mut flash_sales = Vec::new();
    for row in store.flash_sale_stats(FLASH_SALES).await? {
        let id = row.id;
        let mut view = FlashSaleView::from(row);
        view.tokens_held = match state.checkout.sale_figures(id).await {
            Ok(figures) => Some(figures.holders),
            Err(e) => {
                tracing::warn!(error = %e, "flash-sale figures unavailable for the ops view");
                None
            }
        };
        flash_sales.push(view);
    }
    let mut overdue_invoices = Vec::new();
    for invoice in store
        .overdue_invoices(state.clock.now(), OVERDUE_INVOICES)
        .await?
    {
        overdue_invoices.push(OverdueInvoiceView {
            balance: Money::new(invoice.balance(), invoice.amount.currency())
                .map_err(crate::store::StoreError::from)?,
            id: invoice.id.to_string(),
            number: invoice.number,
            company_id: invoice.company_id.to_string(),
            order_id: invoice.order_id.to_string(),
            due_at: invoice.due_at,
        });
    }
    Ok(Json(OpsView {
        overdue_invoices,
        checkouts_by_state: store.checkouts_by_state().await?,
        orders_by_status: store.orders_by_status().await?,
        outbox: OutboxView {
            unpublished: lag.unpublished,
            oldest_unpublished_age_seconds: lag
                .oldest_unpublished_age
                .map(|age| age.num_milliseconds() as f64 / 1000.0),
        },
        recent_failures: store
            .recent_failures(RECENT_FAILURES)
            .await?
            .into_iter()
            .map(FailureView::from)
            .collect(),
        flash_sales,
        disputed_orders: store
            .disputed_orders(ORDERS_LISTED)
            .await?
            .into_iter()
            .map(|id| id.to_string())
            .collect(),
        authorizations_ending: state
            .checkout
            .authorizations_ending_within(chrono::Duration::days(1), ORDERS_LISTED)
            .await?
            .into_iter()
            .map(|id| id.to_string())
            .collect(),
        dependencies: state
            .brokers
            .statuses()
            .into_iter()
            .map(|b| DependencyView {
                name: b.name,
                status: b.status,
                error: b.error,
            })
            .collect(),
    }))
}
