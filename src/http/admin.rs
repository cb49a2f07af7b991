//! Admin routes: customers and their tokens, the catalogue, stock edits with optimistic
//! concurrency (`If-Match` on the product's version), the inventory view.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::domain::{
    CompanyId, CustomerName, Money, NewProduct, OrderingRules, PriceTiers, ProductName,
    ProductPatch, Sku, StockLevel,
};

use super::auth::Admin;
use super::extract::{AppJson, AppQuery, Path};
use super::openapi::{CustomerCreated, ErrorBody, MoneySchema};
use super::views::{AdminProductView, ListParams, ListView};
use super::{error::not_found_of, new_customer_token, token_hash, ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/customers", post(create_customer))
        .route("/v1/admin/products", post(create_product))
        .route(
            "/v1/admin/products/{sku}",
            patch(update_product).get(get_product),
        )
        .route("/v1/admin/inventory", get(inventory))
}

/// The actor recorded with stock changes made through the admin API.
const ADMIN_ACTOR: &str = "admin";

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateCustomer {
    /// 1 to 200 characters.
    #[schema(value_type = String)]
    name: CustomerName,
    /// The company this customer buys for (a buyer sees its prices and orders on its terms).
    #[schema(value_type = Option<String>)]
    company_id: Option<CompanyId>,
}

/// A customer and their bearer token (shown once; only its digest is stored).
#[utoipa::path(
    post,
    operation_id = "create_customer",
    path = "/v1/admin/customers",
    tag = "admin",
    security(("admin_token" = [])),
    request_body = CreateCustomer,
    responses(
        (status = 201, body = CustomerCreated),
        (status = 404, body = ErrorBody, description = "`company_not_found`"),
        (status = 422, body = ErrorBody, description = "invalid name or company id"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn create_customer(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateCustomer>,
) -> Result<Response, ApiError> {
    let token = new_customer_token();
    let customer = state
        .store
        .create_customer_of(&body.name, &token_hash(&token), body.company_id)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": customer.id, "name": customer.name, "token": token,
                    "company_id": customer.company_id}),
        ),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    /// Letters, digits, `-`, `_`, `.`; 1 to 64 characters.
    #[schema(value_type = String)]
    sku: Sku,
    #[schema(value_type = String)]
    name: ProductName,
    #[schema(value_type = MoneySchema)]
    price: Money,
    #[schema(value_type = i64, minimum = 0)]
    stock: StockLevel,
    /// Fewest units a cart line may hold (default 1).
    #[schema(minimum = 1, maximum = 10000)]
    min_quantity: Option<u32>,
    /// A cart line holds a multiple of this: the case pack (default 1).
    #[schema(minimum = 1, maximum = 10000)]
    increment: Option<u32>,
    /// Most units a cart line may hold (default: no maximum).
    #[schema(minimum = 1, maximum = 10000)]
    max_quantity: Option<u32>,
    /// Volume prices `[{min_quantity, amount}]`, ascending; at most 20.
    #[schema(value_type = Option<Vec<super::views::PriceTierSchema>>)]
    price_tiers: Option<PriceTiers>,
}

