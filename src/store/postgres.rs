//! The production store: PostgreSQL. Starting a checkout is one call of the server-side
//! function `hf_reserve_checkouts` (migration 0022): cart claim, catalogue prices, the guarded
//! all-or-nothing reservation in product-id order (promises 1 and 2, no deadlock) and every row,
//! in one round trip, so a hot row is locked only while the server runs a few statements and
//! commits. Group reservation sends a whole batch to the same function: one round trip and one
//! commit for all of it. Background work is claimed with `FOR UPDATE SKIP LOCKED`, so any
//! number of instances and workers can run at once.

use std::str::FromStr;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::domain::{
    Cart, CartId, CartStatus, Checkout, CheckoutId, CheckoutState, Company, CompanyId,
    CompanyPrice, Customer, CustomerId, CustomerName, FlashSale, FlashSaleId, Invoice, InvoiceId,
    NewCompany, NewFlashSale, NewProduct, Order, OrderId, OrderStatus, Product, ProductPatch,
    Quantity, Sku,
};

use super::group;
use super::rows::{self, row_decoders};
use super::{
    admission_in_use, attach_lines, cart_must_be_open, check_patch, order_paid_event, order_total,
    page_of, priced_in_lock_order, reserve_retrying, schema_is_current, to_millis, unclaimed_cart,
    Acquisitions, ChargeTicket, IdempotencyStart, InventoryRow, Lease, NewCheckout, Page, Released,
    Retry, SaleCheckout, SaleLimit, Shortfall, Store, StoreError, StoreKind, StoredKey, WantedLine,
    CHECKOUT_COLUMNS, COMPANY_COLUMNS, COMPANY_PRICES_SQL, IDEMPOTENCY_RENEW, INSERT_PRODUCT_SQL,
    INVENTORY_AUDIT_SQL, ORDER_COLUMNS, PAID_ORDER_LINES_SQL, PRODUCT_COLUMNS, SALE_CHECKOUTS_SQL,
    UPDATE_PRODUCT_SQL, UPSERT_COMPANY_PRICE_SQL,
};
use super::{
    credit_row_sql, invoice_payment, on_account_checkout, on_account_terms, CreditAuditRow,
    CART_CHECKED_OUT_SQL, CREDIT_AUDIT_SQL, INVOICE_COLUMNS, INVOICE_PAID_ORDER_SQL,
    INVOICE_PAYMENT_SQL, ON_ACCOUNT_CHECKOUT_SQL, ON_ACCOUNT_CREDIT_SQL, ON_ACCOUNT_ORDER_SQL,
    OUTBOX_ORDER_PAID_SQL,
};

mod decode {
    super::row_decoders!(sqlx::postgres::PgRow);
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Two connections of their own for the catalogue snapshot and its `LISTEN`: reads that
    /// never wait behind checkout writes in `pool`.
    reads: PgPool,
    acquisitions: Acquisitions,
}

/// What the `products` trigger notifies (migration 0021).
const PRODUCTS_CHANNEL: &str = "holdfast_products";

impl PgStore {
    /// Connects (and fails fast if the database cannot be reached).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad database url: {e}")))?;
        let acquisitions = Acquisitions::default();
        let pool = acquisitions
            .options(PgPoolOptions::new())
            .max_connections(max_connections)
            .acquire_timeout(super::pool::PG_ACQUIRE_DEADLINE)
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let reads = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(StdDuration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            reads,
            acquisitions,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
    }

    /// For a store read as it is: every migration this binary knows must have been applied
    /// (nothing is created here, not even sqlx's bookkeeping table).
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        let tracked: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        let applied: Vec<i64> = if tracked {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        schema_is_current(&MIGRATOR, &applied)
    }

