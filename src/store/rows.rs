//! Turning rows into domain types. Both stores select the same column names, so one macro
//! writes the decoders for each row type; stored text that no longer parses is reported as
//! `StoreError::Corrupt` rather than trusted.

use crate::domain::{CompanyPrice, Currency, Money, OrderingRules, PriceTiers, Quantity, Sku};

use super::StoreError;

pub(super) fn sku(raw: &str) -> Result<Sku, StoreError> {
    Sku::parse(raw).map_err(|_| StoreError::Corrupt(format!("sku {raw:?}")))
}

pub(super) fn money(amount: i64, currency: &str) -> Result<Money, StoreError> {
    let currency = Currency::parse(currency)
        .map_err(|_| StoreError::Corrupt(format!("currency {currency:?}")))?;
    Ok(Money::new(amount, currency)?)
}

pub(super) fn quantity(raw: i64) -> Result<Quantity, StoreError> {
    Quantity::new(raw).map_err(|_| StoreError::Corrupt(format!("quantity {raw}")))
}

/// Stored ordering rules.
pub(super) fn rules(
    min: i64,
    increment: i64,
    max: Option<i64>,
) -> Result<OrderingRules, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("ordering rules {min}/{increment}/{max:?}"));
    let n = |v: i64| u32::try_from(v).map_err(|_| corrupt());
    OrderingRules::new(n(min)?, n(increment)?, max.map(n).transpose()?).map_err(|_| corrupt())
}

/// Stored price tiers (a JSON array).
pub(super) fn tiers(raw: &str) -> Result<PriceTiers, StoreError> {
    PriceTiers::from_json(raw).map_err(|e| StoreError::Corrupt(format!("price tiers: {e}")))
}

/// A stored company price: `None` when the row is absent (a LEFT JOIN found nothing).
pub(super) fn company_price(
    amount: Option<i64>,
    percent_off: Option<i64>,
    raw_tiers: Option<&str>,
) -> Result<Option<CompanyPrice>, StoreError> {
    if amount.is_none() && percent_off.is_none() {
        return Ok(None);
    }
    let percent_off = percent_off
        .map(|p| u32::try_from(p).map_err(|_| StoreError::Corrupt(format!("percent_off {p}"))))
        .transpose()?;
    let tiers = tiers(raw_tiers.unwrap_or("[]"))?;
    CompanyPrice::new(amount, percent_off, tiers)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("company price: {e}")))
}

/// A stored count of units (`what` names it in the error).
pub(super) fn units(raw: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(raw).map_err(|_| StoreError::Corrupt(format!("{what} {raw}")))
}

