//! The embedded store: one SQLite file in the data directory. All access goes through a
//! single connection, so every transaction is serialised: a guarded `UPDATE` cannot race
//! another writer, and SQLite's busy/upgrade deadlocks between deferred transactions cannot
//! happen. Reads are microseconds, so one connection serves an embedded shop well.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::domain::{
    CaptureMethod, Cart, CartId, CartStatus, Checkout, CheckoutId, CheckoutState, Company,
    CompanyId, CompanyPrice, Customer, CustomerId, CustomerName, FlashSale, FlashSaleId, Invoice,
    InvoiceId, Money, NewCompany, NewFlashSale, NewProduct, Order, OrderId, OrderStatus, Product,
    ProductPatch, Quantity, Sku,
};

use super::group::{self, Candidate, Planned};
use super::rows::{self, row_decoders};
use super::{
    admission_in_use, all_matched, attach_lines, capture_key, capture_method_of, cart_must_be_open,
    check_patch, credit_row_sql, governing_sale, heartbeat_refused, invoice_payment, judge_misses,
    line_refund_key, on_account_checkout, on_account_terms, order_authorized_event,
    order_disputed_event, order_paid_event, order_refunded_event, order_total, page_of,
    plan_line_refund, plan_shipment, po_number_given, priced_in_lock_order, refundable,
    reserve_retrying, rules_hold, schema_is_current, shipment_captured_event, shippable, to_millis,
    unclaimed_cart, Acquisitions, ChargeTicket, CreditAuditRow, DisputeStatus, Governed, Guarded,
    IdempotencyStart, InventoryRow, Lease, LineRefundId, LineRefundStatus, LineRefundTicket,
    NewCheckout, NewLineRefund, NewShipment, Page, PricedLine, RefundedLine, Released, Retry,
    RowNow, SaleCheckout, ShipmentId, ShipmentTicket, Store, StoreError, StoreKind, StoredKey,
    WantedLine, AUTHORIZATIONS_BEFORE_SQL, CAPTURE_METHOD_SQL, CART_CHECKED_OUT_SQL, CART_SQL,
    CHECKOUT_COLUMNS, COMPANY_CAPTURE_METHOD_SQL, COMPANY_COLUMNS, COMPANY_PRICES_SQL,
    CREDIT_AUDIT_SQL, DISPUTED_ORDERS_SQL, DISPUTE_CLOSED_SQL, DISPUTE_OPENED_SQL,
    IDEMPOTENCY_CREATED, IDEMPOTENCY_RENEW, INSERT_LINE_REFUND_SQL, INSERT_PRODUCT_SQL,
    INSERT_SHIPMENT_SQL, INVENTORY_AUDIT_SQL, INVOICE_COLUMNS, INVOICE_PAID_ORDER_SQL,
    INVOICE_PAYMENT_SQL, LINE_REFUNDS_OF_PAYMENT_SQL, LINE_REFUND_COLUMNS, LINE_REFUND_ROW_SQL,
    ON_ACCOUNT_CHECKOUT_SQL, ON_ACCOUNT_CREDIT_SQL, ON_ACCOUNT_ORDER_SQL, ORDER_AUTHORIZED_SQL,
    ORDER_CAPTURED_SQL, ORDER_COLUMNS, ORDER_REFUNDED_PART_SQL, ORDER_WITH_LINES_SQL,
    OUTBOX_ORDER_PAID_SQL, PAID_ORDER_LINES_SQL, PO_NUMBER_REQUIRED_SQL, PRODUCT_COLUMNS,
    REFUNDABLE_LINES_SQL, REFUNDABLE_ORDER_SQL, REFUND_LINE_SQL, RESTOCKED_LINE_SQL, RESTOCK_SQL,
    SALE_CHECKOUTS_SQL, SETTLE_LINE_REFUND_SQL, SHIPMENT_CAPTURED_SQL, SHIPMENT_CAPTURING_SQL,
    SHIPMENT_COLUMNS, SHIPMENT_FAILED_SQL, SHIPPABLE_LINES_SQL, SHIPPABLE_ORDER_SQL, SHIP_LINE_SQL,
    SHORT_PART_SQL, SHORT_WHOLE_SQL, UPDATE_PRODUCT_SQL, UPSERT_COMPANY_PRICE_SQL,
};

mod decode {
    super::row_decoders!(sqlx::sqlite::SqliteRow);
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One read-only connection of its own for the catalogue snapshot (WAL: readers never wait
    /// for the writer), so a reload never queues behind the writes in `pool`.
    reads: SqlitePool,
    acquisitions: Acquisitions,
}

impl SqliteStore {
    /// The database file of the embedded store in `data_dir`.
    pub fn file_in(data_dir: &Path) -> PathBuf {
        data_dir.join("holdfast.db")
    }

    /// Opens (creating if needed) the database file in `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::connect(data_dir, true).await
    }

    /// Opens the database file in `data_dir` only if it exists, for a store read as it is: a
    /// mistyped directory must not leave an empty database behind.
    pub async fn open_existing(data_dir: &Path) -> Result<Self, StoreError> {
        Self::connect(data_dir, false).await
    }