    /// The pool, for the audit and for tests that must reach under the trait.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn cart_in(
        tx: &mut Transaction<'_, Postgres>,
        customer: CustomerId,
        cart: CartId,
    ) -> Result<Option<Cart>, StoreError> {
        let Some(row) = sqlx::query("SELECT status FROM carts WHERE id = $1 AND customer_id = $2")
            .bind(cart.uuid())
            .bind(customer.uuid())
            .fetch_optional(&mut **tx)
            .await?
        else {
            return Ok(None);
        };
        let status: String = row.try_get("status")?;
        let lines = sqlx::query(
            "SELECT p.sku, l.quantity FROM cart_lines l JOIN products p ON p.id = l.product_id \
             WHERE l.cart_id = $1 ORDER BY p.sku",
        )
        .bind(cart.uuid())
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(decode::cart_line)
        .collect::<Result<_, _>>()?;
        Ok(Some(Cart {
            id: cart,
            customer_id: customer,
            status: CartStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("cart status {status:?}")))?,
            lines,
        }))
    }

    /// Stamps a changed cart, reads it back and commits the change.
    async fn finish_cart_change(
        mut tx: Transaction<'_, Postgres>,
        customer: CustomerId,
        cart: CartId,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError> {
        sqlx::query("UPDATE carts SET updated_at = $2 WHERE id = $1")
            .bind(cart.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        let updated = Self::cart_in(&mut tx, customer, cart)
            .await?
            .ok_or(StoreError::NotFound("cart"))?;
        tx.commit().await?;
        Ok(updated)
    }

    /// Locks an open cart of this customer for a change of its lines.
    async fn lock_open_cart(
        tx: &mut Transaction<'_, Postgres>,
        customer: CustomerId,
        cart: CartId,
    ) -> Result<(), StoreError> {
        let row =
            sqlx::query("SELECT status FROM carts WHERE id = $1 AND customer_id = $2 FOR UPDATE")
                .bind(cart.uuid())
                .bind(customer.uuid())
                .fetch_optional(&mut **tx)
                .await?
                .ok_or(StoreError::NotFound("cart"))?;
        cart_must_be_open(&row.try_get::<String, _>("status")?)
    }

    /// Gives the units of these checkouts' active reservations back, products in id order.
    async fn release_reservations(
        tx: &mut Transaction<'_, Postgres>,
        checkouts: &[Uuid],
    ) -> Result<i64, StoreError> {
        let rows = sqlx::query(
            "UPDATE reservations SET status = 'released' \
             WHERE checkout_id = ANY($1) AND status = 'active' RETURNING product_id, quantity",
        )
        .bind(checkouts)
        .fetch_all(&mut **tx)
        .await?;
        let per_product = decode::per_product(&rows)?;
        let mut units = 0;
        for (product_id, quantity) in per_product {
            sqlx::query("UPDATE products SET reserved = reserved - $1 WHERE id = $2")
                .bind(quantity)
                .bind(product_id)
                .execute(&mut **tx)
                .await?;
            units += quantity;
        }
        Ok(units)
    }

    /// A refund the gateway took without giving the money back yet (`pending`) or at all
    /// (`failed`): no longer due, the order stays paid and carries `status` as its
    /// `refund_status`. A refunded checkout stays as it is.
    async fn record_unsettled_refund(
        &self,
        id: CheckoutId,
        refund_id: &str,
        status: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        if current.state == CheckoutState::Refunded {
            return Ok(current);
        }
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET refund_due = FALSE, refund_id = $2, lease_owner = NULL, \
             lease_until = NULL, updated_at = $3 WHERE id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(refund_id)
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE orders SET refund_status = $2, updated_at = $3 WHERE id = $1")
            .bind(current.order_id.uuid())
            .bind(status)
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn lock_checkout(
        tx: &mut Transaction<'_, Postgres>,
        id: CheckoutId,
    ) -> Result<Checkout, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.uuid())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("checkout"))?;
        decode::checkout(&row)
    }

    /// Sold: every active reservation of the checkout leaves `reserved` and `stock` together.
    async fn confirm_reservations(
        tx: &mut Transaction<'_, Postgres>,
        id: CheckoutId,
    ) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE reservations SET status = 'confirmed' \
             WHERE checkout_id = $1 AND status = 'active' RETURNING product_id, quantity",
        )
        .bind(id.uuid())
        .fetch_all(&mut **tx)
        .await?;
        for (product_id, quantity) in decode::per_product(&rows)? {
            sqlx::query(
                "UPDATE products SET stock = stock - $1, reserved = reserved - $1 WHERE id = $2",
            )
            .bind(quantity)
            .bind(product_id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// A refunded sale: its confirmed units go back on the shelf.
    async fn return_stock(
        tx: &mut Transaction<'_, Postgres>,
        id: CheckoutId,
    ) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "UPDATE reservations SET status = 'returned' \
             WHERE checkout_id = $1 AND status = 'confirmed' RETURNING product_id, quantity",
        )
        .bind(id.uuid())
        .fetch_all(&mut **tx)
        .await?;
        for (product_id, quantity) in decode::per_product(&rows)? {
            sqlx::query("UPDATE products SET stock = stock + $1 WHERE id = $2")
                .bind(quantity)
                .bind(product_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// A late success for units already given back: take them again if every line is still
    /// available (locked in product-id order), else leave everything as it was.
    async fn reserve_again_and_confirm(
        tx: &mut Transaction<'_, Postgres>,
        id: CheckoutId,
    ) -> Result<bool, StoreError> {
        let rows = sqlx::query(
            "SELECT product_id, quantity FROM reservations \
             WHERE checkout_id = $1 AND status = 'released'",
        )
        .bind(id.uuid())
        .fetch_all(&mut **tx)
        .await?;
        let wanted = decode::per_product(&rows)?;
        let ids: Vec<i64> = wanted.keys().copied().collect();
        let available = sqlx::query(
            "SELECT id, stock - reserved AS available FROM products WHERE id = ANY($1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for row in &available {
            let product: i64 = row.try_get("id")?;
            let free: i64 = row.try_get("available")?;
            if wanted.get(&product).is_some_and(|q| *q > free) {
                return Ok(false);
            }
        }
        for (product_id, quantity) in &wanted {
            sqlx::query("UPDATE products SET stock = stock - $1 WHERE id = $2")
                .bind(quantity)
                .bind(product_id)
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query(
            "UPDATE reservations SET status = 'confirmed' WHERE checkout_id = $1 AND status = 'released'",
        )
        .bind(id.uuid())
        .execute(&mut **tx)
        .await?;
        Ok(true)
    }

    /// One call of `hf_reserve_checkouts` (migration 0004) for `batch`: one round trip and one
    /// commit whatever the batch's size, each request's answer in batch order. `Err(Retry)`: a
    /// price moved inside the call's own transaction, which was rolled back as a whole.
    async fn try_reserve(
        &self,
        batch: &[NewCheckout],
    ) -> Result<Result<Vec<Result<Checkout, StoreError>>, Retry>, StoreError> {
        // Each request's open sales, flattened: (its 1-based place, sale id, SKU).
        let mut open: (Vec<i32>, Vec<Uuid>, Vec<String>) = Default::default();
        for (place, new) in (1..).zip(batch) {
            for sale in &new.open_sales {
                open.0.push(place);
                open.1.push(sale.id.uuid());
                open.2.push(sale.sku.to_string());
            }
        }
        let rows = sqlx::query(
            "SELECT * FROM hf_reserve_checkouts($1::UUID[], $2::UUID[], $3::UUID[], $4::UUID[], \
             $5::UUID[], $6, $7::BIGINT[], $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::INT[], \
             $12::UUID[], $13::TEXT[], $14::TEXT[])",
        )
        .bind(batch.iter().map(|n| n.id.uuid()).collect::<Vec<_>>())
        .bind(batch.iter().map(|n| n.order_id.uuid()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|n| n.customer_id.uuid())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|n| n.cart_id.uuid()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|n| n.flash_sale.map(FlashSaleId::uuid))
                .collect::<Vec<_>>(),
        )
        .bind(batch.first().map_or(0, |n| to_millis(n.now)))
        .bind(
            batch
                .iter()
                .map(|n| to_millis(n.now + n.ttl))
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|n| to_millis(n.now + n.max_lifetime))
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|n| n.idempotency_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|n| i64::from(n.flash_sale_units))
                .collect::<Vec<_>>(),
        )
        .bind(&open.0)
        .bind(&open.1)
        .bind(&open.2)
        .bind(
            batch
                .iter()
                .map(|n| n.po_number.as_ref().map(|p| p.as_str().to_owned()))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(PRICE_MOVED) => {
                return Ok(Err(Retry::PriceMoved));
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(GUARD_MISSED) => {
                return Err(StoreError::Corrupt(db.message().to_owned()));
            }
            Err(e) => return Err(admission_in_use(e)),
        };
        if rows.len() != batch.len() {
            return Err(StoreError::Corrupt(format!(
                "{} answers for {} checkouts",
                rows.len(),
                batch.len()
            )));
        }
        Ok(Ok(rows.iter().map(decode_reserved).collect()))
    }

    async fn order_lines(
        &self,
        customer: CustomerId,
        seq_from: i64,
        seq_to: i64,
    ) -> Result<Vec<(OrderId, crate::domain::OrderLine)>, StoreError> {
        sqlx::query(
            "SELECT ol.order_id, ol.sku, ol.quantity, ol.unit_price, ol.line_total, o.currency \
             FROM order_lines ol JOIN orders o ON o.id = ol.order_id \
             WHERE o.customer_id = $1 AND o.seq BETWEEN $2 AND $3 ORDER BY ol.sku",
        )
        .bind(customer.uuid())
        .bind(seq_from)
        .bind(seq_to)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(decode::order_line)
        .collect()
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// SQLSTATEs raised by `hf_reserve_checkouts` (migration 0022).
const PRICE_MOVED: &str = "HF001";
const GUARD_MISSED: &str = "HF002";

/// One row of `hf_reserve_checkouts`: the checkout as written, or the plain path's refusal.
fn decode_reserved(row: &PgRow) -> Result<Checkout, StoreError> {
    let outcome: String = row.try_get("outcome")?;
    let details: Option<String> = row.try_get("details")?;
    let details = || -> Result<serde_json::Value, StoreError> {
        serde_json::from_str(details.as_deref().unwrap_or("null"))
            .map_err(|e| StoreError::Corrupt(format!("reservation details: {e}")))
    };
    match outcome.as_str() {
        "reserved" => decode::checkout(row),
        "cart_missing" => Err(StoreError::NotFound("cart")),
        "cart_status" => Err(unclaimed_cart(details()?.as_str())),
        "cart_empty" => Err(StoreError::CartEmpty),
        "po_number_required" => Err(StoreError::PoNumberRequired),
        "rules_changed" => Err(StoreError::RulesChanged(decode_breaches(details()?)?)),
        "one_sale_per_checkout" => Err(StoreError::OneSalePerCheckout),
        "admission_required" => Err(StoreError::AdmissionRequired),
        "flash_sale_limit" => Err(StoreError::FlashSaleLimit(decode_sale_limit(details()?)?)),
        "insufficient_stock" => Err(StoreError::InsufficientStock(
            decode_shortfalls(details()?)?,
        )),
        "unpriceable" => {
            let lines = decode_lines(details()?)?;
            match order_total(&priced_in_lock_order(lines)?) {
                Err(e) => Err(e),
                Ok(_) => Err(StoreError::Corrupt("a priceable cart was refused".into())),
            }
        }
        other => Err(StoreError::Corrupt(format!(
            "reservation outcome {other:?}"
        ))),
    }
}

fn decode_sale_limit(details: serde_json::Value) -> Result<SaleLimit, StoreError> {
    #[derive(serde::Deserialize)]
    struct Limit {
        sku: String,
        requested: i64,
        limit: i64,
    }
    let limit: Limit = serde_json::from_value(details)
        .map_err(|e| StoreError::Corrupt(format!("sale limit: {e}")))?;
    let units =
        |n: i64| u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("sale units {n}")));
    Ok(SaleLimit {
        sku: rows::sku(&limit.sku)?,
        requested: units(limit.requested)?,
        limit: units(limit.limit)?,
    })
}

/// The lines the reservation found outside their rules, named by the one rule check
/// ([`crate::domain::OrderingRules::breach`]).
fn decode_breaches(
    details: serde_json::Value,
) -> Result<Vec<crate::domain::RuleBreach>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Broken {
        sku: String,
        quantity: i64,
        min_quantity: i64,
        increment: i64,
        max_quantity: Option<i64>,
    }
    let broken: Vec<Broken> = serde_json::from_value(details)
        .map_err(|e| StoreError::Corrupt(format!("broken rules: {e}")))?;
    broken
        .into_iter()
        .map(|b| {
            let rules = rows::rules(b.min_quantity, b.increment, b.max_quantity)?;
            let sku = rows::sku(&b.sku)?;
            rules
                .breach(&sku, rows::quantity(b.quantity)?.get())
                .ok_or_else(|| StoreError::Corrupt(format!("{sku}: a line within its rules")))
        })
        .collect()
}

