//! The one error body of the public contract (DESIGN §8):
//! `{"error":{"code":"snake_case_code","message":"...","details":...}}`. Only this module knows
//! HTTP statuses; a 500 says `internal` and nothing more, the cause is logged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::checkout::CheckoutError;
use crate::store::StoreError;

/// Requests answered 503 because the store could not be reached or its pool stayed full past
/// the acquire deadline.
static STORE_UNAVAILABLE: crate::telemetry::Summarised =
    crate::telemetry::Summarised::new("store unavailable: requests answered 503");

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(details).ok();
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not use this route",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Logs the cause with the request's span (which carries the request id) and answers a
    /// bare `internal`.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Value>,
}

impl ApiError {
    /// The error body as JSON, as it is sent (and stored for idempotent replays).
    pub fn body_json(&self) -> Value {
        serde_json::to_value(Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                details: self.details.as_ref(),
            },
        })
        .unwrap_or(Value::Null)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body_json();
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => not_found_of(what),
            StoreError::InvalidProduct(message) => Self::validation(message),
            StoreError::OnAccountNotAvailable => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "on_account_not_available",
                "only a buyer of a company with net terms in the order's currency buys on account",
            ),
            StoreError::InvoicesOverdue => Self::conflict(
                "invoices_overdue",
                "the company has overdue invoices: no further orders on account",
            ),
            StoreError::CreditLimitExceeded(short) => Self::conflict(
                "credit_limit_exceeded",
                "the order would take the company past its credit limit; nothing was placed",
            )
            .details([short]),
            StoreError::PaymentExceedsBalance { amount, balance } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "payment_exceeds_balance",
                format!("a payment of {amount} exceeds the invoice's open balance of {balance}"),
            )
            .details(serde_json::json!({ "amount": amount, "balance": balance })),
            StoreError::PoNumberRequired => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "po_number_required",
                "this buyer's company requires a po_number on every checkout",
            ),
            StoreError::RulesChanged(broken) => Self::conflict(
                "rules_changed",
                "a line no longer meets its product's ordering rules; nothing was reserved",
            )
            .details(broken),
            StoreError::SkuTaken => Self::conflict("sku_taken", "a product with this sku exists"),
            StoreError::VersionMismatch { current } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                format!("the product changed; its current version is {current}"),
            )
            .details(serde_json::json!({ "current_version": current })),
            StoreError::StockBelowReserved { stock, reserved } => Self::conflict(
                "stock_below_reserved",
                format!("stock {stock} would be below the {reserved} units reserved"),
            )
            .details(serde_json::json!({ "stock": stock, "reserved": reserved })),
            StoreError::InsufficientStock(short) => {
                Self::conflict("insufficient_stock", "not enough stock").details(short)
            }
            StoreError::CartNotOpen(status) => {
                Self::conflict("cart_not_open", format!("the cart is {}", status.as_str()))
            }
            StoreError::CartEmpty => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "cart_empty",
                "the cart has no lines",
            ),
            StoreError::CheckoutExpired => Self::conflict(
                "checkout_expired",
                "the checkout's reservation has expired; start a new checkout",
            ),
            StoreError::CheckoutState(state) => Self::conflict(
                "invalid_state",
                format!("the checkout is {}", state.as_str()),
            ),
            StoreError::ChargeInProgress => Self::conflict(
                "payment_in_progress",
                "a payment for this checkout is in progress; retry shortly",
            ),
            StoreError::OrderState(status) => Self::conflict(
                "invalid_order_state",
                format!("the order is {}", status.as_str()),
            ),
            StoreError::ShipmentInProgress => Self::conflict(
                "shipment_in_progress",
                "a shipment of this order is being captured; retry shortly",
            ),
            StoreError::BadShipment(why) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_shipment", why)
            }
            StoreError::BadRefund(why) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_refund", why)
            }
            StoreError::PriceChanged => Self::conflict(
                "price_changed",
                "a price in the cart changed while checking out; nothing was reserved, try again",
            ),
            StoreError::SaleExists => Self::conflict(
                "flash_sale_exists",
                "a flash sale of this SKU is open or planned; it must end first",
            ),
            StoreError::AdmissionInUse => Self::conflict(
                "admission_in_use",
                "this flash-sale admission already holds a live checkout",
            ),
            StoreError::AdmissionRequired => Self::new(
                StatusCode::FORBIDDEN,
                "admission_required",
                "this cart holds a flash-sale item: take a token and send it as flash_sale_token",
            ),
            StoreError::OneSalePerCheckout => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "one_flash_sale_per_checkout",
                "a checkout may hold items of one flash sale only",
            ),
            StoreError::FlashSaleLimit(limit) => Self::conflict(
                "flash_sale_limit",
                format!(
                    "{} units of {} asked for; this buyer may have {} more in this sale",
                    limit.requested, limit.sku, limit.limit
                ),
            )
            .details([limit]),
            StoreError::UnitsExceedAvailable { units, available } => Self::conflict(
                "units_exceed_available",
                format!("a sale of {units} units exceeds the {available} available"),
            )
            .details(serde_json::json!({ "units": units, "available": available })),
            StoreError::Money(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_amount",
                e.to_string(),
            ),
            StoreError::Unavailable(cause) => {
                // At saturation this is every request: one summary line per interval.
                STORE_UNAVAILABLE.warn(&cause);
                Self::unavailable("the store is unavailable; retry shortly").retry_after(1)
            }
            e @ (StoreError::Corrupt(_)
            | StoreError::SchemaBehind { .. }
            | StoreError::Database(_)) => Self::internal(e),
        }
    }
}