    async fn connect(data_dir: &Path, create: bool) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(Self::file_in(data_dir))
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(StdDuration::from_secs(5));
        let acquisitions = Acquisitions::default();
        let pool = acquisitions
            .options(SqlitePoolOptions::new())
            .max_connections(1)
            .acquire_timeout(StdDuration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(StdDuration::from_secs(5))
            .connect_lazy_with(options.read_only(true));
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
        let tracked: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        let applied: Vec<i64> = if tracked > 0 {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        schema_is_current(&MIGRATOR, &applied)
    }

    /// The pool, for the audit and for tests that must reach under the trait.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Stamps a changed cart, reads it back and commits the change.
    async fn finish_cart_change(
        mut tx: Transaction<'_, Sqlite>,
        customer: CustomerId,
        cart: CartId,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError> {
        sqlx::query("UPDATE carts SET updated_at = $2 WHERE id = $1")
            .bind(cart.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(CART_SQL)
            .bind(cart.uuid())
            .bind(customer.uuid())
            .fetch_all(&mut *tx)
            .await?;
        let updated =
            decode::cart_of(customer, cart, &rows)?.ok_or(StoreError::NotFound("cart"))?;
        tx.commit().await?;
        Ok(updated)
    }

    /// Locks an open cart of this customer for a change of its lines.
    async fn lock_open_cart(
        tx: &mut Transaction<'_, Sqlite>,
        customer: CustomerId,
        cart: CartId,
    ) -> Result<(), StoreError> {
        let row = sqlx::query("SELECT status FROM carts WHERE id = $1 AND customer_id = $2")
            .bind(cart.uuid())
            .bind(customer.uuid())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound("cart"))?;
        cart_must_be_open(&row.try_get::<String, _>("status")?)
    }

    /// Gives the units of these checkouts' active reservations back, products in id order.
    async fn release_reservations(
        tx: &mut Transaction<'_, Sqlite>,
        checkouts: &[Uuid],
    ) -> Result<i64, StoreError> {
        let mut rows = Vec::new();
        for checkout in checkouts {
            rows.extend(
                sqlx::query(
                    "UPDATE reservations SET status = 'released' \
                     WHERE checkout_id = $1 AND status = 'active' RETURNING product_id, quantity",
                )
                .bind(checkout)
                .fetch_all(&mut **tx)
                .await?,
            );
        }
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
        tx: &mut Transaction<'_, Sqlite>,
        id: CheckoutId,
    ) -> Result<Checkout, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1"
        ))
        .bind(id.uuid())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("checkout"))?;
        decode::checkout(&row)
    }

    /// Refunded units back on the shelf, once each: the line's restocked count may not pass
    /// its refunded one, and the sale shrinks by as much as the stock grows (promise 1).
    async fn restock_units(
        tx: &mut Transaction<'_, Sqlite>,
        order: Uuid,
        checkout: Uuid,
        line: &RefundedLine,
    ) -> Result<(), StoreError> {
        let counted = sqlx::query(RESTOCKED_LINE_SQL)
            .bind(order)
            .bind(line.product_id)
            .bind(line.quantity)
            .execute(&mut **tx)
            .await?;
        if counted.rows_affected() == 0 {
            return Err(StoreError::Corrupt(format!(
                "{} restocked more than refunded",
                line.sku
            )));
        }
        let part = sqlx::query(SHORT_PART_SQL)
            .bind(checkout)
            .bind(line.product_id)
            .bind(line.quantity)
            .execute(&mut **tx)
            .await?;
        if part.rows_affected() == 0 {
            sqlx::query(SHORT_WHOLE_SQL)
                .bind(checkout)
                .bind(line.product_id)
                .bind(line.quantity)
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query(RESTOCK_SQL)
            .bind(line.product_id)
            .bind(line.quantity)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The order a shipment belongs to, with its lines.
    async fn order_of_shipment(&self, shipment: ShipmentId) -> Result<Order, StoreError> {
        let order: Uuid = sqlx::query_scalar("SELECT order_id FROM shipments WHERE id = $1")
            .bind(shipment)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("shipment"))?;
        self.admin_order(OrderId::from_uuid(order))
            .await?
            .ok_or(StoreError::NotFound("order"))
    }

    /// Sold: every active reservation of the checkout leaves `reserved` and `stock` together.
    async fn confirm_reservations(
        tx: &mut Transaction<'_, Sqlite>,
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
        tx: &mut Transaction<'_, Sqlite>,
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
    /// available (the single connection serialises this with every other writer), else leave everything as it was.
    async fn reserve_again_and_confirm(
        tx: &mut Transaction<'_, Sqlite>,
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
        for (product_id, quantity) in &wanted {
            let free: i64 =
                sqlx::query_scalar("SELECT stock - reserved FROM products WHERE id = $1")
                    .bind(product_id)
                    .fetch_one(&mut **tx)
                    .await?;
            if *quantity > free {
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

    /// One attempt of the plain reservation, in the same order as on PostgreSQL: claim, read
    /// lines with prices, write the checkout, and the guarded product updates last. Every
    /// read-back is as good as locked here (the one connection serialises all transactions),
    /// so it never finds units freed after its guard.
    async fn try_reserve_checkout(
        &self,
        new: &NewCheckout,
    ) -> Result<Result<Checkout, Retry>, StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::claim_cart(&mut tx, new).await?;
        let priced = Self::priced_lines(&mut tx, new.cart_id).await?;
        if priced.is_empty() {
            return Err(StoreError::CartEmpty);
        }
        po_number_given(new, Self::po_number_required(&mut tx, new).await?)?;
        rules_hold(&priced)?;
        let total = order_total(&priced)?;
        let governed = governing_sale(new, &priced)?;
        let row = Self::insert_checkout(&mut tx, new, &priced, total, governed).await?;
        Self::record_idempotent_checkout(&mut tx, &[new]).await?;
        match Self::reserve_lines(&mut tx, &priced).await? {
            Guarded::Reserved => {}
            // Dropping the transaction rolls back everything written above.
            Guarded::Short(short) => return Err(StoreError::InsufficientStock(short)),
            Guarded::Retry(why) => return Ok(Err(why)),
        }
        tx.commit().await?;
        decode::checkout(&row).map(Ok)
    }

    /// The named step both stores' reservations (plain and grouped) run in their transaction:
    /// each keyed start's checkout is recorded on its `Idempotency-Key` row
    /// ([`IDEMPOTENCY_CREATED`]), so the key and the reservation commit together.
    async fn record_idempotent_checkout(
        tx: &mut Transaction<'_, Sqlite>,
        granted: &[&NewCheckout],
    ) -> Result<(), StoreError> {
        for new in granted {
            if let Some(key) = &new.idempotency_key {
                sqlx::query(IDEMPOTENCY_CREATED)
                    .bind(new.customer_id.uuid())
                    .bind(key)
                    .bind(new.id.uuid())
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether the buyer's company requires a purchase-order number.
    async fn po_number_required(
        tx: &mut Transaction<'_, Sqlite>,
        new: &NewCheckout,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(PO_NUMBER_REQUIRED_SQL)
            .bind(new.customer_id.uuid())
            .fetch_one(&mut **tx)
            .await?)
    }

    /// The cart flips to checking_out first: a second checkout of it stops here.
    async fn claim_cart(
        tx: &mut Transaction<'_, Sqlite>,
        new: &NewCheckout,
    ) -> Result<(), StoreError> {
        let claimed = sqlx::query(
            "UPDATE carts SET status = 'checking_out', updated_at = $3 \
             WHERE id = $1 AND customer_id = $2 AND status = 'open'",
        )
        .bind(new.cart_id.uuid())
        .bind(new.customer_id.uuid())
        .bind(to_millis(new.now))
        .execute(&mut **tx)
        .await?;
        if claimed.rows_affected() == 1 {
            return Ok(());
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM carts WHERE id = $1 AND customer_id = $2")
                .bind(new.cart_id.uuid())
                .bind(new.customer_id.uuid())
                .fetch_optional(&mut **tx)
                .await?;
        Err(unclaimed_cart(status.as_deref()))
    }

    /// The cart's lines with the current catalogue terms for its buyer (list price, volume
    /// tiers, the company's price, ordering rules), summed per product, in lock order.
    async fn priced_lines(
        tx: &mut Transaction<'_, Sqlite>,
        cart: CartId,
    ) -> Result<Vec<PricedLine>, StoreError> {
        let lines = sqlx::query(
            "SELECT l.product_id, p.sku, l.quantity, p.price_amount, p.currency, \
             p.min_quantity, p.increment, p.max_quantity, p.price_tiers, \
             cp.amount AS company_amount, cp.percent_off, cp.tiers AS company_tiers \
             FROM cart_lines l JOIN products p ON p.id = l.product_id \
             JOIN carts c ON c.id = l.cart_id JOIN customers u ON u.id = c.customer_id \
             LEFT JOIN company_prices cp ON cp.company_id = u.company_id AND cp.product_id = p.id \
             WHERE l.cart_id = $1",
        )
        .bind(cart.uuid())
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(decode_priced_line)
        .collect::<Result<Vec<_>, StoreError>>()?;
        priced_in_lock_order(lines)
    }

    /// Order, order lines, checkout and reservations. Only the one-live-checkout-per-admission
    /// index can be violated here.
    async fn insert_checkout(
        tx: &mut Transaction<'_, Sqlite>,
        new: &NewCheckout,
        priced: &[PricedLine],
        total: Money,
        governed: Governed,
    ) -> Result<SqliteRow, StoreError> {
        let now = to_millis(new.now);
        sqlx::query(
            "INSERT INTO orders (id, customer_id, checkout_id, status, total_amount, currency, \
             created_at, updated_at, seq, po_number) VALUES ($1, $2, $3, 'pending_payment', $4, \
             $5, $6, $6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM orders), $7)",
        )
        .bind(new.order_id.uuid())
        .bind(new.customer_id.uuid())
        .bind(new.id.uuid())
        .bind(total.amount())
        .bind(total.currency().as_str())
        .bind(now)
        .bind(new.po_number.as_ref().map(|p| p.as_str()))
        .execute(&mut **tx)
        .await?;
        for line in priced {
            sqlx::query(
                "INSERT INTO order_lines (order_id, product_id, sku, quantity, unit_price, \
                 line_total) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(new.order_id.uuid())
            .bind(line.product_id)
            .bind(line.sku.as_str())
            .bind(i64::from(line.quantity.get()))
            .bind(line.unit_price.amount())
            .bind(line.line_total()?.amount())
            .execute(&mut **tx)
            .await?;
        }
        let row = sqlx::query(concat!(
            "INSERT INTO checkouts (id, customer_id, cart_id, order_id, state, total_amount, \
             currency, expires_at, max_expires_at, created_at, updated_at, flash_sale_id, \
             flash_sale_units, capture_method) \
             VALUES ($1, $2, $3, $4, 'reserved', $5, $6, $7, $8, $9, $9, $10, $11, $12) RETURNING ",
            checkout_columns!()
        ))
        .bind(new.id.uuid())
        .bind(new.customer_id.uuid())
        .bind(new.cart_id.uuid())
        .bind(new.order_id.uuid())
        .bind(total.amount())
        .bind(total.currency().as_str())
        .bind(to_millis(new.now + new.ttl))
        .bind(to_millis(new.now + new.max_lifetime))
        .bind(now)
        .bind(governed.sale.map(FlashSaleId::uuid))
        .bind(i64::from(governed.units))
        .bind(new.capture_method.as_str())
        .fetch_one(&mut **tx)
        .await
        .map_err(admission_in_use)?;
        for line in priced {
            sqlx::query(
                "INSERT INTO reservations (checkout_id, product_id, quantity, status) \
                 VALUES ($1, $2, $3, 'active')",
            )
            .bind(new.id.uuid())
            .bind(line.product_id)
            .bind(i64::from(line.quantity.get()))
            .execute(&mut **tx)
            .await?;
        }
        Ok(row)
    }

    /// One guarded statement per product, in product-id order (DESIGN §3), with the price read
    /// earlier in the guard; a line that does not match is read back to say why.
    async fn reserve_lines(
        tx: &mut Transaction<'_, Sqlite>,
        priced: &[PricedLine],
    ) -> Result<Guarded, StoreError> {
        let mut misses = Vec::new();
        for line in priced {
            let updated = sqlx::query(
                "UPDATE products SET reserved = reserved + $2 \
                 WHERE id = $1 AND stock - reserved >= $2 AND price_amount = $3 AND currency = $4",
            )
            .bind(line.product_id)
            .bind(i64::from(line.quantity.get()))
            .bind(line.list_price.amount())
            .bind(line.list_price.currency().as_str())
            .execute(&mut **tx)
            .await?;
            if updated.rows_affected() == 0 {
                let row = sqlx::query(
                    "SELECT stock - reserved AS available, price_amount, currency \
                     FROM products WHERE id = $1",
                )
                .bind(line.product_id)
                .fetch_one(&mut **tx)
                .await?;
                misses.push((line, decode_row_now(&row)?));
            }
        }
        Ok(judge_misses(&misses))
    }

    /// The whole batch in one transaction (the single connection serialises it): read every
    /// cart, its priced lines and what is free, decide in arrival order, write the granted
    /// checkouts and reserve each product once, under one commit.
    async fn try_reserve_group(
        &self,
        batch: &[NewCheckout],
    ) -> Result<Vec<Result<Checkout, StoreError>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut candidates = Vec::with_capacity(batch.len());
        let mut available = HashMap::new();
        for new in batch {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM carts WHERE id = $1 AND customer_id = $2")
                    .bind(new.cart_id.uuid())
                    .bind(new.customer_id.uuid())
                    .fetch_optional(&mut *tx)
                    .await?;
            let cart = match status.as_deref() {
                None => Err(StoreError::NotFound("cart")),
                Some(status) => cart_must_be_open(status),
            };
            let (lines, po_number_required) = match cart {
                Ok(()) => (
                    Self::priced_lines(&mut tx, new.cart_id).await?,
                    Self::po_number_required(&mut tx, new).await?,
                ),
                Err(_) => (Vec::new(), false),
            };
            for line in &lines {
                if let Entry::Vacant(slot) = available.entry(line.product_id) {
                    let free: i64 =
                        sqlx::query_scalar("SELECT stock - reserved FROM products WHERE id = $1")
                            .bind(line.product_id)
                            .fetch_one(&mut *tx)
                            .await?;
                    slot.insert(free);
                }
            }
            candidates.push(Candidate {
                cart,
                lines,
                po_number_required,
            });
        }
        let plan = group::plan(batch, candidates, &available);
        let mut written = HashMap::new();
        for (new, outcome) in batch.iter().zip(&plan.outcomes) {
            if let Planned::Grant {
                lines,
                total,
                governed,
            } = outcome
            {
                Self::claim_cart(&mut tx, new).await?;
                let row = Self::insert_checkout(&mut tx, new, lines, *total, *governed).await?;
                Self::record_idempotent_checkout(&mut tx, &[new]).await?;
                let checkout = decode::checkout(&row)?;
                written.insert(checkout.id, checkout);
            }
        }
        for (product_id, quantity) in &plan.reserve {
            let updated = sqlx::query(
                "UPDATE products SET reserved = reserved + $2 \
                 WHERE id = $1 AND stock - reserved >= $2",
            )
            .bind(product_id)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
            all_matched(updated.rows_affected(), 1)?;
        }
        tx.commit().await?;
        Ok(group::answers(batch, plan, written))
    }

    async fn order_lines(
        &self,
        customer: CustomerId,
        seq_from: i64,
        seq_to: i64,
    ) -> Result<Vec<(OrderId, crate::domain::OrderLine)>, StoreError> {
        sqlx::query(super::ORDER_LINES_PAGE_SQL)
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

/// A cart line with its product's terms for the buyer (the columns of `priced_lines`).
fn decode_priced_line(row: &SqliteRow) -> Result<(WantedLine, super::LineTerms), StoreError> {
    let company_tiers: Option<String> = row.try_get("company_tiers")?;
    Ok((
        WantedLine {
            product_id: row.try_get("product_id")?,
            sku: rows::sku(row.try_get("sku")?)?,
            quantity: row.try_get("quantity")?,
        },
        super::LineTerms {
            list_price: rows::money(row.try_get("price_amount")?, row.try_get("currency")?)?,
            tiers: rows::tiers(row.try_get("price_tiers")?)?,
            company: rows::company_price(
                row.try_get("company_amount")?,
                row.try_get("percent_off")?,
                company_tiers.as_deref(),
            )?,
            rules: rows::rules(
                row.try_get("min_quantity")?,
                row.try_get("increment")?,
                row.try_get("max_quantity")?,
            )?,
        },
    ))
}

fn decode_row_now(row: &SqliteRow) -> Result<RowNow, StoreError> {
    Ok(RowNow {
        available: row.try_get("available")?,
        unit_price: rows::money(row.try_get("price_amount")?, row.try_get("currency")?)?,
    })
}

/// The company credit columns of [`credit_row_sql`].
fn decode_credit(row: &SqliteRow) -> Result<super::CreditRow, StoreError> {
    Ok(super::CreditRow {
        company: CompanyId::from_uuid(row.try_get("id")?),
        terms: row.try_get("payment_terms")?,
        currency: row.try_get("currency")?,
        limit: row.try_get("credit_limit")?,
        outstanding: row.try_get("credit_outstanding")?,
        overdue_invoices: row.try_get("overdue_invoices")?,
    })
}

fn checkout_state(row: &SqliteRow) -> Result<CheckoutState, StoreError> {
    let state: String = row.try_get("state")?;
    CheckoutState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("state {state:?}")))
}

wholesale_store_methods!(
    SqliteStore,
    lock: "",
    credit_lock: "",
    insert_invoice: "INSERT INTO invoices (id, number, company_id, order_id, amount, currency, \
         status, due_at, created_at, updated_at) VALUES ($1, \
         (SELECT COALESCE(MAX(number), 0) + 1 FROM invoices), $2, $3, $4, $5, 'open', $6, $7, \
         $7) RETURNING {}",
);

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
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
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1"
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
        let rows = sqlx::query(CART_SQL)
            .bind(cart.uuid())
            .bind(customer.uuid())
            .fetch_all(&self.pool)
            .await?;
        decode::cart_of(customer, cart, &rows)
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
        // The product's id is looked up by the insert itself: nothing inserted, no such SKU.
        let upserted = sqlx::query(
            "INSERT INTO cart_lines (cart_id, product_id, quantity) \
             SELECT $1, id, $3 FROM products WHERE sku = $2 \
             ON CONFLICT (cart_id, product_id) DO UPDATE SET quantity = excluded.quantity",
        )
        .bind(cart.uuid())
        .bind(sku.as_str())
        .bind(i64::from(quantity.get()))
        .execute(&mut *tx)
        .await?;
        if upserted.rows_affected() == 0 {
            return Err(StoreError::NotFound("product"));
        }
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
        reserve_retrying(|_| self.try_reserve_checkout(new)).await
    }

    #[tracing::instrument(skip_all, fields(size = batch.len()))]
    async fn reserve_checkouts(&self, batch: &[NewCheckout]) -> Vec<Result<Checkout, StoreError>> {
        if batch.len() < 2 {
            return group::one_by_one(self, batch).await;
        }
        match self.try_reserve_group(batch).await {
            Ok(answers) => answers,
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
            "UPDATE checkouts SET expires_at = MIN($3 + $4, max_expires_at), \
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
            None => Err(heartbeat_refused(
                self.checkout(customer, id).await?.map(|c| c.state),
            )),
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
            "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1 AND customer_id = $2"
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
                          ORDER BY expires_at LIMIT $2) \
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
             WHERE id = $1 AND customer_id = $2"
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
        sqlx::query(super::outbox_insert_sql!("order.paid"))
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
    async fn record_charge_authorized(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        amount: i64,
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
                    // Units gone: the authorization is due back (cancelled at the gateway).
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
        sqlx::query(ORDER_AUTHORIZED_SQL)
            .bind(current.order_id.uuid())
            .bind(payment_intent_id)
            .bind(amount)
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
        let authorized = decode::checkout(&row)?;
        let lines = sqlx::query(
            "SELECT ol.order_id, ol.sku, ol.quantity, ol.unit_price, ol.line_total, o.currency \
             FROM order_lines ol JOIN orders o ON o.id = ol.order_id WHERE o.id = $1 ORDER BY ol.sku",
        )
        .bind(current.order_id.uuid())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(decode::order_line)
        .collect::<Result<Vec<_>, _>>()?;
        let event = order_authorized_event(&authorized, payment_intent_id, amount, lines, now);
        sqlx::query(super::outbox_insert_sql!("order.authorized"))
            .bind(event.event_id)
            .bind(authorized.order_id.uuid())
            .bind(&event.payload)
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(authorized)
    }

    async fn capture_method(&self, id: CheckoutId) -> Result<CaptureMethod, StoreError> {
        let raw: Option<String> = sqlx::query_scalar(CAPTURE_METHOD_SQL)
            .bind(id.uuid())
            .fetch_optional(&self.pool)
            .await?;
        capture_method_of(raw)
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
               ORDER BY lease_until NULLS FIRST LIMIT $4) \
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
        let order_status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
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
        let rows = sqlx::query(super::claim_pending_refunds_sql!(""))
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
        let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
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

    #[tracing::instrument(skip_all, fields(order_id = %new.order))]
    async fn begin_shipment(&self, new: &NewShipment) -> Result<ShipmentTicket, StoreError> {
        let mut tx = self.pool.begin().await?;
        let order = sqlx::query(SHIPPABLE_ORDER_SQL)
            .bind(new.order.uuid())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("order"))?;
        let status: String = order.try_get("status")?;
        shippable(&status)?;
        let checkout: Uuid = order.try_get("checkout_id")?;
        let payment_intent_id: Option<String> = order.try_get("payment_intent_id")?;
        let payment_intent_id = payment_intent_id
            .ok_or_else(|| StoreError::Corrupt("an authorized order without a payment".into()))?;
        let captured_before: i64 = order.try_get("captured_amount")?;
        let capturing: i64 = sqlx::query_scalar(SHIPMENT_CAPTURING_SQL)
            .bind(new.order.uuid())
            .fetch_one(&mut *tx)
            .await?;
        if capturing > 0 {
            return Err(StoreError::ShipmentInProgress);
        }
        let lines = sqlx::query(SHIPPABLE_LINES_SQL)
            .bind(new.order.uuid())
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(decode::shippable_line)
            .collect::<Result<Vec<_>, _>>()?;
        let plan = plan_shipment(&lines, &new.lines, new.last)?;
        let key = capture_key(new.id);
        let lines_json = serde_json::to_string(&plan.lines)
            .map_err(|e| StoreError::Corrupt(format!("shipment lines: {e}")))?;
        sqlx::query(INSERT_SHIPMENT_SQL)
            .bind(new.id)
            .bind(new.order.uuid())
            .bind(plan.amount)
            .bind(plan.final_capture)
            .bind(&key)
            .bind(&lines_json)
            .bind(to_millis(new.lease_until))
            .bind(to_millis(new.now))
            .execute(&mut *tx)
            .await?;
        for line in &plan.lines {
            sqlx::query(SHIP_LINE_SQL)
                .bind(new.order.uuid())
                .bind(line.product_id)
                .bind(line.quantity)
                .bind(line.short)
                .execute(&mut *tx)
                .await?;
            if line.short > 0 {
                let part = sqlx::query(SHORT_PART_SQL)
                    .bind(checkout)
                    .bind(line.product_id)
                    .bind(line.short)
                    .execute(&mut *tx)
                    .await?;
                if part.rows_affected() == 0 {
                    sqlx::query(SHORT_WHOLE_SQL)
                        .bind(checkout)
                        .bind(line.product_id)
                        .bind(line.short)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(RESTOCK_SQL)
                    .bind(line.product_id)
                    .bind(line.short)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(ShipmentTicket {
            id: new.id,
            order_id: new.order,
            payment_intent_id,
            amount: plan.amount,
            final_capture: plan.final_capture,
            captured_before,
            capture_key: key,
        })
    }

    #[tracing::instrument(skip_all, fields(%shipment))]
    async fn record_shipment_captured(
        &self,
        shipment: ShipmentId,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError> {
        let mut tx = self.pool.begin().await?;
        let settled = sqlx::query(SHIPMENT_CAPTURED_SQL)
            .bind(shipment)
            .bind(to_millis(now))
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = settled {
            let order: Uuid = row.try_get("order_id")?;
            let amount: i64 = row.try_get("amount")?;
            let final_capture: bool = row.try_get("final_capture")?;
            sqlx::query(ORDER_CAPTURED_SQL)
                .bind(order)
                .bind(amount)
                .bind(final_capture)
                .bind(to_millis(now))
                .execute(&mut *tx)
                .await?;
            let currency: String = sqlx::query_scalar("SELECT currency FROM orders WHERE id = $1")
                .bind(order)
                .fetch_one(&mut *tx)
                .await?;
            let event = shipment_captured_event(
                shipment,
                OrderId::from_uuid(order),
                amount,
                final_capture,
                &currency,
                now,
            );
            // Keyed by the shipment: one event per shipment, whoever records it first.
            sqlx::query(super::outbox_insert_sql!("order.shipment_captured"))
                .bind(event.event_id)
                .bind(shipment)
                .bind(&event.payload)
                .bind(to_millis(now))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.order_of_shipment(shipment).await
    }

    async fn record_shipment_failed(
        &self,
        shipment: ShipmentId,
        failure: &str,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError> {
        let mut tx = self.pool.begin().await?;
        let lines: Option<String> = sqlx::query_scalar(SHIPMENT_FAILED_SQL)
            .bind(shipment)
            .bind(failure)
            .bind(to_millis(now))
            .fetch_optional(&mut *tx)
            .await?;
        for (sku, units) in super::shipped_units(lines.as_deref().unwrap_or("[]"))? {
            sqlx::query(super::UNSHIP_LINE_SQL)
                .bind(shipment)
                .bind(sku)
                .bind(units)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.order_of_shipment(shipment).await
    }

    async fn claim_stalled_shipments(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<ShipmentTicket>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(super::claim_stalled_shipments_sql!(""))
            .bind(to_millis(lease.until))
            .bind(to_millis(lease.now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let mut tickets = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&format!(
                "SELECT {SHIPMENT_COLUMNS} FROM shipments s JOIN orders o ON o.id = s.order_id \
                 WHERE s.id = $1"
            ))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
            tickets.push(decode::shipment_ticket(&row)?);
        }
        Ok(tickets)
    }

    async fn authorizations_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OrderId>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(AUTHORIZATIONS_BEFORE_SQL)
            .bind(to_millis(before))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().map(OrderId::from_uuid).collect())
    }

    #[tracing::instrument(skip_all, fields(order_id = %new.order))]
    async fn begin_line_refund(&self, new: &NewLineRefund) -> Result<LineRefundTicket, StoreError> {
        let mut tx = self.pool.begin().await?;
        let order = sqlx::query(REFUNDABLE_ORDER_SQL)
            .bind(new.order.uuid())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("order"))?;
        let status: String = order.try_get("status")?;
        refundable(&status)?;
        let payment_intent_id: String = order
            .try_get::<Option<String>, _>("payment_intent_id")?
            .ok_or_else(|| StoreError::Corrupt("a paid order without a payment".into()))?;
        let authorized: Option<i64> = order.try_get("authorized_amount")?;
        let captured = match authorized {
            Some(_) => order.try_get("captured_amount")?,
            None => order.try_get("total_amount")?,
        };
        let refunded: i64 = order.try_get("refunded_amount")?;
        let in_flight: i64 = order.try_get("in_flight")?;
        let lines = sqlx::query(REFUNDABLE_LINES_SQL)
            .bind(new.order.uuid())
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(decode::refundable_line)
            .collect::<Result<Vec<_>, _>>()?;
        let (planned, amount) = plan_line_refund(
            &lines,
            (!new.rest).then_some(new.lines.as_slice()),
            authorized.is_some(),
            captured,
            refunded + in_flight,
        )?;
        let key = line_refund_key(new.id);
        let lines_json = serde_json::to_string(&planned)
            .map_err(|e| StoreError::Corrupt(format!("refund lines: {e}")))?;
        sqlx::query(INSERT_LINE_REFUND_SQL)
            .bind(new.id)
            .bind(new.order.uuid())
            .bind(amount)
            .bind(&lines_json)
            .bind(new.restock)
            .bind(&key)
            .bind(to_millis(new.lease_until))
            .bind(to_millis(new.now))
            .execute(&mut *tx)
            .await?;
        for line in &planned {
            sqlx::query(REFUND_LINE_SQL)
                .bind(new.order.uuid())
                .bind(line.product_id)
                .bind(line.quantity)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(LineRefundTicket {
            id: new.id,
            order_id: new.order,
            payment_intent_id,
            amount,
            refund_key: key,
        })
    }

    #[tracing::instrument(skip_all, fields(refund = %id))]
    async fn record_line_refund(
        &self,
        id: LineRefundId,
        status: LineRefundStatus,
        gateway_refund_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(LINE_REFUND_ROW_SQL)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("refund"))?;
        let order: Uuid = row.try_get("order_id")?;
        let current: String = row.try_get("status")?;
        let settled = matches!(current.as_str(), "succeeded" | "failed");
        let next = match status {
            _ if settled => current.clone(),
            LineRefundStatus::Pending => "pending".to_owned(),
            LineRefundStatus::Succeeded => "succeeded".to_owned(),
            LineRefundStatus::Failed => "failed".to_owned(),
        };
        sqlx::query(SETTLE_LINE_REFUND_SQL)
            .bind(id)
            .bind(&next)
            .bind(gateway_refund_id)
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        if !settled && next != "pending" {
            let amount: i64 = row.try_get("amount")?;
            let restock: bool = row.try_get("restock")?;
            let checkout: Uuid = row.try_get("checkout_id")?;
            let currency: String = row.try_get("currency")?;
            let raw: String = row.try_get("lines")?;
            let lines: Vec<RefundedLine> = serde_json::from_str(&raw)
                .map_err(|e| StoreError::Corrupt(format!("refund lines: {e}")))?;
            if next == "failed" {
                for line in &lines {
                    sqlx::query(REFUND_LINE_SQL)
                        .bind(order)
                        .bind(line.product_id)
                        .bind(-line.quantity)
                        .execute(&mut *tx)
                        .await?;
                }
            } else {
                sqlx::query(ORDER_REFUNDED_PART_SQL)
                    .bind(order)
                    .bind(amount)
                    .bind(to_millis(now))
                    .execute(&mut *tx)
                    .await?;
                if restock {
                    for line in &lines {
                        Self::restock_units(&mut tx, order, checkout, line).await?;
                    }
                }
                let event = order_refunded_event(
                    id,
                    OrderId::from_uuid(order),
                    amount,
                    &currency,
                    &lines,
                    now,
                );
                sqlx::query(super::outbox_insert_sql!("order.refunded"))
                    .bind(event.event_id)
                    .bind(id)
                    .bind(&event.payload)
                    .bind(to_millis(now))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.admin_order(OrderId::from_uuid(order))
            .await?
            .ok_or(StoreError::NotFound("order"))
    }

    async fn line_refunds_of_payment(
        &self,
        payment_intent_id: &str,
    ) -> Result<Option<(i64, Vec<(LineRefundId, i64)>)>, StoreError> {
        let rows = sqlx::query(LINE_REFUNDS_OF_PAYMENT_SQL)
            .bind(payment_intent_id)
            .fetch_all(&self.pool)
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let refunded: i64 = first.try_get("refunded_amount")?;
        let mut open = Vec::new();
        for row in &rows {
            let status: String = row.try_get("status")?;
            if matches!(status.as_str(), "requested" | "pending") {
                open.push((row.try_get("id")?, row.try_get("amount")?));
            }
        }
        Ok(Some((refunded, open)))
    }

    async fn line_refund_by_gateway_id(
        &self,
        gateway_refund_id: &str,
    ) -> Result<Option<LineRefundId>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM order_refunds WHERE gateway_refund_id = $1")
                .bind(gateway_refund_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn claim_stalled_line_refunds(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<LineRefundTicket>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(super::claim_stalled_line_refunds_sql!(""))
            .bind(to_millis(lease.until))
            .bind(to_millis(lease.now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let mut tickets = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&format!(
                "SELECT {LINE_REFUND_COLUMNS} FROM order_refunds r \
                 JOIN orders o ON o.id = r.order_id WHERE r.id = $1"
            ))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
            tickets.push(LineRefundTicket {
                id: row.try_get("id")?,
                order_id: OrderId::from_uuid(row.try_get("order_id")?),
                payment_intent_id: row
                    .try_get::<Option<String>, _>("payment_intent_id")?
                    .ok_or_else(|| StoreError::Corrupt("a refund of an unpaid order".into()))?,
                amount: row.try_get("amount")?,
                refund_key: row.try_get("refund_key")?,
            });
        }
        Ok(tickets)
    }

    #[tracing::instrument(skip_all, fields(%dispute_id))]
    async fn record_dispute(
        &self,
        payment_intent_id: &str,
        dispute_id: &str,
        status: DisputeStatus,
        now: DateTime<Utc>,
    ) -> Result<Option<Order>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = match status {
            DisputeStatus::Open => {
                sqlx::query(DISPUTE_OPENED_SQL)
                    .bind(payment_intent_id)
                    .bind(dispute_id)
                    .bind(to_millis(now))
                    .fetch_optional(&mut *tx)
                    .await?
            }
            DisputeStatus::Won | DisputeStatus::Lost => {
                sqlx::query(DISPUTE_CLOSED_SQL)
                    .bind(payment_intent_id)
                    .bind(dispute_id)
                    .bind(to_millis(now))
                    .bind(if status == DisputeStatus::Lost {
                        "lost"
                    } else {
                        "won"
                    })
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        if let (Some(row), DisputeStatus::Open) = (&changed, status) {
            let order = OrderId::from_uuid(row.try_get("id")?);
            let event = order_disputed_event(order, dispute_id, payment_intent_id, now);
            sqlx::query(super::outbox_insert_sql!("order.disputed"))
                .bind(event.event_id)
                .bind(order.uuid())
                .bind(&event.payload)
                .bind(to_millis(now))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let order: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM orders WHERE payment_intent_id = $1")
                .bind(payment_intent_id)
                .fetch_optional(&self.pool)
                .await?;
        match order {
            Some(id) => self.admin_order(OrderId::from_uuid(id)).await,
            None => Ok(None),
        }
    }

    async fn disputed_orders(&self, limit: u32) -> Result<Vec<OrderId>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(DISPUTED_ORDERS_SQL)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().map(OrderId::from_uuid).collect())
    }

    async fn claim_pending_line_refunds(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<(LineRefundId, String)>, StoreError> {
        let rows = sqlx::query(super::claim_pending_line_refunds_sql!(""))
            .bind(to_millis(lease.until))
            .bind(to_millis(lease.now))
            .bind(i64::from(limit))
            .bind(to_millis(settled_before))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("gateway_refund_id")?)))
            .collect()
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
             checkout_id FROM idempotency_keys WHERE customer_id = $1 AND idem_key = $2",
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
        let row =
            sqlx::query("SELECT id, stock - reserved AS available FROM products WHERE sku = $1")
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
        let rows = sqlx::query(ORDER_WITH_LINES_SQL)
            .bind(id.uuid())
            .bind(customer.uuid())
            .fetch_all(&self.pool)
            .await?;
        decode::order_of(&rows)
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
        let rows = sqlx::query(&super::orders_page_sql())
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
    tx: &mut Transaction<'_, Sqlite>,
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
    tx: &mut Transaction<'_, Sqlite>,
    orders: &[Uuid],
    carts: &[Uuid],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for order in orders {
        sqlx::query(
            "UPDATE orders SET status = 'cancelled', updated_at = $2 \
             WHERE id = $1 AND status = 'pending_payment'",
        )
        .bind(order)
        .bind(to_millis(now))
        .execute(&mut **tx)
        .await?;
    }
    for cart in carts {
        sqlx::query(
            "UPDATE carts SET status = 'open', updated_at = $2 \
             WHERE id = $1 AND status = 'checking_out'",
        )
        .bind(cart)
        .bind(to_millis(now))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