fn decode_shortfalls(details: serde_json::Value) -> Result<Vec<Shortfall>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Short {
        sku: String,
        requested: i64,
        available: i64,
    }
    let short: Vec<Short> = serde_json::from_value(details)
        .map_err(|e| StoreError::Corrupt(format!("shortfalls: {e}")))?;
    short
        .into_iter()
        .map(|s| {
            Ok(Shortfall {
                sku: rows::sku(&s.sku)?,
                requested: rows::quantity(s.requested)?.get(),
                available: s.available,
            })
        })
        .collect()
}

fn decode_lines(
    details: serde_json::Value,
) -> Result<Vec<(WantedLine, super::LineTerms)>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Line {
        product_id: i64,
        sku: String,
        quantity: i64,
        unit_price: i64,
        currency: String,
    }
    let lines: Vec<Line> = serde_json::from_value(details)
        .map_err(|e| StoreError::Corrupt(format!("priced lines: {e}")))?;
    lines
        .into_iter()
        .map(|l| {
            Ok((
                WantedLine {
                    product_id: l.product_id,
                    sku: rows::sku(&l.sku)?,
                    quantity: l.quantity,
                },
                super::LineTerms::list(rows::money(l.unit_price, &l.currency)?),
            ))
        })
        .collect()
}

/// The company credit columns of [`credit_row_sql`].
fn decode_credit(row: &PgRow) -> Result<super::CreditRow, StoreError> {
    Ok(super::CreditRow {
        company: CompanyId::from_uuid(row.try_get("id")?),
        terms: row.try_get("payment_terms")?,
        currency: row.try_get("currency")?,
        limit: row.try_get("credit_limit")?,
        outstanding: row.try_get("credit_outstanding")?,
        overdue_invoices: row.try_get("overdue_invoices")?,
    })
}

fn checkout_state(row: &PgRow) -> Result<CheckoutState, StoreError> {
    let state: String = row.try_get("state")?;
    CheckoutState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("state {state:?}")))
}