macro_rules! row_decoders {
    ($row:ty) => {
        use sqlx::Row as _;

        use crate::domain::{
            Cart, CartId, CartLine, CartStatus, Checkout, CheckoutId, CheckoutState, Customer,
            CustomerId, Order, OrderId, OrderLine, OrderStatus, Product,
        };
        use crate::store::rows::{company_price, money, quantity, rules, sku, tiers, units};
        use crate::store::{from_millis, StoreError};

        pub(super) fn customer(row: &$row) -> Result<Customer, StoreError> {
            Ok(Customer {
                id: CustomerId::from_uuid(row.try_get("id")?),
                name: row.try_get("name")?,
                company_id: row
                    .try_get::<Option<uuid::Uuid>, _>("company_id")?
                    .map(crate::domain::CompanyId::from_uuid),
            })
        }

        pub(super) fn company(row: &$row) -> Result<crate::domain::Company, StoreError> {
            let terms: String = row.try_get("payment_terms")?;
            let currency: String = row.try_get("currency")?;
            Ok(crate::domain::Company {
                id: crate::domain::CompanyId::from_uuid(row.try_get("id")?),
                name: row.try_get("name")?,
                currency: crate::domain::Currency::parse(&currency)
                    .map_err(|_| StoreError::Corrupt(format!("currency {currency:?}")))?,
                payment_terms: crate::domain::PaymentTerms::parse(&terms)
                    .ok_or_else(|| StoreError::Corrupt(format!("payment terms {terms:?}")))?,
                credit_limit: row.try_get("credit_limit")?,
                po_number_required: row.try_get("po_number_required")?,
                created_at: from_millis(row.try_get("created_at")?)?,
                capture_method: row
                    .try_get::<Option<String>, _>("capture_method")?
                    .map(|m| {
                        crate::domain::CaptureMethod::parse(&m)
                            .ok_or_else(|| StoreError::Corrupt(format!("capture method {m:?}")))
                    })
                    .transpose()?,
            })
        }

        /// `(sku, price)` of a company's price list.
        pub(super) fn company_price_row(
            row: &$row,
        ) -> Result<(crate::domain::Sku, crate::domain::CompanyPrice), StoreError> {
            let tiers: String = row.try_get("tiers")?;
            let price = company_price(
                row.try_get("amount")?,
                row.try_get("percent_off")?,
                Some(&tiers),
            )?
            .ok_or_else(|| StoreError::Corrupt("a company price without a price".into()))?;
            Ok((sku(row.try_get("sku")?)?, price))
        }

        pub(super) fn product(row: &$row) -> Result<Product, StoreError> {
            Ok(Product {
                id: row.try_get("id")?,
                sku: sku(row.try_get("sku")?)?,
                name: row.try_get("name")?,
                price: money(row.try_get("price_amount")?, row.try_get("currency")?)?,
                stock: row.try_get("stock")?,
                reserved: row.try_get("reserved")?,
                version: row.try_get("version")?,
                rules: rules(
                    row.try_get("min_quantity")?,
                    row.try_get("increment")?,
                    row.try_get("max_quantity")?,
                )?,
                price_tiers: tiers(row.try_get("price_tiers")?)?,
            })
        }

        pub(super) fn checkout(row: &$row) -> Result<Checkout, StoreError> {
            let state: String = row.try_get("state")?;
            Ok(Checkout {
                id: CheckoutId::from_uuid(row.try_get("id")?),
                customer_id: CustomerId::from_uuid(row.try_get("customer_id")?),
                cart_id: CartId::from_uuid(row.try_get("cart_id")?),
                order_id: OrderId::from_uuid(row.try_get("order_id")?),
                state: CheckoutState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("checkout state {state:?}")))?,
                total: money(row.try_get("total_amount")?, row.try_get("currency")?)?,
                expires_at: from_millis(row.try_get("expires_at")?)?,
                max_expires_at: from_millis(row.try_get("max_expires_at")?)?,
                created_at: from_millis(row.try_get("created_at")?)?,
                attempt: row.try_get("attempt")?,
                payment_intent_id: row.try_get("payment_intent_id")?,
                client_secret: row.try_get("client_secret")?,
                decline_code: row.try_get("decline_code")?,
                refund_due: row.try_get("refund_due")?,
                flash_sale_id: row
                    .try_get::<Option<uuid::Uuid>, _>("flash_sale_id")?
                    .map(crate::domain::FlashSaleId::from_uuid),
                flash_sale_units: units(row.try_get("flash_sale_units")?, "sale units")?,
            })
        }

        pub(super) fn ticket(row: &$row) -> Result<crate::store::ChargeTicket, StoreError> {
            Ok(crate::store::ChargeTicket {
                checkout: checkout(row)?,
                payment_method: row
                    .try_get::<Option<String>, _>("payment_method")?
                    .unwrap_or_default(),
                refund_due: row.try_get("refund_due")?,
                charge_started_at: row
                    .try_get::<Option<i64>, _>("charge_started_at")?
                    .map(from_millis)
                    .transpose()?,
                // The phase that opens an attempt says so; any other claim may follow a
                // request that already went out.
                opens_attempt: false,
            })
        }

        pub(super) fn sale_checkout(row: &$row) -> Result<crate::store::SaleCheckout, StoreError> {
            let state: String = row.try_get("state")?;
            Ok(crate::store::SaleCheckout {
                id: CheckoutId::from_uuid(row.try_get("id")?),
                customer_id: CustomerId::from_uuid(row.try_get("customer_id")?),
                state: CheckoutState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("checkout state {state:?}")))?,
                units: units(row.try_get("flash_sale_units")?, "sale units")?,
                max_expires_at: from_millis(row.try_get("max_expires_at")?)?,
            })
        }

        pub(super) fn flash_sale(row: &$row) -> Result<crate::domain::FlashSale, StoreError> {
            Ok(crate::domain::FlashSale {
                id: crate::domain::FlashSaleId::from_uuid(row.try_get("id")?),
                sku: sku(row.try_get("sku")?)?,
                units: units(row.try_get("units")?, "sale units")?,
                max_per_buyer: units(row.try_get("max_per_buyer")?, "per-buyer limit")?,
                starts_at: from_millis(row.try_get("starts_at")?)?,
                ends_at: row
                    .try_get::<Option<i64>, _>("ends_at")?
                    .map(from_millis)
                    .transpose()?,
                reservation_ttl: chrono::Duration::milliseconds(row.try_get("reservation_ttl_ms")?),
            })
        }

        pub(super) fn checkout_audit(
            row: &$row,
        ) -> Result<crate::store::CheckoutAuditRow, StoreError> {
            let state: String = row.try_get("state")?;
            let order: String = row.try_get("order_status")?;
            Ok(crate::store::CheckoutAuditRow {
                id: CheckoutId::from_uuid(row.try_get("id")?),
                state: CheckoutState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("checkout state {state:?}")))?,
                order_status: OrderStatus::parse(&order)
                    .ok_or_else(|| StoreError::Corrupt(format!("order status {order:?}")))?,
                refund_due: row.try_get("refund_due")?,
                expires_at: from_millis(row.try_get("expires_at")?)?,
                lease_until: row
                    .try_get::<Option<i64>, _>("lease_until")?
                    .map(from_millis)
                    .transpose()?,
                refund_id: row.try_get("refund_id")?,
                refund_status: row.try_get("refund_status")?,
                paid_events: row.try_get("paid_events")?,
                unpublished_events: row.try_get("unpublished_events")?,
                oldest_unpublished: row
                    .try_get::<Option<i64>, _>("oldest_unpublished")?
                    .map(from_millis)
                    .transpose()?,
                authorized_amount: row.try_get("authorized_amount")?,
                captured_amount: row.try_get("captured_amount")?,
                refunded_amount: row.try_get("refunded_amount")?,
                shipments_captured: row.try_get("shipments_captured")?,
                total_amount: row.try_get("total_amount")?,
                overdrawn_lines: row.try_get("overdrawn_lines")?,
            })
        }

        /// Reservation rows `(product_id, quantity)` summed per product; a `BTreeMap` iterates
        /// in product-id order, the lock order.
        pub(super) fn per_product(
            rows: &[$row],
        ) -> Result<std::collections::BTreeMap<i64, i64>, StoreError> {
            let mut sums = std::collections::BTreeMap::new();
            for row in rows {
                *sums.entry(row.try_get("product_id")?).or_default() +=
                    row.try_get::<i64, _>("quantity")?;
            }
            Ok(sums)
        }

        /// An order without its lines; `order_line` rows are attached by the caller.
        pub(super) fn order(row: &$row) -> Result<Order, StoreError> {
            let status: String = row.try_get("status")?;
            Ok(Order {
                id: OrderId::from_uuid(row.try_get("id")?),
                customer_id: CustomerId::from_uuid(row.try_get("customer_id")?),
                checkout_id: CheckoutId::from_uuid(row.try_get("checkout_id")?),
                status: OrderStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("order status {status:?}")))?,
                total: money(row.try_get("total_amount")?, row.try_get("currency")?)?,
                lines: Vec::new(),
                payment_intent_id: row.try_get("payment_intent_id")?,
                created_at: from_millis(row.try_get("created_at")?)?,
                refund_status: row.try_get("refund_status")?,
                po_number: row.try_get("po_number")?,
                invoice_id: row
                    .try_get::<Option<uuid::Uuid>, _>("invoice_id")?
                    .map(crate::domain::InvoiceId::from_uuid),
                authorized_amount: row.try_get("authorized_amount")?,
                captured_amount: row.try_get("captured_amount")?,
                refunded_amount: row.try_get("refunded_amount")?,
            })
        }

        /// A shipment to capture, as selected with `SHIPMENT_COLUMNS`.
        pub(super) fn shipment_ticket(
            row: &$row,
        ) -> Result<crate::store::ShipmentTicket, StoreError> {
            Ok(crate::store::ShipmentTicket {
                id: row.try_get("id")?,
                order_id: OrderId::from_uuid(row.try_get("order_id")?),
                payment_intent_id: row
                    .try_get::<Option<String>, _>("payment_intent_id")?
                    .ok_or_else(|| StoreError::Corrupt("a shipment of an unpaid order".into()))?,
                amount: row.try_get("amount")?,
                final_capture: row.try_get("final_capture")?,
                captured_before: row.try_get("captured_amount")?,
                capture_key: row.try_get("capture_key")?,
            })
        }

        /// An order line as a shipment sees it (`SHIPPABLE_LINES_SQL`).
        pub(super) fn shippable_line(
            row: &$row,
        ) -> Result<crate::store::ShippableLine, StoreError> {
            Ok(crate::store::ShippableLine {
                product_id: row.try_get("product_id")?,
                sku: sku(row.try_get("sku")?)?,
                quantity: row.try_get("quantity")?,
                unit_price: row.try_get("unit_price")?,
                shipped: row.try_get("shipped")?,
                short: row.try_get("short")?,
            })
        }

        /// An order line as a partial refund sees it (`REFUNDABLE_LINES_SQL`).
        pub(super) fn refundable_line(
            row: &$row,
        ) -> Result<crate::store::RefundableLine, StoreError> {
            Ok(crate::store::RefundableLine {
                product_id: row.try_get("product_id")?,
                sku: sku(row.try_get("sku")?)?,
                quantity: row.try_get("quantity")?,
                unit_price: row.try_get("unit_price")?,
                shipped: row.try_get("shipped")?,
                refunded: row.try_get("refunded")?,
            })
        }

        pub(super) fn invoice(row: &$row) -> Result<crate::domain::Invoice, StoreError> {
            let currency: String = row.try_get("currency")?;
            Ok(crate::domain::Invoice {
                id: crate::domain::InvoiceId::from_uuid(row.try_get("id")?),
                number: row.try_get("number")?,
                company_id: crate::domain::CompanyId::from_uuid(row.try_get("company_id")?),
                order_id: OrderId::from_uuid(row.try_get("order_id")?),
                amount: money(row.try_get("amount")?, &currency)?,
                paid: money(row.try_get("paid_amount")?, &currency)?,
                status: row.try_get("status")?,
                due_at: from_millis(row.try_get("due_at")?)?,
                created_at: from_millis(row.try_get("created_at")?)?,
            })
        }

        /// A cart as `CART_SQL` reads it (and PostgreSQL's cart change answers it): the
        /// status on every row, one row per line, `line_sku` NULL on the one row of a cart
        /// without lines. No rows: no such cart of this customer.
        pub(super) fn cart_of(
            customer: CustomerId,
            cart: CartId,
            rows: &[$row],
        ) -> Result<Option<Cart>, StoreError> {
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let status: String = first.try_get("cart_status")?;
            let mut lines = Vec::with_capacity(rows.len());
            for row in rows {
                if let Some(line_sku) = row.try_get::<Option<String>, _>("line_sku")? {
                    lines.push(CartLine {
                        sku: sku(&line_sku)?,
                        quantity: quantity(row.try_get("line_quantity")?)?,
                    });
                }
            }
            Ok(Some(Cart {
                id: cart,
                customer_id: customer,
                status: CartStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("cart status {status:?}")))?,
                lines,
            }))
        }

        /// An order with its lines as `ORDER_WITH_LINES_SQL` reads it: one row per line (an
        /// order row without lines has NULL line columns). No rows: no such order.
        pub(super) fn order_of(rows: &[$row]) -> Result<Option<Order>, StoreError> {
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let mut found = order(first)?;
            for row in rows {
                if row.try_get::<Option<uuid::Uuid>, _>("order_id")?.is_some() {
                    found.lines.push(order_line(row)?.1);
                }
            }
            Ok(Some(found))
        }

        /// An order line with the id of the order it belongs to.
        pub(super) fn order_line(row: &$row) -> Result<(OrderId, OrderLine), StoreError> {
            let currency: String = row.try_get("currency")?;
            Ok((
                OrderId::from_uuid(row.try_get("order_id")?),
                OrderLine {
                    sku: sku(row.try_get("sku")?)?,
                    quantity: quantity(row.try_get("quantity")?)?,
                    unit_price: money(row.try_get("unit_price")?, &currency)?,
                    line_total: money(row.try_get("line_total")?, &currency)?,
                },
            ))
        }
    };
}

pub(super) use row_decoders;