impl From<CheckoutError> for ApiError {
    fn from(e: CheckoutError) -> Self {
        match e {
            CheckoutError::Store(e) => e.into(),
            CheckoutError::BadPaymentMethod => Self::validation(e.to_string()),
            CheckoutError::PaymentMethodRefused { code, message } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "payment_method_refused",
                message,
            )
            .details(serde_json::json!({ "gateway_code": code })),
            CheckoutError::AmountTooSmall { total, minimum } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "amount_too_small",
                format!(
                    "the total {total} is below the payment provider's minimum charge of {minimum}"
                ),
            )
            .details(serde_json::json!({ "total": total, "minimum": minimum })),
            CheckoutError::Gateway(message) => {
                Self::new(StatusCode::BAD_GATEWAY, "payment_gateway_error", message)
            }
            CheckoutError::Gate(gate) => gate.into(),
        }
    }
}

impl From<crate::flash_sale::GateError> for ApiError {
    fn from(e: crate::flash_sale::GateError) -> Self {
        use crate::flash_sale::GateError;
        match e {
            GateError::SoldOut => Self::conflict("sold_out", "the sale is sold out"),
            GateError::NotStarted => Self::conflict("sale_not_started", "the sale has not started"),
            GateError::Ended => Self::conflict("sale_ended", "the sale has ended"),
            GateError::NotLoaded => {
                // Fail closed until the sale is loaded from the database.
                tracing::warn!("flash sale not loaded into the gate yet");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "admission_unavailable",
                    "admission is unavailable; retry shortly",
                )
                .retry_after(1)
            }
            GateError::RateLimited(wait_ms) => {
                super::limits::rate_limited(std::time::Duration::from_millis(wait_ms))
            }
            GateError::Unavailable(cause) => {
                // Fail closed: nobody is admitted while the gate cannot be asked.
                tracing::error!(error = %cause, "admission gate unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "admission_unavailable",
                    "admission is unavailable; retry shortly",
                )
                .retry_after(1)
            }
        }
    }
}

pub fn not_found_of(what: &str) -> ApiError {
    let code = match what {
        "cart" => "cart_not_found",
        "product" => "product_not_found",
        "checkout" => "checkout_not_found",
        "order" => "order_not_found",
        "customer" => "customer_not_found",
        "flash sale" => "flash_sale_not_found",
        "company" => "company_not_found",
        "invoice" => "invoice_not_found",
        _ => "not_found",
    };
    ApiError::not_found(code, format!("{what} not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saturated_pool_answers_503_with_retry_after() {
        let resp = ApiError::from(StoreError::from(sqlx::Error::PoolTimedOut)).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