/// A product in the catalogue; the answer's `ETag` is its version.
#[utoipa::path(
    post,
    operation_id = "create_product",
    path = "/v1/admin/products",
    tag = "admin",
    security(("admin_token" = [])),
    request_body = CreateProduct,
    responses(
        (status = 201, body = AdminProductView, headers(("ETag" = String, description = "the version, quoted"))),
        (status = 409, body = ErrorBody, description = "`sku_taken`"),
        (status = 422, body = ErrorBody, description = "invalid field, ordering rules no quantity can meet, or tiers out of order"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn create_product(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateProduct>,
) -> Result<Response, ApiError> {
    let defaults = OrderingRules::default();
    let rules = OrderingRules::new(
        body.min_quantity.unwrap_or(defaults.min_quantity),
        body.increment.unwrap_or(defaults.increment),
        body.max_quantity,
    )
    .map_err(|e| ApiError::validation(e.to_string()))?;
    let new = NewProduct {
        sku: body.sku,
        name: body.name,
        price: body.price,
        stock: body.stock,
        rules,
        price_tiers: body.price_tiers.unwrap_or_default(),
    };
    let product = state
        .store
        .create_product(&new, ADMIN_ACTOR, state.clock.now())
        .await?;
    Ok(with_etag(
        StatusCode::CREATED,
        product.version,
        AdminProductView::from(&product),
    ))
}

/// One product with its stock, reserved units and version.
#[utoipa::path(
    get,
    path = "/v1/admin/products/{sku}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("sku" = String, Path)),
    responses(
        (status = 200, body = AdminProductView, headers(("ETag" = String, description = "the version, quoted"))),
        (status = 404, body = ErrorBody, description = "`product_not_found`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn get_product(
    _: Admin,
    State(state): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let product = state
        .store
        .product(&sku)
        .await?
        .ok_or_else(|| not_found_of("product"))?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        AdminProductView::from(&product),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchProduct {
    #[schema(value_type = Option<String>)]
    name: Option<ProductName>,
    #[schema(value_type = Option<MoneySchema>)]
    price: Option<Money>,
    /// Never below the units currently reserved.
    #[schema(value_type = Option<i64>, minimum = 0)]
    stock: Option<StockLevel>,
    #[schema(minimum = 1, maximum = 10000)]
    min_quantity: Option<u32>,
    #[schema(minimum = 1, maximum = 10000)]
    increment: Option<u32>,
    /// `null` removes the maximum.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    max_quantity: Option<Option<u32>>,
    /// Replaces the tiers; `[]` removes them.
    #[schema(value_type = Option<Vec<super::views::PriceTierSchema>>)]
    price_tiers: Option<PriceTiers>,
}

/// A field that is present, even as `null` (`Some(None)`), apart from one left out (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Changes name, price or stock if the product is still at the version in `If-Match`.
#[utoipa::path(
    patch,
    path = "/v1/admin/products/{sku}",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("sku" = String, Path),
        ("If-Match" = String, Header, description = "the product's ETag, e.g. `\"7\"`"),
    ),
    request_body = PatchProduct,
    responses(
        (status = 200, body = AdminProductView, headers(("ETag" = String, description = "the new version, quoted"))),
        (status = 400, body = ErrorBody, description = "`invalid_if_match`"),
        (status = 404, body = ErrorBody, description = "`product_not_found`"),
        (status = 409, body = ErrorBody, description = "`stock_below_reserved`"),
        (status = 412, body = ErrorBody, description = "`version_mismatch`"),
        (status = 422, body = ErrorBody, description = "nothing to change, or an invalid field"),
        (status = 428, body = ErrorBody, description = "`precondition_required`: no If-Match"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn update_product(
    _: Admin,
    State(state): State<AppState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<PatchProduct>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let expected = if_match_version(&headers)?;
    let patch = ProductPatch {
        name: body.name,
        price: body.price,
        stock: body.stock,
        min_quantity: body.min_quantity,
        increment: body.increment,
        max_quantity: body.max_quantity,
        price_tiers: body.price_tiers,
    };
    if patch.is_empty() {
        return Err(ApiError::validation(
            "nothing to change: give name, price, stock, ordering rules or price tiers",
        ));
    }
    let product = state
        .store
        .update_product(&sku, expected, &patch, ADMIN_ACTOR, state.clock.now())
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        AdminProductView::from(&product),
    ))
}

/// Stock, reserved and available per SKU, by SKU.
#[utoipa::path(
    get,
    path = "/v1/admin/inventory",
    tag = "admin",
    security(("admin_token" = [])),
    params(ListParams),
    responses(
        (status = 200, body = ListView<AdminProductView>),
        (status = 400, body = ErrorBody, description = "`invalid_cursor`, `invalid_query`"),
        (status = 401, body = ErrorBody, description = "no token, or an unknown one"),
        (status = 403, body = ErrorBody, description = "a customer's token"),
    )
)]
async fn inventory(
    _: Admin,
    State(state): State<AppState>,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<Json<ListView<AdminProductView>>, ApiError> {
    let after = params.cursor.as_deref().map(parse_cursor_sku).transpose()?;
    let page = state
        .store
        .list_products(after.as_ref(), params.limit()?)
        .await?;
    Ok(Json(ListView {
        data: page.items.iter().map(AdminProductView::from).collect(),
        next_cursor: page.next,
    }))
}

pub(super) fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    // A SKU that cannot exist is simply not found.
    Sku::parse(raw).map_err(|_| not_found_of("product"))
}

pub(super) fn parse_cursor_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|_| ApiError::bad_request("invalid_cursor", "the cursor is not valid"))
}

/// `If-Match: "7"` (a bare `7` is accepted too). Missing is 428; unreadable is 400.
fn if_match_version(headers: &HeaderMap) -> Result<i64, ApiError> {
    let raw = headers
        .get(header::IF_MATCH)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::PRECONDITION_REQUIRED,
                "precondition_required",
                "send If-Match with the product's ETag",
            )
        })?
        .to_str()
        .map_err(|_| invalid_if_match())?
        .trim();
    let unquoted = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    unquoted.parse::<i64>().map_err(|_| invalid_if_match())
}

fn invalid_if_match() -> ApiError {
    ApiError::bad_request(
        "invalid_if_match",
        "If-Match must be the product's ETag, e.g. \"7\"",
    )
}

fn with_etag(status: StatusCode, version: i64, body: AdminProductView) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with(if_match: &str) -> Option<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MATCH, HeaderValue::from_str(if_match).ok()?);
        Some(headers)
    }

    #[test]
    fn a_missing_if_match_is_428_and_an_unreadable_one_400() {
        assert_eq!(
            if_match_version(&HeaderMap::new()).map_err(|e| e.code()),
            Err("precondition_required")
        );
        for bad in ["", "\"7", "W/\"7\"", "*", "7.0", "\"\""] {
            let headers = headers_with(bad).expect("a valid header value");
            assert_eq!(
                if_match_version(&headers).map_err(|e| e.code()),
                Err("invalid_if_match"),
                "{bad:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn an_etag_is_read_back_as_its_version(version in proptest::prelude::any::<i64>()) {
            let headers = headers_with(&format!("\"{version}\"")).expect("a valid header value");
            proptest::prop_assert_eq!(if_match_version(&headers).ok(), Some(version));
        }

        /// Any header text: reading it never panics, and anything accepted is a number, bare or
        /// quoted once.
        #[test]
        fn any_if_match_is_read_safely(raw in "[ -~]{0,40}") {
            if let Some(headers) = headers_with(&raw) {
                if let Ok(version) = if_match_version(&headers) {
                    let unquoted = raw.trim().trim_matches('"');
                    proptest::prop_assert_eq!(unquoted.parse::<i64>().ok(), Some(version));
                }
            }
        }
    }
}