wholesale_store_methods!(
    PgStore,
    lock: " FOR UPDATE",
    credit_lock: "FOR UPDATE OF co",
    insert_invoice: "INSERT INTO invoices (id, company_id, order_id, amount, currency, status, \
         due_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7) \
         RETURNING {}",
);

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn acquisitions(&self) -> u64 {
        self.acquisitions.get()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_customer_of(
        &self,
        name: &CustomerName,
        token_hash: &str,
        company: Option<CompanyId>,
    ) -> Result<Customer, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(company) = company {
            sqlx::query_scalar::<_, Uuid>("SELECT id FROM companies WHERE id = $1")
                .bind(company.uuid())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("company"))?;
        }
        let row = sqlx::query(
            "INSERT INTO customers (id, name, token_hash, created_at, company_id) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id, name, company_id",
        )
        .bind(Uuid::new_v4())
        .bind(name.as_str())
        .bind(token_hash)
        .bind(to_millis(Utc::now()))
        .bind(company.map(CompanyId::uuid))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        decode::customer(&row)
    }

    async fn customer_by_token_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<Customer>, StoreError> {
        sqlx::query("SELECT id, name, company_id FROM customers WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(decode::customer)
            .transpose()
    }

    async fn create_product(
        &self,
        product: &NewProduct,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Product, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(INSERT_PRODUCT_SQL)
            .bind(product.sku.as_str())
            .bind(product.name.as_str())
            .bind(product.price.amount())
            .bind(product.price.currency().as_str())
            .bind(product.stock.get())
            .bind(to_millis(now))
            .bind(i64::from(product.rules.min_quantity))
            .bind(i64::from(product.rules.increment))
            .bind(product.rules.max_quantity.map(i64::from))
            .bind(product.price_tiers.to_json())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::SkuTaken
                } else {
                    e.into()
                }
            })?;
        let created = decode::product(&row)?;
        sqlx::query(
            "INSERT INTO stock_adjustments (product_id, actor, old_stock, new_stock, reason, at) \
             VALUES ($1, $2, 0, $3, 'created', $4)",
        )
        .bind(created.id)
        .bind(actor)
        .bind(created.stock)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn product(&self, sku: &Sku) -> Result<Option<Product>, StoreError> {
        sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1"
        ))
        .bind(sku.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::product)
        .transpose()
    }

    async fn list_products(
        &self,
        after: Option<&Sku>,
        limit: u32,
    ) -> Result<Page<Product>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku > $1 ORDER BY sku LIMIT $2"
        ))
        .bind(after.map_or("", Sku::as_str))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items: Vec<Product> = rows.iter().map(decode::product).collect::<Result<_, _>>()?;
        Ok(page_of(&mut items, limit, |p| p.sku.to_string()))
    }

    async fn all_products(&self) -> Result<Vec<Product>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products ORDER BY sku"
        ))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(decode::product).collect()
    }

    async fn listen_product_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let reads = self.reads.clone();
        tokio::spawn(async move {
            let mut listener = loop {
                match PgListener::connect_with(&reads).await {
                    Ok(mut l) => match l.listen(PRODUCTS_CHANNEL).await {
                        Ok(()) => break l,
                        Err(e) => tracing::warn!(error = %e, "cannot listen for product changes"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot listen for product changes"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(StdDuration::from_secs(5)).await;
            };
            loop {
                // `None`: the connection was lost and is re-established on the next call;
                // what was notified meanwhile is unknown, so that counts as a change too.
                let signal = match listener.try_recv().await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "product change listener failed; retrying");
                        tokio::time::sleep(StdDuration::from_secs(1)).await;
                        true
                    }
                };
                if signal && tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        });
        Some(rx)
    }

    async fn update_product(
        &self,
        sku: &Sku,
        expected_version: i64,
        patch: &ProductPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Product, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1 FOR UPDATE"
        ))
        .bind(sku.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("product"))?;
        let current = decode::product(&row)?;
        let rules = check_patch(&current, expected_version, patch)?;
        let tiers = patch.price_tiers.as_ref().unwrap_or(&current.price_tiers);
        let price = patch.price.unwrap_or(current.price);
        let stock = patch.stock.map_or(current.stock, |s| s.get());
        let name = patch
            .name
            .as_ref()
            .map_or(current.name.as_str(), |n| n.as_str());
        let row = sqlx::query(UPDATE_PRODUCT_SQL)
            .bind(current.id)
            .bind(name)
            .bind(price.amount())
            .bind(price.currency().as_str())
            .bind(stock)
            .bind(to_millis(now))
            .bind(i64::from(rules.min_quantity))
            .bind(i64::from(rules.increment))
            .bind(rules.max_quantity.map(i64::from))
            .bind(tiers.to_json())
            .fetch_one(&mut *tx)
            .await?;
        if stock != current.stock {
            sqlx::query(
                "INSERT INTO stock_adjustments (product_id, actor, old_stock, new_stock, reason, at) \
                 VALUES ($1, $2, $3, $4, 'admin_edit', $5)",
            )
            .bind(current.id)
            .bind(actor)
            .bind(current.stock)
            .bind(stock)
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        decode::product(&row)
    }

    async fn create_cart(
        &self,
        customer: CustomerId,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError> {
        let id = CartId::new();
        sqlx::query(
            "INSERT INTO carts (id, customer_id, status, created_at, updated_at) \
             VALUES ($1, $2, 'open', $3, $3)",
        )
        .bind(id.uuid())
        .bind(customer.uuid())
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        Ok(Cart {
            id,
            customer_id: customer,
            status: CartStatus::Open,
            lines: Vec::new(),
        })
    }

    async fn cart(&self, customer: CustomerId, cart: CartId) -> Result<Option<Cart>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let found = Self::cart_in(&mut tx, customer, cart).await?;
        tx.commit().await?;
        Ok(found)
    }

    async fn set_cart_line(
        &self,
        customer: CustomerId,
        cart: CartId,
        sku: &Sku,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::lock_open_cart(&mut tx, customer, cart).await?;
        let product: i64 = sqlx::query_scalar("SELECT id FROM products WHERE sku = $1")
            .bind(sku.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("product"))?;
        sqlx::query(
            "INSERT INTO cart_lines (cart_id, product_id, quantity) VALUES ($1, $2, $3) \
             ON CONFLICT (cart_id, product_id) DO UPDATE SET quantity = EXCLUDED.quantity",
        )
        .bind(cart.uuid())
        .bind(product)
        .bind(i64::from(quantity.get()))
        .execute(&mut *tx)
        .await?;
        Self::finish_cart_change(tx, customer, cart, now).await
    }

    async fn remove_cart_line(
        &self,
        customer: CustomerId,
        cart: CartId,
        sku: &Sku,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::lock_open_cart(&mut tx, customer, cart).await?;
        sqlx::query(
            "DELETE FROM cart_lines WHERE cart_id = $1 \
             AND product_id = (SELECT id FROM products WHERE sku = $2)",
        )
        .bind(cart.uuid())
        .bind(sku.as_str())
        .execute(&mut *tx)
        .await?;
        Self::finish_cart_change(tx, customer, cart, now).await
    }

    #[tracing::instrument(skip_all, fields(checkout_id = %new.id, cart_id = %new.cart_id))]
    async fn reserve_checkout(&self, new: &NewCheckout) -> Result<Checkout, StoreError> {
        // The verdict is read under the row lock, so only a moved price starts over.
        let batch = std::slice::from_ref(new);
        let mut answers = reserve_retrying(|_| self.try_reserve(batch)).await?;
        answers
            .pop()
            .unwrap_or_else(|| Err(StoreError::Corrupt("no answer for the checkout".into())))
    }

    #[tracing::instrument(skip_all, fields(size = batch.len()))]
    async fn reserve_checkouts(&self, batch: &[NewCheckout]) -> Vec<Result<Checkout, StoreError>> {
        if batch.len() < 2 {
            return group::one_by_one(self, batch).await;
        }
        match self.try_reserve(batch).await {
            Ok(Ok(answers)) => answers,
            Ok(Err(why)) => {
                tracing::info!(?why, "group reservation fell back to one by one");
                group::one_by_one(self, batch).await
            }
            Err(e) => {
                // Rolled back (e.g. two live checkouts of one admission): nothing was written.
                tracing::info!(error = %e, "group reservation fell back to one by one");
                group::one_by_one(self, batch).await
            }
        }
    }

    async fn checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Option<Checkout>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1 AND customer_id = $2"
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::checkout)
        .transpose()
    }

    async fn heartbeat_checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Checkout, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET expires_at = LEAST($3::BIGINT + $4::BIGINT, max_expires_at), \
             updated_at = $3 WHERE id = $1 AND customer_id = $2 AND state = 'reserved' \
             AND expires_at > $3 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .bind(to_millis(now))
        .bind(ttl.num_milliseconds())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => decode::checkout(&row),
            None => Err(match self.checkout(customer, id).await? {
                None => StoreError::NotFound("checkout"),
                Some(c) if matches!(c.state, CheckoutState::Reserved | CheckoutState::Expired) => {
                    StoreError::CheckoutExpired
                }
                Some(c) => StoreError::CheckoutState(c.state),
            }),
        }
    }

    async fn cancel_checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1 AND customer_id = $2 FOR UPDATE"
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("checkout"))?;
        match checkout_state(&row)? {
            CheckoutState::Reserved => {}
            CheckoutState::Cancelled => return decode::checkout(&row),
            other => return Err(StoreError::CheckoutState(other)),
        }
        let ids = [id.uuid()];
        Self::release_reservations(&mut tx, &ids).await?;
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'cancelled', updated_at = $2 WHERE id = $1 \
             RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        let cancelled = decode::checkout(&row)?;
        close_order_and_reopen_cart(
            &mut tx,
            &[cancelled.order_id.uuid()],
            &[cancelled.cart_id.uuid()],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(cancelled)
    }

    #[tracing::instrument(skip_all)]
    async fn expire_due_checkouts(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Released, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE checkouts SET state = 'expired', updated_at = $1 \
             WHERE id IN (SELECT id FROM checkouts WHERE state = 'reserved' AND expires_at <= $1 \
                          ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             AND state = 'reserved' AND expires_at <= $1 \
             RETURNING id, order_id, cart_id, customer_id, flash_sale_id",
        )
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Released::default());
        }
        let mut checkouts = Vec::with_capacity(rows.len());
        let mut orders = Vec::with_capacity(rows.len());
        let mut carts = Vec::with_capacity(rows.len());
        let mut admissions = Vec::new();
        for row in &rows {
            if let Some(sale) = row.try_get::<Option<Uuid>, _>("flash_sale_id")? {
                admissions.push((
                    FlashSaleId::from_uuid(sale),
                    CustomerId::from_uuid(row.try_get("customer_id")?),
                    CheckoutId::from_uuid(row.try_get("id")?),
                ));
            }
            checkouts.push(row.try_get::<Uuid, _>("id")?);
            orders.push(row.try_get::<Uuid, _>("order_id")?);
            carts.push(row.try_get::<Uuid, _>("cart_id")?);
        }
        let units = Self::release_reservations(&mut tx, &checkouts).await?;
        close_order_and_reopen_cart(&mut tx, &orders, &carts, now).await?;
        tx.commit().await?;
        Ok(Released {
            checkouts: checkouts.into_iter().map(CheckoutId::from_uuid).collect(),
            units,
            admissions,
        })
    }

    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    async fn begin_charge(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        payment_method: &str,
        lease: Lease<'_>,
    ) -> Result<ChargeTicket, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS}, lease_until FROM checkouts \
             WHERE id = $1 AND customer_id = $2 FOR UPDATE"
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("checkout"))?;
        let current = decode::checkout(&row)?;
        let lease_until: Option<i64> = row.try_get("lease_until")?;
        let (row, opens_attempt) = match current.state {
            CheckoutState::Reserved if current.expires_at <= lease.now => {
                return Err(StoreError::CheckoutExpired)
            }
            CheckoutState::Expired => return Err(StoreError::CheckoutExpired),
            CheckoutState::Reserved => {
                let row = sqlx::query(&format!(
                    "UPDATE checkouts SET state = 'charging', attempt = attempt + 1, \
                 payment_method = $2, charge_started_at = $3, lease_owner = $4, \
                 lease_until = $5, updated_at = $3 WHERE id = $1 \
                 RETURNING {CHECKOUT_COLUMNS}, charge_started_at"
                ))
                .bind(id.uuid())
                .bind(payment_method)
                .bind(to_millis(lease.now))
                .bind(lease.owner)
                .bind(to_millis(lease.until))
                .fetch_one(&mut *tx)
                .await?;
                (row, true)
            }
            CheckoutState::Charging if lease_until.is_some_and(|t| t > to_millis(lease.now)) => {
                return Err(StoreError::ChargeInProgress)
            }
            CheckoutState::Charging => {
                let row = sqlx::query(&format!(
                    "UPDATE checkouts SET lease_owner = $2, lease_until = $3 WHERE id = $1 \
                 RETURNING {CHECKOUT_COLUMNS}, charge_started_at"
                ))
                .bind(id.uuid())
                .bind(lease.owner)
                .bind(to_millis(lease.until))
                .fetch_one(&mut *tx)
                .await?;
                (row, false)
            }
            other => return Err(StoreError::CheckoutState(other)),
        };
        tx.commit().await?;
        Ok(ChargeTicket {
            opens_attempt,
            ..decode::ticket(&row)?
        })
    }

    async fn find_checkout(&self, id: CheckoutId) -> Result<Option<Checkout>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1"
        ))
        .bind(id.uuid())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::checkout)
        .transpose()
    }

    async fn checkout_by_payment_intent(
        &self,
        payment_intent_id: &str,
    ) -> Result<Option<Checkout>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE payment_intent_id = $1"
        ))
        .bind(payment_intent_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::checkout)
        .transpose()
    }

    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    async fn record_charge_succeeded(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        match current.state {
            CheckoutState::Completed | CheckoutState::Refunded => return Ok(current),
            CheckoutState::Reserved | CheckoutState::Charging | CheckoutState::RequiresAction => {
                Self::confirm_reservations(&mut tx, id).await?;
            }
            CheckoutState::Expired | CheckoutState::PaymentFailed | CheckoutState::Cancelled => {
                if current.refund_due {
                    return Ok(current);
                }
                if !Self::reserve_again_and_confirm(&mut tx, id).await? {
                    let row = sqlx::query(&format!(
                        "UPDATE checkouts SET refund_due = TRUE, payment_intent_id = $2, \
                         lease_owner = NULL, lease_until = $3, updated_at = $3 WHERE id = $1 \
                         RETURNING {CHECKOUT_COLUMNS}"
                    ))
                    .bind(id.uuid())
                    .bind(payment_intent_id)
                    .bind(to_millis(now))
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    return decode::checkout(&row);
                }
            }
        }
        sqlx::query(
            "UPDATE orders SET status = 'paid', payment_intent_id = $2, updated_at = $3 WHERE id = $1",
        )
        .bind(current.order_id.uuid())
        .bind(payment_intent_id)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE carts SET status = 'checked_out', updated_at = $2 WHERE id = $1")
            .bind(current.cart_id.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'completed', payment_intent_id = $2, lease_owner = NULL, \
             lease_until = NULL, updated_at = $3 WHERE id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(payment_intent_id)
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        let completed = decode::checkout(&row)?;
        let rows = sqlx::query(PAID_ORDER_LINES_SQL)
            .bind(current.order_id.uuid())
            .fetch_all(&mut *tx)
            .await?;
        let po_number: Option<String> = match rows.first() {
            Some(row) => row.try_get("po_number")?,
            None => None,
        };
        let lines = rows
            .iter()
            .map(decode::order_line)
            .collect::<Result<Vec<_>, _>>()?;
        let event = order_paid_event(
            &completed,
            super::Paid::Card(payment_intent_id),
            lines,
            po_number,
            now,
        );
        sqlx::query(
            "INSERT INTO outbox (event_id, topic, order_id, payload, created_at) \
             VALUES ($1, 'order.paid', $2, $3, $4) ON CONFLICT (topic, order_id) DO NOTHING",
        )
        .bind(event.event_id)
        .bind(completed.order_id.uuid())
        .bind(&event.payload)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(completed)
    }

    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    async fn record_charge_declined(
        &self,
        id: CheckoutId,
        payment_intent_id: Option<&str>,
        decline_code: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        if !matches!(
            current.state,
            CheckoutState::Charging | CheckoutState::RequiresAction
        ) {
            return Ok(current);
        }
        Self::release_reservations(&mut tx, &[id.uuid()]).await?;
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'payment_failed', decline_code = $2, \
             payment_intent_id = COALESCE($3, payment_intent_id), lease_owner = NULL, \
             lease_until = NULL, updated_at = $4 WHERE id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(decline_code)
        .bind(payment_intent_id)
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        finish_order_and_reopen_cart(&mut tx, &current, "payment_failed", now).await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn record_requires_action(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        client_secret: Option<&str>,
        lease: Lease<'_>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        if current.state != CheckoutState::Charging {
            return Ok(current);
        }
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'requires_action', payment_intent_id = $2, \
             client_secret = $3, lease_owner = $4, lease_until = $5, updated_at = $6 \
             WHERE id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(payment_intent_id)
        .bind(client_secret)
        .bind(lease.owner)
        .bind(to_millis(lease.until))
        .bind(to_millis(lease.now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE orders SET status = 'payment_processing', payment_intent_id = $2, \
             updated_at = $3 WHERE id = $1 AND status = 'pending_payment'",
        )
        .bind(current.order_id.uuid())
        .bind(payment_intent_id)
        .bind(to_millis(lease.now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn record_charge_cancelled(
        &self,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        if !matches!(
            current.state,
            CheckoutState::Charging | CheckoutState::RequiresAction
        ) {
            return Ok(current);
        }
        Self::release_reservations(&mut tx, &[id.uuid()]).await?;
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'cancelled', lease_owner = NULL, lease_until = NULL, \
             updated_at = $2 WHERE id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        finish_order_and_reopen_cart(&mut tx, &current, "cancelled", now).await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn abort_charge(
        &self,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'reserved', lease_owner = NULL, lease_until = NULL, \
             updated_at = $2 WHERE id = $1 AND state = 'charging' RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(to_millis(now))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => decode::checkout(&row),
            None => self
                .find_checkout(id)
                .await?
                .ok_or(StoreError::NotFound("checkout")),
        }
    }

    async fn defer_charge(
        &self,
        id: CheckoutId,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE checkouts SET lease_owner = NULL, lease_until = $2 \
             WHERE id = $1 AND state = 'charging'",
        )
        .bind(id.uuid())
        .bind(to_millis(retry_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn renew_charge_lease(
        &self,
        id: CheckoutId,
        held_until: DateTime<Utc>,
        lease: Lease<'_>,
    ) -> Result<bool, StoreError> {
        // `lease_until` doubles as a fencing token: every claim writes a new one.
        let renewed = sqlx::query(
            "UPDATE checkouts SET lease_until = $4 \
             WHERE id = $1 AND state = 'charging' AND lease_owner = $2 AND lease_until = $3",
        )
        .bind(id.uuid())
        .bind(lease.owner)
        .bind(to_millis(held_until))
        .bind(to_millis(lease.until))
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn claim_stalled(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<ChargeTicket>, StoreError> {
        sqlx::query(&format!(
            "UPDATE checkouts SET lease_owner = $1, lease_until = $2 WHERE id IN ( \
               SELECT id FROM checkouts \
               WHERE (state IN ('charging', 'requires_action') OR refund_due) \
                 AND (lease_until IS NULL OR lease_until < $3) \
               ORDER BY lease_until NULLS FIRST LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {CHECKOUT_COLUMNS}, charge_started_at"
        ))
        .bind(lease.owner)
        .bind(to_millis(lease.until))
        .bind(to_millis(lease.now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(decode::ticket)
        .collect()
    }

    async fn record_refunded(
        &self,
        id: CheckoutId,
        refund_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = Self::lock_checkout(&mut tx, id).await?;
        if current.state == CheckoutState::Refunded {
            // The gateway's event may have recorded the refund first, without its id.
            if refund_id.is_some() {
                sqlx::query(
                    "UPDATE checkouts SET refund_id = COALESCE(refund_id, $2) WHERE id = $1",
                )
                .bind(id.uuid())
                .bind(refund_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            return Ok(current);
        }
        let order_status: String =
            sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
                .bind(current.order_id.uuid())
                .fetch_one(&mut *tx)
                .await?;
        // Units of a shipped order left the warehouse: only unshipped ones go back on the shelf.
        if current.state == CheckoutState::Completed && order_status == OrderStatus::Paid.as_str() {
            Self::return_stock(&mut tx, id).await?;
        }
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET state = 'refunded', refund_due = FALSE, \
             refund_id = COALESCE($2, refund_id), \
             lease_owner = NULL, lease_until = NULL, updated_at = $3 WHERE id = $1 \
             RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(id.uuid())
        .bind(refund_id)
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE orders SET status = 'refunded', payment_intent_id = $2, updated_at = $3, \
             refund_status = 'succeeded' WHERE id = $1",
        )
        .bind(current.order_id.uuid())
        .bind(current.payment_intent_id.as_deref())
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn record_refund_pending(
        &self,
        id: CheckoutId,
        refund_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        self.record_unsettled_refund(id, refund_id, "pending", now)
            .await
    }

    async fn record_refund_failed(
        &self,
        id: CheckoutId,
        refund_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        self.record_unsettled_refund(id, refund_id, "failed", now)
            .await
    }

    async fn checkout_for_refund(&self, refund_id: &str) -> Result<Option<CheckoutId>, StoreError> {
        let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM checkouts WHERE refund_id = $1")
            .bind(refund_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.map(CheckoutId::from_uuid))
    }

    async fn claim_pending_refunds(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<(CheckoutId, String)>, StoreError> {
        let rows = sqlx::query(super::claim_pending_refunds_sql!(
            "FOR UPDATE OF c SKIP LOCKED"
        ))
        .bind(lease.owner)
        .bind(to_millis(lease.until))
        .bind(to_millis(lease.now))
        .bind(to_millis(settled_before))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: Uuid = row.try_get("id")?;
                Ok((CheckoutId::from_uuid(id), row.try_get("refund_id")?))
            })
            .collect()
    }

    async fn request_refund(
        &self,
        order: OrderId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        let status: String =
            sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
                .bind(order.uuid())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("order"))?;
        match OrderStatus::parse(&status) {
            Some(OrderStatus::Paid) => {}
            Some(other) => return Err(StoreError::OrderState(other)),
            None => return Err(StoreError::Corrupt(format!("order status {status:?}"))),
        }
        let row = sqlx::query(&format!(
            "UPDATE checkouts SET refund_due = TRUE, lease_owner = NULL, lease_until = $2, \
             updated_at = $2 WHERE order_id = $1 RETURNING {CHECKOUT_COLUMNS}"
        ))
        .bind(order.uuid())
        .bind(to_millis(now))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        decode::checkout(&row)
    }

    async fn mark_fulfilled(
        &self,
        order: OrderId,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError> {
        let changed = sqlx::query(
            "UPDATE orders SET status = 'fulfilled', updated_at = $2 WHERE id = $1 \
             AND status IN ('paid', 'awaiting_payment_on_terms')",
        )
        .bind(order.uuid())
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        let found = self
            .admin_order(order)
            .await?
            .ok_or(StoreError::NotFound("order"))?;
        if changed.rows_affected() == 0 && found.status != OrderStatus::Fulfilled {
            return Err(StoreError::OrderState(found.status));
        }
        Ok(found)
    }

    async fn admin_order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let Some(row) = sqlx::query(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
            .bind(id.uuid())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut order = decode::order(&row)?;
        let seq: i64 = row.try_get("seq")?;
        order.lines = self
            .order_lines(order.customer_id, seq, seq)
            .await?
            .into_iter()
            .map(|(_, line)| line)
            .collect();
        Ok(Some(order))
    }

    async fn webhook_seen(&self, event_id: &str) -> Result<bool, StoreError> {
        let seen: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM webhook_events WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seen.is_some())
    }

    async fn record_webhook_event(
        &self,
        event_id: &str,
        event_type: &str,
        payment_intent_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_events (event_id, event_type, payment_intent_id, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(payment_intent_id)
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn idempotency_begin(
        &self,
        customer: CustomerId,
        key: &str,
        fingerprint: &str,
        now: DateTime<Utc>,
        lock_for: Duration,
    ) -> Result<IdempotencyStart, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (customer_id, idem_key, fingerprint, locked_until, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id, idem_key) DO NOTHING",
        )
        .bind(customer.uuid())
        .bind(key)
        .bind(fingerprint)
        .bind(to_millis(now + lock_for))
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(IdempotencyStart::Proceed);
        }
        let row = sqlx::query(
            "SELECT fingerprint, status_code, response_body, locked_until, created_at, \
             checkout_id FROM idempotency_keys WHERE customer_id = $1 AND idem_key = $2 FOR UPDATE",
        )
        .bind(customer.uuid())
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        let stored = StoredKey {
            fingerprint: row.try_get("fingerprint")?,
            status: row.try_get("status_code")?,
            body: row.try_get("response_body")?,
            locked_until: row.try_get("locked_until")?,
            created_at: row.try_get("created_at")?,
            checkout_id: row.try_get("checkout_id")?,
        };
        let start = stored.decide(fingerprint, now);
        if start == IdempotencyStart::Proceed {
            sqlx::query(
                "UPDATE idempotency_keys SET fingerprint = $3, status_code = NULL, \
                 response_body = NULL, locked_until = $4, created_at = $5, checkout_id = NULL \
                 WHERE customer_id = $1 AND idem_key = $2",
            )
            .bind(customer.uuid())
            .bind(key)
            .bind(fingerprint)
            .bind(to_millis(now + lock_for))
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(start)
    }

    async fn idempotency_finish(
        &self,
        customer: CustomerId,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = $3, response_body = $4 \
             WHERE customer_id = $1 AND idem_key = $2",
        )
        .bind(customer.uuid())
        .bind(key)
        .bind(i32::from(status))
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn idempotency_abandon(&self, customer: CustomerId, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE customer_id = $1 AND idem_key = $2")
            .bind(customer.uuid())
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn idempotency_renew(
        &self,
        customer: CustomerId,
        key: &str,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(IDEMPOTENCY_RENEW)
            .bind(customer.uuid())
            .bind(key)
            .bind(to_millis(until))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_flash_sale(
        &self,
        sale: &NewFlashSale,
        now: DateTime<Utc>,
    ) -> Result<FlashSale, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, stock - reserved AS available FROM products WHERE sku = $1 FOR UPDATE",
        )
        .bind(sale.sku.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("product"))?;
        let product: i64 = row.try_get("id")?;
        let available: i64 = row.try_get("available")?;
        // One live sale per SKU: two would each demand their own token for the same cart line.
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM flash_sales WHERE product_id = $1 AND (ends_at IS NULL OR ends_at > $2)",
        )
        .bind(product)
        .bind(to_millis(now))
        .fetch_optional(&mut *tx)
        .await?;
        if live.is_some() {
            return Err(StoreError::SaleExists);
        }
        if i64::from(sale.units) > available {
            return Err(StoreError::UnitsExceedAvailable {
                units: sale.units,
                available,
            });
        }
        let row = sqlx::query(concat!(
            "INSERT INTO flash_sales (id, product_id, sku, units, starts_at, ends_at, \
             reservation_ttl_ms, created_at, max_per_buyer) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING ",
            flash_sale_columns!()
        ))
        .bind(sale.id.uuid())
        .bind(product)
        .bind(sale.sku.as_str())
        .bind(i64::from(sale.units))
        .bind(to_millis(sale.starts_at))
        .bind(sale.ends_at.map(to_millis))
        .bind(sale.reservation_ttl.num_milliseconds())
        .bind(to_millis(now))
        .bind(i64::from(sale.max_per_buyer))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        decode::flash_sale(&row)
    }

    async fn flash_sale(&self, id: FlashSaleId) -> Result<Option<FlashSale>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            flash_sale_columns!(),
            " FROM flash_sales WHERE id = $1"
        ))
        .bind(id.uuid())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::flash_sale)
        .transpose()
    }

    async fn current_flash_sales(&self, now: DateTime<Utc>) -> Result<Vec<FlashSale>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            flash_sale_columns!(),
            " FROM flash_sales WHERE ends_at IS NULL OR ends_at > $1 ORDER BY starts_at"
        ))
        .bind(to_millis(now))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(decode::flash_sale)
        .collect()
    }

    async fn sale_checkouts(&self, sale: FlashSaleId) -> Result<Vec<SaleCheckout>, StoreError> {
        sqlx::query(SALE_CHECKOUTS_SQL)
            .bind(sale.uuid())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode::sale_checkout)
            .collect()
    }

    async fn order(&self, customer: CustomerId, id: OrderId) -> Result<Option<Order>, StoreError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND customer_id = $2"
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let mut order = decode::order(&row)?;
        let seq: i64 = row.try_get("seq")?;
        order.lines = self
            .order_lines(customer, seq, seq)
            .await?
            .into_iter()
            .map(|(_, line)| line)
            .collect();
        Ok(Some(order))
    }

    async fn list_orders(
        &self,
        customer: CustomerId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Order>, StoreError> {
        let after: i64 = after
            .map_or(Ok(0), str::parse)
            .map_err(|_| StoreError::NotFound("cursor"))?;
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        ))
        .bind(customer.uuid())
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut seqs = Vec::with_capacity(rows.len());
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            seqs.push(row.try_get::<i64, _>("seq")?);
            items.push(decode::order(row)?);
        }
        let page = page_of(&mut items, limit, |_| String::new());
        let shown = page.items.len();
        let next = page.next.map(|_| seqs[shown - 1].to_string());
        let mut items = page.items;
        if let (Some(first), Some(last)) = (seqs.first(), seqs.get(shown.saturating_sub(1))) {
            attach_lines(&mut items, self.order_lines(customer, *first, *last).await?);
        }
        Ok(Page { items, next })
    }

    async fn checkout_audit(&self) -> Result<Vec<crate::store::CheckoutAuditRow>, StoreError> {
        sqlx::query(crate::store::CHECKOUT_AUDIT_SQL)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode::checkout_audit)
            .collect()
    }

    async fn inventory_audit(&self) -> Result<Vec<InventoryRow>, StoreError> {
        sqlx::query(INVENTORY_AUDIT_SQL)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(InventoryRow {
                    sku: rows::sku(row.try_get("sku")?)?,
                    stock: row.try_get("stock")?,
                    reserved: row.try_get("reserved")?,
                    live_reserved: row.try_get("live_reserved")?,
                    adjusted_stock: row.try_get("adjusted_stock")?,
                    sold: row.try_get("sold")?,
                })
            })
            .collect()
    }
}

/// The order of a checkout that ended without payment gets its final status, and its cart may
/// be checked out again.
async fn finish_order_and_reopen_cart(
    tx: &mut Transaction<'_, Postgres>,
    checkout: &Checkout,
    status: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE orders SET status = $2, updated_at = $3 \
         WHERE id = $1 AND status IN ('pending_payment', 'payment_processing')",
    )
    .bind(checkout.order_id.uuid())
    .bind(status)
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE carts SET status = 'open', updated_at = $2 WHERE id = $1 AND status = 'checking_out'",
    )
    .bind(checkout.cart_id.uuid())
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The order of a checkout that gave its units back is cancelled, and its cart may be checked
/// out again.
async fn close_order_and_reopen_cart(
    tx: &mut Transaction<'_, Postgres>,
    orders: &[Uuid],
    carts: &[Uuid],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE orders SET status = 'cancelled', updated_at = $2 \
         WHERE id = ANY($1) AND status = 'pending_payment'",
    )
    .bind(orders)
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE carts SET status = 'open', updated_at = $2 \
         WHERE id = ANY($1) AND status = 'checking_out'",
    )
    .bind(carts)
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
