//! Persistence. One trait, two implementations (PostgreSQL for production, SQLite for the
//! embedded shape) with the same methods in the same order. Each method is one atomic phase:
//! one transaction that performs its effect and records the new state together (DESIGN §3).
//! SQL lives only here.

/// The checkout columns as a literal, so hot-path statements can be `concat!`ed into static
/// strings (sqlx keeps one prepared statement per distinct text and connection).
macro_rules! checkout_columns {
    () => {
        "id, customer_id, cart_id, order_id, state, total_amount, currency, expires_at, \
         max_expires_at, created_at, attempt, payment_intent_id, client_secret, decline_code, \
         payment_method, refund_due, flash_sale_id, flash_sale_units"
    };
}

/// The flash-sale columns, as a literal for `concat!`.
macro_rules! flash_sale_columns {
    () => {
        "id, sku, units, starts_at, ends_at, reservation_ttl_ms, max_per_buyer"
    };
}

#[macro_use]
mod wholesale;

mod group;
mod ops;
mod ops_postgres;
mod ops_sqlite;
mod outbox;
mod outbox_postgres;
mod outbox_sqlite;
mod pool;
mod postgres;
mod rows;
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use std::collections::HashMap;

use crate::domain::{
    CaptureMethod, Cart, CartId, CartStatus, Checkout, CheckoutId, CheckoutState, Company,
    CompanyId, CompanyPrice, Customer, CustomerId, CustomerName, FlashSale, FlashSaleId,
    MoneyError, NewCompany, NewFlashSale, NewProduct, Order, OrderId, OrderLine, OrderingRules,
    PriceTiers, Product, ProductPatch, Quantity, RuleBreach, Sku,
};

pub use ops::{FailureRow, FlashSaleRow, OpsStore};
pub use outbox::{OutboxEvent, OutboxLag, OutboxStore};
pub use pool::Acquisitions;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Postgres,
    Sqlite,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgres",
            StoreKind::Sqlite => "sqlite",
        }
    }
}

/// What the caller needs to know, not which library failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("sku is already in the catalogue")]
    SkuTaken,
    /// Ordering rules that no quantity could meet, or broken price tiers.
    #[error("{0}")]
    InvalidProduct(String),
    /// A line breaks its product's ordering rules as they are at the reservation (they changed
    /// since the line was set): nothing was reserved.
    #[error("the ordering rules of a line changed")]
    RulesChanged(Vec<RuleBreach>),
    /// The buyer's company requires a purchase-order number on every checkout.
    #[error("a po_number is required")]
    PoNumberRequired,
    /// The customer buys for no company with net terms (or in another currency).
    #[error("this customer cannot buy on account")]
    OnAccountNotAvailable,
    /// The company has an invoice past its due date: no further orders on account.
    #[error("the company has overdue invoices")]
    InvoicesOverdue,
    #[error("the order would take the company past its credit limit")]
    CreditLimitExceeded(CreditShort),
    #[error("a payment of {amount} exceeds the invoice's balance of {balance}")]
    PaymentExceedsBalance { amount: i64, balance: i64 },
    #[error("the product changed: current version is {current}")]
    VersionMismatch { current: i64 },
    #[error("stock {stock} would be below the {reserved} units reserved")]
    StockBelowReserved { stock: i64, reserved: i64 },
    #[error("not enough stock")]
    InsufficientStock(Vec<Shortfall>),
    #[error("the cart is {0:?}")]
    CartNotOpen(CartStatus),
    #[error("the cart is empty")]
    CartEmpty,
    #[error("the checkout's reservation has expired")]
    CheckoutExpired,
    #[error("the checkout is {0:?}")]
    CheckoutState(CheckoutState),
    #[error("a payment for this checkout is in progress")]
    ChargeInProgress,
    #[error("the order is {0:?}")]
    OrderState(crate::domain::OrderStatus),
    /// A shipment of the order is still capturing; recovery finishes it.
    #[error("a shipment of this order is being captured")]
    ShipmentInProgress,
    /// The shipment does not fit the order: an unknown SKU, more units than are left to ship,
    /// or nothing to ship.
    #[error("{0}")]
    BadShipment(String),
    /// The partial refund does not fit the order: an unknown SKU, more units than are
    /// refundable, more money than was captured, or nothing to refund.
    #[error("{0}")]
    BadRefund(String),
    #[error("this flash-sale admission already holds a live checkout")]
    AdmissionInUse,
    /// A line of a sale's SKU without that sale's admission (the cart changed after the gate
    /// decided, or no token was given): nothing was reserved.
    #[error("this cart holds a flash-sale item: a valid admission token is required")]
    AdmissionRequired,
    #[error("a checkout may hold items of one flash sale only")]
    OneSalePerCheckout,
    /// The sale SKU's line asks for more units than the buyer may have.
    #[error("more units of a flash-sale item than this buyer may have")]
    FlashSaleLimit(SaleLimit),
    /// The catalogue price of a line changed again and again while the checkout was being
    /// reserved; nothing was reserved and the customer may simply try again.
    #[error("a price changed while checking out")]
    PriceChanged,
    #[error("a flash sale of this SKU is open or planned")]
    SaleExists,
    #[error("a sale of {units} units exceeds the {available} available")]
    UnitsExceedAvailable { units: u32, available: i64 },
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// Opened as it is (no migrations run), the database lacks migrations this binary needs.
    #[error(
        "the database schema is behind this binary ({applied} of {known} migrations applied); \
         run `holdfast migrate` first"
    )]
    SchemaBehind { applied: usize, known: usize },
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if pool::is_connection_failure(&e) {
            // A lost connection is the database being unreachable for this request (503), not
            // a fault of ours; and the pool's other connections are checked before they are used.
            pool::note_connection_failure();
            return StoreError::Unavailable(e.to_string());
        }
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Database(other),
        }
    }
}

/// One line a checkout could not reserve, as shown to the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    pub sku: Sku,
    pub requested: u32,
    pub available: i64,
}

/// A company's credit when an order on account would pass its limit, as shown to the buyer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditShort {
    pub limit: i64,
    pub outstanding: i64,
    pub requested: i64,
}

/// A company's credit as the on-account phase reads it under the company's row lock.
#[derive(Debug, Clone)]
pub(crate) struct CreditRow {
    pub company: CompanyId,
    pub terms: String,
    pub currency: String,
    pub limit: i64,
    pub outstanding: i64,
    pub overdue_invoices: i64,
}

/// Whether an order of `total` may be placed on account, and the days its invoice is due in:
/// net terms in the order's currency, no overdue invoice, and the open balance plus the order
/// within the limit (read under the company's lock, so the verdict holds until the commit).
pub(crate) fn on_account_terms(
    credit: Option<&CreditRow>,
    total: crate::domain::Money,
) -> Result<i64, StoreError> {
    let credit = credit.ok_or(StoreError::OnAccountNotAvailable)?;
    let days = crate::domain::PaymentTerms::parse(&credit.terms)
        .ok_or_else(|| StoreError::Corrupt(format!("payment terms {:?}", credit.terms)))?
        .days()
        .ok_or(StoreError::OnAccountNotAvailable)?;
    if credit.currency != total.currency().as_str() {
        return Err(StoreError::OnAccountNotAvailable);
    }
    if credit.overdue_invoices > 0 {
        return Err(StoreError::InvoicesOverdue);
    }
    let fits = credit
        .outstanding
        .checked_add(total.amount())
        .is_some_and(|after| after <= credit.limit);
    if !fits {
        return Err(StoreError::CreditLimitExceeded(CreditShort {
            limit: credit.limit,
            outstanding: credit.outstanding,
            requested: total.amount(),
        }));
    }
    Ok(days)
}

/// The buyer's company credit (both stores; PostgreSQL appends its row lock): `$1` customer,
/// `$2` now (invoices due before it are overdue).
macro_rules! credit_row_sql {
    ($lock:literal) => {
        concat!(
            "SELECT co.id, co.payment_terms, co.currency, co.credit_limit, co.credit_outstanding, \
             (SELECT COUNT(*) FROM invoices i WHERE i.company_id = co.id AND i.status = 'open' \
                AND i.due_at < $2) AS overdue_invoices \
             FROM companies co WHERE co.id = (SELECT company_id FROM customers WHERE id = $1) ",
            $lock
        )
    };
}
pub(crate) use credit_row_sql;

pub(crate) const INVOICE_COLUMNS: &str = "id, number, company_id, order_id, amount, currency, \
     paid_amount, status, due_at, created_at";

/// Open invoices due before `$1`, oldest due first, at most `$2` (both stores).
pub(crate) const OVERDUE_INVOICES_SQL: &str = "SELECT id, number, company_id, order_id, amount, \
     currency, paid_amount, status, due_at, created_at FROM invoices \
     WHERE status = 'open' AND due_at < $1 ORDER BY due_at LIMIT $2";

/// Credit per company for the audit: limit, open balance, what its open invoices still owe,
/// and how many of its invoices disagree with their order about a refund.
pub(crate) const CREDIT_AUDIT_SQL: &str = "SELECT co.id, co.credit_limit, co.credit_outstanding, \
     CAST(COALESCE((SELECT SUM(i.amount - i.paid_amount) FROM invoices i \
        WHERE i.company_id = co.id AND i.status = 'open'), 0) AS BIGINT) AS invoiced, \
     CAST((SELECT COUNT(*) FROM invoices i JOIN orders o ON o.id = i.order_id \
        WHERE i.company_id = co.id AND (i.status = 'void') <> (o.status = 'refunded')) \
        AS BIGINT) AS voids_astray \
     FROM companies co ORDER BY co.id";

/// An order line with the ordering rules its product had when it was reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRulesRow {
    pub order_id: OrderId,
    pub sku: Sku,
    pub quantity: u32,
    pub rules: OrderingRules,
}

/// Lines outside their recorded rules (both stores; lines from before rules were recorded
/// have none and are left out).
pub(crate) const LINE_RULES_AUDIT_SQL: &str = "SELECT order_id, sku, quantity, min_quantity, \
     increment, max_quantity FROM order_lines WHERE min_quantity IS NOT NULL \
     AND (quantity < min_quantity OR quantity % increment <> 0 OR quantity > max_quantity) \
     ORDER BY order_id, sku LIMIT 1000";

/// A company's credit as the audit reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditAuditRow {
    pub company: CompanyId,
    pub limit: i64,
    pub outstanding: i64,
    /// What its invoices still owe.
    pub invoiced: i64,
    /// Invoices void while their order is not refunded, or not void while it is.
    pub voids_astray: i64,
}

/// A checkout may be completed on account only while its reservation is live, and not one of
/// a flash sale (whose admissions are settled by card payments).
pub(crate) fn on_account_checkout(
    current: &Checkout,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if current.flash_sale_id.is_some() {
        return Err(StoreError::OnAccountNotAvailable);
    }
    if current.state != CheckoutState::Reserved {
        return Err(StoreError::CheckoutState(current.state));
    }
    if current.expires_at <= now {
        return Err(StoreError::CheckoutExpired);
    }
    Ok(())
}

/// A payment against an invoice: only an open one, at most its balance.
pub(crate) fn invoice_payment(
    invoice: &crate::domain::Invoice,
    amount: i64,
) -> Result<(), StoreError> {
    if invoice.status != "open" || amount > invoice.balance() {
        return Err(StoreError::PaymentExceedsBalance {
            amount,
            balance: invoice.balance(),
        });
    }
    Ok(())
}

/// The outbox row of one event of `$topic` (`$1` event id, `$2` the row's key: the order, or
/// the shipment, refund or dispute an event is one of, `$3` payload, `$4` time): written at
/// most once per topic and key, whoever records it first. The one statement every store
/// phase that emits an event uses.
macro_rules! outbox_insert_sql {
    ($topic:literal) => {
        concat!(
            "INSERT INTO outbox (event_id, topic, order_id, payload, created_at) VALUES ($1, '",
            $topic,
            "', $2, $3, $4) ON CONFLICT (topic, order_id) DO NOTHING"
        )
    };
}
pub(crate) use outbox_insert_sql;

/// The on-account phase's writes, the same text in both stores.
pub(crate) const ON_ACCOUNT_CREDIT_SQL: &str =
    "UPDATE companies SET credit_outstanding = credit_outstanding + $2 WHERE id = $1";
pub(crate) const ON_ACCOUNT_ORDER_SQL: &str = "UPDATE orders SET status = \
     'awaiting_payment_on_terms', invoice_id = $2, updated_at = $3 WHERE id = $1";
pub(crate) const ON_ACCOUNT_CHECKOUT_SQL: &str = concat!(
    "UPDATE checkouts SET state = 'completed', payment_method = 'on_account', \
     lease_owner = NULL, lease_until = NULL, updated_at = $2 WHERE id = $1 RETURNING ",
    checkout_columns!()
);
pub(crate) const CART_CHECKED_OUT_SQL: &str =
    "UPDATE carts SET status = 'checked_out', updated_at = $2 WHERE id = $1";
pub(crate) const OUTBOX_ORDER_PAID_SQL: &str = outbox_insert_sql!("order.paid");
/// A payment against an invoice (`$2` the amount): paid in full, it is `paid`.
pub(crate) const INVOICE_PAYMENT_SQL: &str = "UPDATE invoices SET paid_amount = paid_amount + $2, \
     status = CASE WHEN paid_amount + $2 = amount THEN 'paid' ELSE 'open' END, updated_at = $3 \
     WHERE id = $1 RETURNING id, number, company_id, order_id, amount, currency, paid_amount, \
     status, due_at, created_at";
/// The refund of an order on account: its invoice closed, checkout and order `refunded`.
pub(crate) const VOID_INVOICE_SQL: &str =
    "UPDATE invoices SET status = 'void', updated_at = $2 WHERE id = $1";
pub(crate) const REFUNDED_ON_ACCOUNT_ORDER_SQL: &str = "UPDATE orders SET status = 'refunded', \
     refund_status = 'succeeded', updated_at = $2 WHERE id = $1";
pub(crate) const REFUNDED_ON_ACCOUNT_CHECKOUT_SQL: &str = concat!(
    "UPDATE checkouts SET state = 'refunded', refund_due = FALSE, lease_owner = NULL, \
     lease_until = NULL, updated_at = $2 WHERE id = $1 RETURNING ",
    checkout_columns!()
);

/// An order on account can be refunded whole while its invoice is open or once it is paid;
/// shipped goods, as for a card, are not.
pub(crate) fn on_account_refundable(status: &str) -> Result<(), StoreError> {
    use crate::domain::OrderStatus;
    match OrderStatus::parse(status) {
        Some(OrderStatus::AwaitingPaymentOnTerms | OrderStatus::Paid) => Ok(()),
        Some(other) => Err(StoreError::OrderState(other)),
        None => Err(StoreError::Corrupt(format!("order status {status:?}"))),
    }
}

pub(crate) const INVOICE_PAID_ORDER_SQL: &str = "UPDATE orders SET status = 'paid', \
     updated_at = $2 WHERE id = $1 AND status = 'awaiting_payment_on_terms'";

/// A sale-SKU line above what its buyer may have, as shown to the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaleLimit {
    pub sku: Sku,
    pub requested: u32,
    pub limit: u32,
}

/// A sale open when a checkout starts: lines of its SKU need its admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSale {
    pub id: FlashSaleId,
    pub sku: Sku,
}

/// Everything `reserve_checkout` needs; ids are chosen by the caller so a retry can be
/// recognised.
#[derive(Debug, Clone)]
pub struct NewCheckout {
    pub id: CheckoutId,
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub cart_id: CartId,
    pub now: DateTime<Utc>,
    pub ttl: Duration,
    pub max_lifetime: Duration,
    /// The flash sale this checkout was admitted to.
    pub flash_sale: Option<FlashSaleId>,
    /// The start's `Idempotency-Key`, if it has one: the reservation's transaction records the
    /// checkout on the key's row (`idempotency_created`), so a retry after a crash between the
    /// commit and the stored answer finds the checkout instead of a claimed cart.
    pub idempotency_key: Option<String>,
    /// Units of the sale's SKU the admission holds in the gate.
    pub flash_sale_units: u32,
    /// The buyer's purchase-order number, kept on the order.
    pub po_number: Option<crate::domain::PoNumber>,
    /// The sales open at `now`: the reservation checks its own lines against them
    /// ([`governing_sale`]).
    pub open_sales: Vec<OpenSale>,
    /// How this checkout's payment is captured, stored with it by the reservation.
    pub capture_method: CaptureMethod,
}

/// A checkout of a flash sale as the gate is rebuilt from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleCheckout {
    pub id: CheckoutId,
    pub customer_id: CustomerId,
    pub state: CheckoutState,
    /// Units of the sale's SKU it holds or bought.
    pub units: u32,
    pub max_expires_at: DateTime<Utc>,
}

pub(crate) const SALE_CHECKOUTS_SQL: &str = "SELECT id, customer_id, state, flash_sale_units, \
     max_expires_at FROM checkouts WHERE flash_sale_id = $1";

/// Who is driving a checkout, and until when.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    pub owner: &'a str,
    pub now: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// Claims pending refunds for a re-read (`claim_pending_refunds`), both stores: `$1` lease
/// owner, `$2` lease until, `$3` now, `$4` orders unchanged since, `$5` limit; `{lock}` is
/// PostgreSQL's row lock on the candidates (empty on SQLite, whose writers are serial).
macro_rules! claim_pending_refunds_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE checkouts SET lease_owner = $1, lease_until = $2 WHERE id IN ( \
               SELECT c.id FROM checkouts c JOIN orders o ON o.id = c.order_id \
               WHERE o.refund_status = 'pending' AND c.refund_id IS NOT NULL \
                 AND NOT c.refund_due AND c.state <> 'refunded' AND o.updated_at < $4 \
                 AND (c.lease_until IS NULL OR c.lease_until < $3) \
               ORDER BY o.updated_at LIMIT $5 ",
            $lock,
            ") RETURNING id, refund_id"
        )
    };
}
pub(crate) use claim_pending_refunds_sql;

/// Claims capturing shipments whose lease ran out (`claim_stalled_shipments`), both stores:
/// `$1` lease until, `$2` now, `$3` limit; `{lock}` as in [`claim_pending_refunds_sql`].
macro_rules! claim_stalled_shipments_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE shipments SET lease_until = $1 WHERE id IN ( \
               SELECT id FROM shipments WHERE status = 'capturing' AND lease_until < $2 \
               ORDER BY lease_until LIMIT $3",
            $lock,
            ") RETURNING id"
        )
    };
}
pub(crate) use claim_stalled_shipments_sql;

/// A checkout claimed for a charge (or for recovery), with what the charge must repeat.
#[derive(Debug, Clone)]
pub struct ChargeTicket {
    pub checkout: Checkout,
    pub payment_method: String,
    /// Money of a late success is due back.
    pub refund_due: bool,
    /// When the checkout entered `charging` (the reconciler asks the gateway only after a
    /// while: Stripe's search lags behind).
    pub charge_started_at: Option<DateTime<Utc>>,
    /// This ticket moved the checkout into `charging` and opened its attempt, so no request
    /// with the attempt's key can have reached the gateway before. Only then does a refusal
    /// prove that no money moved; a resumed or recovered charge may follow a request whose
    /// outcome nobody saw (promise 3).
    pub opens_attempt: bool,
}

/// Where an `Idempotency-Key` stands (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyStart {
    /// First use (or a stale in-flight one taken over): go ahead, then finish or abandon.
    Proceed,
    /// Done before: answer exactly this again.
    Replay { status: u16, body: String },
    /// The first request with this key is still running; its lease runs until `until`.
    InFlight { until: DateTime<Utc> },
    /// The first request (a checkout start) reserved this checkout and was not seen answering:
    /// answer it, and store that answer.
    Created(CheckoutId),
    /// The key was used with different parameters.
    Mismatch,
}

/// A keyed start's checkout on its key's row, in the reservation's transaction (both stores,
/// plain and grouped reservation): `$1` customer, `$2` key, `$3` checkout.
pub(crate) const IDEMPOTENCY_CREATED: &str = "UPDATE idempotency_keys SET checkout_id = $3 \
     WHERE customer_id = $1 AND idem_key = $2 AND status_code IS NULL";

/// The running request's lease on its key, pushed to `$3`.
pub(crate) const IDEMPOTENCY_RENEW: &str = "UPDATE idempotency_keys SET locked_until = $3 \
     WHERE customer_id = $1 AND idem_key = $2 AND status_code IS NULL";

/// How long a stored idempotent response is replayed.
pub const IDEMPOTENCY_RETENTION_HOURS: i64 = 24;

/// A page of a list: `next` is the cursor of the following page, if any.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// What the expiry worker released in one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    pub checkouts: Vec<CheckoutId>,
    pub units: i64,
    /// Flash-sale admissions of the released checkouts, to hand back to the gate.
    pub admissions: Vec<(FlashSaleId, CustomerId, CheckoutId)>,
}

/// Promise 1, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRow {
    pub sku: Sku,
    pub stock: i64,
    pub reserved: i64,
    /// Sum of the quantities of live (active/committing) reservations.
    pub live_reserved: i64,
    /// Sum of recorded stock changes (creation, admin edits).
    pub adjusted_stock: i64,
    /// Sum of confirmed (sold) reservation quantities.
    pub sold: i64,
}

#[async_trait]
pub trait Store: OutboxStore + OpsStore + WholesaleStore + Send + Sync + 'static {
    fn kind(&self) -> StoreKind;
    /// How many times this store has taken a connection from its pool so far.
    fn acquisitions(&self) -> u64;
    async fn ping(&self) -> Result<(), StoreError>;

    // Customers.
    async fn create_customer(
        &self,
        name: &CustomerName,
        token_hash: &str,
    ) -> Result<Customer, StoreError> {
        self.create_customer_of(name, token_hash, None).await
    }
    /// A customer, buying for `company` when given (which must exist: `NotFound("company")`).
    async fn create_customer_of(
        &self,
        name: &CustomerName,
        token_hash: &str,
        company: Option<CompanyId>,
    ) -> Result<Customer, StoreError>;

    async fn customer_by_token_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<Customer>, StoreError>;

    // Catalogue.
    async fn create_product(
        &self,
        product: &NewProduct,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Product, StoreError>;
    async fn product(&self, sku: &Sku) -> Result<Option<Product>, StoreError>;
    async fn list_products(
        &self,
        after: Option<&Sku>,
        limit: u32,
    ) -> Result<Page<Product>, StoreError>;
    /// Every product, for the in-memory catalogue (PostgreSQL reads it on a connection of its
    /// own, so a reload never queues behind the writes in the pool).
    async fn all_products(&self) -> Result<Vec<Product>, StoreError>;
    /// Signals that products changed in any process sharing the database (PostgreSQL
    /// `LISTEN`); `None` where the store has no such channel.
    async fn listen_product_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        None
    }
    /// Optimistic concurrency: applies only if the product is still at `expected_version`.
    /// Every stock change is recorded with its actor for the audit.
    async fn update_product(
        &self,
        sku: &Sku,
        expected_version: i64,
        patch: &ProductPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Product, StoreError>;

    // Carts.
    async fn create_cart(
        &self,
        customer: CustomerId,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError>;
    /// A cart of another customer is `None`, exactly as a cart that does not exist.
    async fn cart(&self, customer: CustomerId, cart: CartId) -> Result<Option<Cart>, StoreError>;
    /// What starting a checkout reads first: the customer's cart (`None`: no such cart of
    /// theirs) and the flash sales not yet ended at `now`, as [`Store::cart`] and
    /// [`Store::current_flash_sales`] answer them. A store may read both in one round trip.
    async fn cart_and_current_sales(
        &self,
        customer: CustomerId,
        cart: CartId,
        now: DateTime<Utc>,
    ) -> Result<(Option<Cart>, Vec<FlashSale>), StoreError> {
        Ok((
            self.cart(customer, cart).await?,
            self.current_flash_sales(now).await?,
        ))
    }
    async fn set_cart_line(
        &self,
        customer: CustomerId,
        cart: CartId,
        sku: &Sku,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError>;
    async fn remove_cart_line(
        &self,
        customer: CustomerId,
        cart: CartId,
        sku: &Sku,
        now: DateTime<Utc>,
    ) -> Result<Cart, StoreError>;

    // Checkouts: the saga's phases.
    /// Reserve every line all-or-nothing and create the order, in one transaction.
    async fn reserve_checkout(&self, new: &NewCheckout) -> Result<Checkout, StoreError>;
    /// Group reservation: the checkouts of `batch` in one transaction, sharing one commit and
    /// one update per product row. Answers come in batch order, each exactly what
    /// `reserve_checkout` would have said at its place in the batch (all-or-nothing per
    /// checkout; a refused cart stays open and untouched). If the transaction fails as a whole,
    /// every request runs through `reserve_checkout` on its own.
    async fn reserve_checkouts(&self, batch: &[NewCheckout]) -> Vec<Result<Checkout, StoreError>>;
    async fn checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
    ) -> Result<Option<Checkout>, StoreError>;
    /// Push the reservation's expiry to `now + ttl`, never past the checkout's maximum lifetime.
    async fn heartbeat_checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Checkout, StoreError>;
    /// Release a reserved checkout at once; cancelling a cancelled checkout is a no-op.
    async fn cancel_checkout(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Expire up to `limit` reserved checkouts whose window has passed, releasing their units.
    /// Safe to run from several workers and instances at once: each is released exactly once.
    async fn expire_due_checkouts(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Released, StoreError>;

    /// reserved → charging, taking the lease: the reservation can no longer expire. A checkout
    /// already `charging` whose lease ran out is resumed with its recorded attempt and payment
    /// method, so the gateway sees the very same request again.
    async fn begin_charge(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        payment_method: &str,
        lease: Lease<'_>,
    ) -> Result<ChargeTicket, StoreError>;
    /// Any checkout by id, whoever owns it (webhooks, workers).
    async fn find_checkout(&self, id: CheckoutId) -> Result<Option<Checkout>, StoreError>;
    async fn checkout_by_payment_intent(
        &self,
        payment_intent_id: &str,
    ) -> Result<Option<Checkout>, StoreError>;
    /// The charge succeeded: confirm stock, order paid, `order.paid` outbox row, checkout
    /// completed, in one transaction. A success for a checkout that gave its units back
    /// re-reserves them if stock allows, otherwise marks the money as due back (`refund_due`).
    async fn record_charge_succeeded(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Manual capture: the card is authorized (`requires_capture`) for `amount`. Exactly as
    /// [`Store::record_charge_succeeded`] (stock confirmed, checkout completed, a late
    /// authorization re-reserves or is due back), but the order is `authorized` with nothing
    /// captured, and its fulfilment event is `order.authorized`.
    async fn record_charge_authorized(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        amount: i64,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// How the checkout's payment is captured, as decided when it started.
    async fn capture_method(&self, id: CheckoutId) -> Result<CaptureMethod, StoreError>;
    /// Declined: release the units, order and checkout `payment_failed`, cart open again.
    async fn record_charge_declined(
        &self,
        id: CheckoutId,
        payment_intent_id: Option<&str>,
        decline_code: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// The card needs the customer: order `payment_processing`; the lease now runs until the
    /// authentication times out.
    async fn record_requires_action(
        &self,
        id: CheckoutId,
        payment_intent_id: &str,
        client_secret: Option<&str>,
        lease: Lease<'_>,
    ) -> Result<Checkout, StoreError>;
    /// Authentication abandoned or timed out and the PaymentIntent cancelled: release.
    async fn record_charge_cancelled(
        &self,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// The gateway refused the request before any money could move (unknown payment method):
    /// back to `reserved` so the customer may try another method.
    async fn abort_charge(
        &self,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Outcome unknown: give the lease up until `retry_at`, when recovery tries again with the
    /// same key.
    async fn defer_charge(&self, id: CheckoutId, retry_at: DateTime<Utc>)
        -> Result<(), StoreError>;
    /// A slow charge keeps its lease: pushes a `charging` checkout's lease to `lease.until`,
    /// only while the lease is exactly the one this owner last wrote (`held_until`). A lease
    /// claimed again meanwhile (by another instance, or by this one's recovery) is not renewed,
    /// nor one of a checkout that left `charging`. True when renewed.
    async fn renew_charge_lease(
        &self,
        id: CheckoutId,
        held_until: DateTime<Utc>,
        lease: Lease<'_>,
    ) -> Result<bool, StoreError>;
    /// Checkouts nobody is moving on: `charging`/`requires_action` whose lease ran out, and
    /// money due back. Claimed with a new lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL).
    async fn claim_stalled(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<ChargeTicket>, StoreError>;
    /// The money went back: checkout and order `refunded`; units a completed checkout had
    /// bought return to stock unless its order was shipped (those left the warehouse; an admin
    /// stock edit brings returned goods back). Refunding a refunded checkout changes nothing
    /// but a missing refund id. `refund_id` is `None` when only Stripe's `charge.refunded`
    /// event reported the refund.
    async fn record_refunded(
        &self,
        id: CheckoutId,
        refund_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;

    /// The gateway took the refund but has not settled it (`pending`, or a `null` status): the
    /// money is no longer due (the refund exists, recovery must not ask again), the order
    /// stays paid with `refund_status = 'pending'` and nothing goes back to stock yet. Changes
    /// nothing on a checkout already refunded.
    async fn record_refund_pending(
        &self,
        id: CheckoutId,
        refund_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// The gateway did not give the money back (`failed`, `canceled`): the order stays paid,
    /// flagged `refund_status = 'failed'` for an operator. Changes nothing on a checkout
    /// already refunded.
    async fn record_refund_failed(
        &self,
        id: CheckoutId,
        refund_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Refunds the gateway still holds pending (`refund_status = 'pending'`) on orders unchanged
    /// since `settled_before`, whose `refund.*` event may be lost: claimed with a lease so one
    /// instance re-reads each; returns each checkout with its refund id. Re-recording a refund
    /// still pending moves its order's `updated_at`, so it waits another threshold.
    async fn claim_pending_refunds(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<(CheckoutId, String)>, StoreError>;
    /// The checkout whose refund this is, by the refund id recorded with it.
    async fn checkout_for_refund(&self, refund_id: &str) -> Result<Option<CheckoutId>, StoreError>;
    /// An admin refund of a paid order: its checkout's money is due back (the refund itself
    /// runs through the gateway, then `record_refunded`, crash-safe via recovery).
    async fn request_refund(
        &self,
        order: OrderId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Manual capture: records a shipment of an `authorized` or `partially_fulfilled` order
    /// before its capture call, with the capture's key and a lease ([`plan_shipment`] decides
    /// amounts). Its lines count as shipped; on the order's last shipment the units left are
    /// short: released back to stock at once, never captured.
    async fn begin_shipment(&self, new: &NewShipment) -> Result<ShipmentTicket, StoreError>;
    /// The gateway captured the shipment: its amount adds to the order's captured amount, the
    /// order is `partially_fulfilled`, or `fulfilled` after its last shipment (`cancelled` when
    /// nothing at all was captured), and one `order.shipment_captured` event is written.
    /// Recording a settled shipment again changes nothing.
    async fn record_shipment_captured(
        &self,
        shipment: ShipmentId,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError>;
    /// The gateway refused the capture (say, the authorization lapsed): the shipment is
    /// `failed` with the reason, for an operator; the order keeps what it captured.
    async fn record_shipment_failed(
        &self,
        shipment: ShipmentId,
        failure: &str,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError>;
    /// Shipments still capturing whose lease ran out (a crashed instance, an unknown answer),
    /// claimed with a new lease for recovery to capture again with the same key.
    async fn claim_stalled_shipments(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<ShipmentTicket>, StoreError>;
    /// A partial refund by line of a paid or shipped order, recorded before its gateway call
    /// with its key and a lease ([`plan_line_refund`] decides): its units count as refunded
    /// at once, so a concurrent refund cannot take them too.
    async fn begin_line_refund(&self, new: &NewLineRefund) -> Result<LineRefundTicket, StoreError>;
    /// A partial refund as the gateway answers it. `Succeeded`: the amount counts as refunded
    /// (the order `refunded` once everything captured went back), its units go back to stock
    /// if it restocks, one `order.refunded` event; `Pending`: kept, nothing moves yet;
    /// `Failed`: its units are refundable again. A settled refund never settles twice (the
    /// admin's answer and Stripe's events converge on this one row).
    async fn record_line_refund(
        &self,
        id: LineRefundId,
        status: LineRefundStatus,
        gateway_refund_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Order, StoreError>;
    /// The order paid by this PaymentIntent: what its partial refunds gave back so far, and
    /// its partial refunds not settled yet (oldest first, with their amounts). `None` when
    /// the order never had a partial refund.
    async fn line_refunds_of_payment(
        &self,
        payment_intent_id: &str,
    ) -> Result<Option<(i64, Vec<(LineRefundId, i64)>)>, StoreError>;
    /// The partial refund recorded with this gateway refund id.
    async fn line_refund_by_gateway_id(
        &self,
        gateway_refund_id: &str,
    ) -> Result<Option<LineRefundId>, StoreError>;
    /// Partial refunds asked for whose answer was lost and whose lease ran out, claimed with a
    /// new lease for recovery to ask again with the same key.
    async fn claim_stalled_line_refunds(
        &self,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<LineRefundTicket>, StoreError>;
    /// A dispute of the payment `payment_intent_id` as Stripe reports it. `Open`: the order is
    /// `disputed` (its status before kept) and one `order.disputed` event tells the warehouse
    /// to hold its fulfilment; `Won`: the order is back where it was; `Lost`: the order is
    /// `refunded_by_dispute`, stock untouched. A repeated or late report changes nothing.
    /// `None` when no order was paid by that PaymentIntent.
    async fn record_dispute(
        &self,
        payment_intent_id: &str,
        dispute_id: &str,
        status: DisputeStatus,
        now: DateTime<Utc>,
    ) -> Result<Option<Order>, StoreError>;
    /// Orders on hold for a dispute, most recent first.
    async fn disputed_orders(&self, limit: u32) -> Result<Vec<OrderId>, StoreError>;
    /// Partial refunds Stripe holds pending and unchanged since `settled_before`, claimed with
    /// a lease so one instance reads each again; each with its gateway refund id. Recording
    /// one still pending moves its `updated_at`, so it waits another threshold.
    async fn claim_pending_line_refunds(
        &self,
        settled_before: DateTime<Utc>,
        limit: u32,
        lease: Lease<'_>,
    ) -> Result<Vec<(LineRefundId, String)>, StoreError>;
    /// Orders still holding an authorization given before `before` (oldest first): the
    /// authorization worker settles them, the ops page lists those near their end.
    async fn authorizations_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OrderId>, StoreError>;
    /// paid (or placed on account) → fulfilled (shipped); fulfilling a fulfilled order changes
    /// nothing.
    async fn mark_fulfilled(&self, order: OrderId, now: DateTime<Utc>)
        -> Result<Order, StoreError>;
    /// Any order by id, for the admin.
    async fn admin_order(&self, id: OrderId) -> Result<Option<Order>, StoreError>;

    // Webhooks and edge idempotency.
    /// True if this event id was handled before (events are recorded only once handled).
    async fn webhook_seen(&self, event_id: &str) -> Result<bool, StoreError>;
    async fn record_webhook_event(
        &self,
        event_id: &str,
        event_type: &str,
        payment_intent_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn idempotency_begin(
        &self,
        customer: CustomerId,
        key: &str,
        fingerprint: &str,
        now: DateTime<Utc>,
        lock_for: Duration,
    ) -> Result<IdempotencyStart, StoreError>;
    async fn idempotency_finish(
        &self,
        customer: CustomerId,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError>;
    async fn idempotency_abandon(&self, customer: CustomerId, key: &str) -> Result<(), StoreError>;
    /// The running request still holds its key: its lease now runs until `until`.
    async fn idempotency_renew(
        &self,
        customer: CustomerId,
        key: &str,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    // Flash sales.
    /// Opens a sale; its units may not exceed the product's available stock at that moment.
    async fn create_flash_sale(
        &self,
        sale: &NewFlashSale,
        now: DateTime<Utc>,
    ) -> Result<FlashSale, StoreError>;
    async fn flash_sale(&self, id: FlashSaleId) -> Result<Option<FlashSale>, StoreError>;
    /// Every sale not yet ended at `now` (few at a time; cached by the caller).
    async fn current_flash_sales(&self, now: DateTime<Utc>) -> Result<Vec<FlashSale>, StoreError>;
    /// Every checkout of a sale, read in one statement: what the admission gate is loaded
    /// from after a restart or lost Redis keys (DESIGN §5).
    async fn sale_checkouts(&self, sale: FlashSaleId) -> Result<Vec<SaleCheckout>, StoreError>;

    // Orders: a customer sees their own and, as a company's buyer, those of the company's
    // other buyers.
    async fn order(&self, customer: CustomerId, id: OrderId) -> Result<Option<Order>, StoreError>;
    async fn list_orders(
        &self,
        customer: CustomerId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Order>, StoreError>;

    // Audit.
    async fn inventory_audit(&self) -> Result<Vec<InventoryRow>, StoreError>;
    /// Promises 4 and 5, one row per checkout.
    async fn checkout_audit(&self) -> Result<Vec<CheckoutAuditRow>, StoreError>;
}

/// Wholesale: companies, price lists, orders on account and invoices (`wholesale.rs` writes the
/// methods once for both stores).
#[async_trait]
pub trait WholesaleStore: Send + Sync {
    async fn create_company(
        &self,
        company: &NewCompany,
        now: DateTime<Utc>,
    ) -> Result<Company, StoreError>;
    async fn company(&self, id: CompanyId) -> Result<Option<Company>, StoreError>;
    /// Sets (or replaces) the company's price of one SKU. Bumps nothing on the product: the
    /// reservation reads the price list in its own transaction.
    async fn set_company_price(
        &self,
        company: CompanyId,
        sku: &Sku,
        price: &CompanyPrice,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// reserved → completed on account, in one transaction: the buyer's company has net terms,
    /// no overdue invoice and room under its credit limit for the total; the units are sold,
    /// the order is `awaiting_payment_on_terms` with a new invoice due after the terms, the
    /// company's open balance grows by the total, and the order's fulfilment event is written.
    async fn complete_on_account(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<(Checkout, crate::domain::Invoice), StoreError>;
    async fn invoice(
        &self,
        id: crate::domain::InvoiceId,
    ) -> Result<Option<crate::domain::Invoice>, StoreError>;
    /// A payment of `amount` (1 up to the balance) against an open invoice: the company's open
    /// balance shrinks by it; paid in full, the invoice is `paid` and its order `paid`.
    async fn record_invoice_payment(
        &self,
        id: crate::domain::InvoiceId,
        amount: i64,
        now: DateTime<Utc>,
    ) -> Result<crate::domain::Invoice, StoreError>;
    /// An admin refund of an order placed on account (`awaiting_payment_on_terms`, or `paid`
    /// once its invoice was): in one transaction, taking the invoice first as a payment does,
    /// the invoice's open balance leaves the company's outstanding credit, the invoice is
    /// `void`, the units go back on the shelf, and checkout and order are `refunded`. What the
    /// company had paid stays on the invoice (`paid`), for the merchant to return.
    async fn refund_on_account(
        &self,
        order: OrderId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError>;
    /// Every company's credit, for the audit.
    async fn credit_audit(&self) -> Result<Vec<CreditAuditRow>, StoreError>;
    /// Order lines whose quantity the SQL finds outside the rules recorded with them when they
    /// were reserved (the audit names the rule each breaks).
    async fn line_rules_audit(&self) -> Result<Vec<LineRulesRow>, StoreError>;
    /// Open invoices past their due date at `now`, the longest overdue first (the ops page).
    async fn overdue_invoices(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<crate::domain::Invoice>, StoreError>;
    /// The company's whole price list, by SKU (for the catalogue a buyer is shown).
    async fn company_prices(
        &self,
        company: CompanyId,
    ) -> Result<Vec<(Sku, CompanyPrice)>, StoreError>;
    /// The capture method of the customer's company, when it has one that sets it; `None`
    /// for a retail customer and for a company following the shop's setting.
    async fn company_capture_method(
        &self,
        customer: CustomerId,
    ) -> Result<Option<crate::domain::CaptureMethod>, StoreError>;
}

/// How `Duration`s and instants are stored: milliseconds since the epoch, in both stores.
pub(crate) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt(format!("time {ms}")))
}

/// Every migration of `migrator` must be among the `applied` versions: a store read as it is
/// (the audit on a live database) is never migrated on the way.
pub(crate) fn schema_is_current(
    migrator: &sqlx::migrate::Migrator,
    applied: &[i64],
) -> Result<(), StoreError> {
    let known: Vec<i64> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect();
    let present = known.iter().filter(|v| applied.contains(v)).count();
    if present == known.len() {
        Ok(())
    } else {
        Err(StoreError::SchemaBehind {
            applied: present,
            known: known.len(),
        })
    }
}

/// A cart line as reserved: the product row's id (lock order), its SKU, the quantity, the
/// price this buyer pays per unit ([`crate::domain::unit_price`]), and the list price and the
/// ordering rules read under the row lock (the guard checks the list price again).
#[derive(Debug, Clone)]
pub(crate) struct PricedLine {
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price: crate::domain::Money,
    pub list_price: crate::domain::Money,
    pub rules: OrderingRules,
}

/// What the catalogue says about one cart line's product for this buyer, read with the line:
/// list price, volume tiers, the buyer's company price, the ordering rules.
#[derive(Debug, Clone)]
pub(crate) struct LineTerms {
    pub list_price: crate::domain::Money,
    pub tiers: PriceTiers,
    pub company: Option<CompanyPrice>,
    pub rules: OrderingRules,
}

impl LineTerms {
    /// A line priced at one figure whatever its quantity, with no rules.
    pub fn list(list_price: crate::domain::Money) -> Self {
        Self {
            list_price,
            tiers: PriceTiers::default(),
            company: None,
            rules: OrderingRules::default(),
        }
    }
}

/// Inside the reservation: a buyer whose company requires a purchase-order number gives one.
pub(crate) fn po_number_given(new: &NewCheckout, required: bool) -> Result<(), StoreError> {
    if required && new.po_number.is_none() {
        Err(StoreError::PoNumberRequired)
    } else {
        Ok(())
    }
}

/// The company's requirement of a purchase-order number for this customer's checkouts (both
/// stores, in the reservation's transaction): `$1` customer.
pub(crate) const PO_NUMBER_REQUIRED_SQL: &str = "SELECT COALESCE((SELECT co.po_number_required \
     FROM customers u JOIN companies co ON co.id = u.company_id WHERE u.id = $1), FALSE)";

/// The lines of a paid order with its purchase-order number, for its `order.paid` event (both
/// stores): `$1` order.
pub(crate) const PAID_ORDER_LINES_SQL: &str = "SELECT ol.order_id, ol.sku, ol.quantity, \
     ol.unit_price, ol.line_total, o.currency, o.po_number FROM order_lines ol \
     JOIN orders o ON o.id = ol.order_id WHERE o.id = $1 ORDER BY ol.sku";

/// Inside the reservation, on the lines it read: every line within its product's ordering
/// rules as they are now, or `RulesChanged` naming each line and the rule it breaks.
pub(crate) fn rules_hold(lines: &[PricedLine]) -> Result<(), StoreError> {
    let broken: Vec<RuleBreach> = lines
        .iter()
        .filter_map(|line| line.rules.breach(&line.sku, line.quantity.get()))
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(StoreError::RulesChanged(broken))
    }
}

impl PricedLine {
    pub fn line_total(&self) -> Result<crate::domain::Money, StoreError> {
        Ok(self.unit_price.checked_mul(self.quantity.get())?)
    }
}

/// The order total, computed here from catalogue prices only (promise 6). All lines must share
/// one currency: a single payment cannot mix them.
pub(crate) fn order_total(lines: &[PricedLine]) -> Result<crate::domain::Money, StoreError> {
    let first = lines.first().ok_or(StoreError::CartEmpty)?;
    lines.iter().try_fold(
        crate::domain::Money::zero(first.unit_price.currency()),
        |sum, line| Ok(sum.checked_add(line.line_total()?)?),
    )
}

/// A cart line as read before reserving: product id, SKU and requested quantity.
#[derive(Debug, Clone)]
pub(crate) struct WantedLine {
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: i64,
}

/// How often `reserve_checkout` starts over when a price changed between reading it and
/// locking the product row; past this the customer hears `PriceChanged`.
pub(crate) const PRICE_RETRIES: usize = 3;

/// How often an attempt reads a row its guard refused without locking it, before the next
/// attempt reads it under the row lock (see [`reserve_retrying`]).
pub(crate) const UNLOCKED_READ_BACKS: usize = 8;

/// Cart lines with the catalogue terms read together with them (before the row lock): lines
/// of one product summed and sorted by product id, like [`lock_order`], each priced at its
/// summed quantity.
pub(crate) fn priced_in_lock_order(
    lines: Vec<(WantedLine, LineTerms)>,
) -> Result<Vec<PricedLine>, StoreError> {
    let mut terms: HashMap<i64, LineTerms> = HashMap::new();
    let mut wanted = Vec::with_capacity(lines.len());
    for (line, line_terms) in lines {
        terms.insert(line.product_id, line_terms);
        wanted.push(line);
    }
    lock_order(wanted)
        .into_iter()
        .map(|line| {
            let terms = terms
                .get(&line.product_id)
                .expect("every summed line comes from a priced line");
            let quantity = rows::quantity(line.quantity)?;
            let unit_price = crate::domain::unit_price(
                terms.list_price,
                &terms.tiers,
                terms.company.as_ref(),
                quantity.get(),
            )?;
            Ok(PricedLine {
                product_id: line.product_id,
                quantity,
                sku: line.sku,
                unit_price,
                list_price: terms.list_price,
                rules: terms.rules,
            })
        })
        .collect()
}

/// The sale a checkout's lines fall under, with the units of its SKU: `None` when no line is
/// of an open sale's SKU. Lines of two sales cannot share a checkout (each needs its own
/// admission). One rule for the service's first look at the cart and for the reservation,
/// which applies it to the lines it reads in its own transaction.
pub fn sale_line<'a>(
    lines: impl IntoIterator<Item = (&'a Sku, u32)>,
    open_sales: &[OpenSale],
) -> Result<Option<(FlashSaleId, Sku, u32)>, StoreError> {
    let mut found: Option<(FlashSaleId, Sku, u32)> = None;
    for (sku, quantity) in lines {
        let Some(sale) = open_sales.iter().find(|sale| &sale.sku == sku) else {
            continue;
        };
        match &mut found {
            None => found = Some((sale.id, sku.clone(), quantity)),
            Some((id, _, units)) if *id == sale.id => *units = units.saturating_add(quantity),
            Some(_) => return Err(StoreError::OneSalePerCheckout),
        }
    }
    Ok(found)
}

/// What a reservation records about its sale: the sale and the units of its SKU it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Governed {
    pub sale: Option<FlashSaleId>,
    pub units: u32,
}

/// Inside the reservation's transaction, on the lines it is about to reserve: a line of an
/// open sale's SKU needs that sale's admission and at most the units the admission holds.
/// Otherwise the reservation fails and rolls back, so nothing of a sale SKU is ever reserved
/// without its admission (a line added while the checkout started included). An admission
/// whose cart no longer holds the sale's SKU reserves as a plain checkout. Both stores call
/// this on the lines they locked; a one-statement reservation can express the same rule as
/// a join of the lines with the open sales.
pub(crate) fn governing_sale(
    new: &NewCheckout,
    lines: &[PricedLine],
) -> Result<Governed, StoreError> {
    let line = sale_line(
        lines.iter().map(|line| (&line.sku, line.quantity.get())),
        &new.open_sales,
    )?;
    let Some((sale, sku, units)) = line else {
        return Ok(Governed::default());
    };
    if new.flash_sale != Some(sale) {
        return Err(StoreError::AdmissionRequired);
    }
    if units > new.flash_sale_units {
        return Err(StoreError::FlashSaleLimit(SaleLimit {
            sku,
            requested: units,
            limit: new.flash_sale_units,
        }));
    }
    Ok(Governed {
        sale: Some(sale),
        units,
    })
}

/// The one-live-checkout-per-admission index, by name.
const ADMISSION_INDEX: &str = "checkouts_one_live_per_admission";

/// A checkout insert that violates the admission index is a second live checkout of one
/// admission (`AdmissionInUse`); any other failure, another unique violation included, stays
/// what it is. One rule for both stores: PostgreSQL names the violated index, SQLite names
/// its columns (`checkouts.flash_sale_id, checkouts.customer_id`).
/// Why a heartbeat renewed nothing, from the checkout's state as it stood (`None`: no such
/// checkout of this customer), both stores.
pub(crate) fn heartbeat_refused(state: Option<CheckoutState>) -> StoreError {
    match state {
        None => StoreError::NotFound("checkout"),
        Some(CheckoutState::Reserved | CheckoutState::Expired) => StoreError::CheckoutExpired,
        Some(other) => StoreError::CheckoutState(other),
    }
}

pub(crate) fn admission_in_use(e: sqlx::Error) -> StoreError {
    let admission = match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some(ADMISSION_INDEX)
                || db
                    .message()
                    .ends_with("checkouts.flash_sale_id, checkouts.customer_id")
        }
        _ => false,
    };
    if admission {
        StoreError::AdmissionInUse
    } else {
        e.into()
    }
}

/// What a guarded reservation found when a line did not fit: the row as it is now.
#[derive(Debug, Clone)]
pub(crate) struct RowNow {
    pub available: i64,
    pub unit_price: crate::domain::Money,
}

/// Why a plain reservation stops short: a real shortfall is the customer's answer; a moved
/// price or a row that freed up meanwhile means the whole transaction runs again.
pub(crate) enum Guarded {
    Reserved,
    Short(Vec<Shortfall>),
    Retry(Retry),
}

/// Why an attempt of the plain reservation was rolled back to start over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A catalogue price differs from the one the cart was priced at.
    PriceMoved,
    /// The guard refused a line that the row, read right after, has room for at the same
    /// price: another transaction freed units between the two statements.
    Freed,
}

/// How an attempt reads a product row its guarded update did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadBack {
    /// A plain read: cheap, and a sold-out row stays unlocked for everyone else, but a release
    /// may land between the guard and the read ([`Retry::Freed`]).
    Unlocked,
    /// Under the row lock: what it finds stays true until the commit, so the verdict is final
    /// (reserved, short, or a moved price) and never [`Retry::Freed`].
    Locked,
}

/// The plain reservation's retry loop, shared by both stores. Only a moved price counts
/// toward [`PRICE_RETRIES`]: a customer may hear `PriceChanged`, but never because units were
/// freed meanwhile (promise 2). A [`Retry::Freed`] runs again, and cannot do so forever. Each
/// one is justified by a release that committed between the guard (too few units) and the
/// read-back (enough); the windows of successive attempts do not overlap, so every such retry
/// answers a distinct release by another transaction. And past [`UNLOCKED_READ_BACKS`] of
/// them the read-back takes the row lock, under which `Freed` cannot happen (a store that
/// still answers it is broken: `Corrupt`, not a spin). At most
/// `PRICE_RETRIES + UNLOCKED_READ_BACKS` attempts in all.
pub(crate) async fn reserve_retrying<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut(ReadBack) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, Retry>, StoreError>>,
{
    let (mut price_moves, mut freed) = (0, 0);
    loop {
        let read_back = if freed < UNLOCKED_READ_BACKS {
            ReadBack::Unlocked
        } else {
            ReadBack::Locked
        };
        match attempt(read_back).await? {
            Ok(done) => return Ok(done),
            Err(Retry::PriceMoved) => {
                price_moves += 1;
                if price_moves >= PRICE_RETRIES {
                    return Err(StoreError::PriceChanged);
                }
            }
            Err(Retry::Freed) if read_back == ReadBack::Locked => {
                return Err(StoreError::Corrupt(
                    "a guarded update refused a row that has room under its lock".into(),
                ));
            }
            Err(Retry::Freed) => freed += 1,
        }
    }
}

/// Sorts the lines a guarded update did not match into shortfalls or a retry. A price that
/// moved wins over a shortfall (the retry reports the shortfall at the new price).
pub(crate) fn judge_misses(misses: &[(&PricedLine, RowNow)]) -> Guarded {
    if misses.is_empty() {
        return Guarded::Reserved;
    }
    if misses
        .iter()
        .any(|(line, now)| now.unit_price != line.list_price)
    {
        return Guarded::Retry(Retry::PriceMoved);
    }
    let short: Vec<Shortfall> = misses
        .iter()
        .filter(|(line, now)| now.available < i64::from(line.quantity.get()))
        .map(|(line, now)| Shortfall {
            sku: line.sku.clone(),
            requested: line.quantity.get(),
            available: now.available,
        })
        .collect();
    if short.is_empty() {
        // The units were released between the guard and this read: not a refusal (promise 2).
        Guarded::Retry(Retry::Freed)
    } else {
        Guarded::Short(short)
    }
}

/// A multi-row guarded update of rows this transaction holds locked must match every row;
/// anything less would break all-or-nothing, so the transaction is abandoned.
pub(crate) fn all_matched(updated: u64, expected: usize) -> Result<(), StoreError> {
    if usize::try_from(updated).is_ok_and(|n| n == expected) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "a guarded update matched {updated} of {expected} locked rows"
        )))
    }
}

/// The answer the plain path gives for a cart it could not claim: unknown (or someone else's)
/// is not found, otherwise the status that stopped it.
pub(crate) fn unclaimed_cart(status: Option<&str>) -> StoreError {
    match status {
        None => StoreError::NotFound("cart"),
        Some(s) => cart_must_be_open(s).err().unwrap_or(StoreError::CartEmpty),
    }
}

/// Lines of the same product are summed before the guard, and sorted by product id: the one
/// lock order every transaction uses, so concurrent carts cannot deadlock (DESIGN §3).
pub(crate) fn lock_order(mut lines: Vec<WantedLine>) -> Vec<WantedLine> {
    lines.sort_by_key(|l| l.product_id);
    lines.dedup_by(|later, first| {
        if later.product_id == first.product_id {
            first.quantity += later.quantity;
            true
        } else {
            false
        }
    });
    lines
}

pub(crate) const PRODUCT_COLUMNS: &str = "id, sku, name, price_amount, currency, stock, \
     reserved, version, min_quantity, increment, max_quantity, price_tiers";

/// The product columns an admin edit writes (both stores): `$1` id, then name, price amount,
/// currency, stock, updated_at, min_quantity, increment, max_quantity, price_tiers.
pub(crate) const UPDATE_PRODUCT_SQL: &str = "UPDATE products SET name = $2, price_amount = $3, \
     currency = $4, stock = $5, version = version + 1, updated_at = $6, min_quantity = $7, \
     increment = $8, max_quantity = $9, price_tiers = $10 WHERE id = $1 RETURNING id, sku, \
     name, price_amount, currency, stock, reserved, version, min_quantity, increment, \
     max_quantity, price_tiers";

/// A new product (both stores): sku, name, price amount, currency, stock, created_at,
/// min_quantity, increment, max_quantity, price_tiers.
pub(crate) const INSERT_PRODUCT_SQL: &str = "INSERT INTO products (sku, name, price_amount, \
     currency, stock, created_at, updated_at, min_quantity, increment, max_quantity, \
     price_tiers) VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10) RETURNING id, sku, name, \
     price_amount, currency, stock, reserved, version, min_quantity, increment, max_quantity, \
     price_tiers";

pub(crate) const COMPANY_COLUMNS: &str =
    "id, name, currency, payment_terms, credit_limit, po_number_required, created_at, \
     capture_method";

/// The capture method a customer's company sets (both stores): no row for a retail customer,
/// a NULL for a company following the shop's setting.
pub(crate) const COMPANY_CAPTURE_METHOD_SQL: &str = "SELECT co.capture_method FROM customers cu \
     JOIN companies co ON co.id = cu.company_id WHERE cu.id = $1";

/// A company's price of a SKU, set or replaced (both stores): `$1` company, `$2` product id,
/// amount, percent_off, tiers, updated_at.
pub(crate) const UPSERT_COMPANY_PRICE_SQL: &str = "INSERT INTO company_prices (company_id, \
     product_id, amount, percent_off, tiers, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (company_id, product_id) DO UPDATE SET amount = EXCLUDED.amount, \
     percent_off = EXCLUDED.percent_off, tiers = EXCLUDED.tiers, updated_at = EXCLUDED.updated_at";

pub(crate) const COMPANY_PRICES_SQL: &str = "SELECT p.sku, cp.amount, cp.percent_off, cp.tiers \
     FROM company_prices cp JOIN products p ON p.id = cp.product_id WHERE cp.company_id = $1 \
     ORDER BY p.sku";
pub(crate) const CHECKOUT_COLUMNS: &str = checkout_columns!();
/// Promises 4 and 5 for one checkout: where it stands, who drives it, its order and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutAuditRow {
    pub id: CheckoutId,
    pub state: CheckoutState,
    pub order_status: crate::domain::OrderStatus,
    pub refund_due: bool,
    pub expires_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    /// The gateway's refund recorded with the checkout, and the order's `refund_status`.
    pub refund_id: Option<String>,
    pub refund_status: Option<String>,
    /// Fulfilment events (`order.paid`, or `order.authorized` under manual capture) of its
    /// order, and how many of them are still unpublished.
    pub paid_events: i64,
    pub unpublished_events: i64,
    pub oldest_unpublished: Option<DateTime<Utc>>,
    /// Manual capture: the order's authorized (`None`: charged at checkout), captured and
    /// refunded amounts, and the sum of its captured shipments.
    pub authorized_amount: Option<i64>,
    pub captured_amount: i64,
    pub refunded_amount: i64,
    pub shipments_captured: i64,
    pub total_amount: i64,
    /// Lines restocked more than refunded, refunded more than ordered, or shipped and short
    /// more than ordered.
    pub overdrawn_lines: i64,
}

pub(crate) const CHECKOUT_AUDIT_SQL: &str = "SELECT c.id, c.state, c.refund_due, c.expires_at, \
     c.lease_until, o.status AS order_status, c.refund_id, o.refund_status, \
     (SELECT COUNT(*) FROM outbox x WHERE x.order_id = o.id AND x.topic IN ('order.paid', 'order.authorized')) AS paid_events, \
     (SELECT COUNT(*) FROM outbox x WHERE x.order_id = o.id AND x.topic IN ('order.paid', 'order.authorized') \
        AND x.published_at IS NULL) AS unpublished_events, \
     (SELECT MIN(x.created_at) FROM outbox x WHERE x.order_id = o.id AND x.topic IN ('order.paid', 'order.authorized') \
        AND x.published_at IS NULL) AS oldest_unpublished, \
     o.authorized_amount, o.captured_amount, o.refunded_amount, \
     (SELECT CAST(COALESCE(SUM(s.amount), 0) AS BIGINT) FROM shipments s \
        WHERE s.order_id = o.id AND s.status = 'captured') AS shipments_captured, \
     o.total_amount, \
     (SELECT COUNT(*) FROM order_lines l WHERE l.order_id = o.id \
        AND (l.restocked > l.refunded OR l.refunded > l.quantity \
             OR l.shipped + l.short > l.quantity)) AS overdrawn_lines \
     FROM checkouts c JOIN orders o ON o.id = c.order_id ORDER BY c.created_at";

/// Promise 1 per product, read in one statement (one snapshot) in both stores.
pub(crate) const INVENTORY_AUDIT_SQL: &str = "SELECT p.sku, p.stock, p.reserved, \
     (SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM reservations r \
        WHERE r.product_id = p.id AND r.status IN ('active', 'committing')) AS live_reserved, \
     (SELECT CAST(COALESCE(SUM(new_stock - old_stock), 0) AS BIGINT) FROM stock_adjustments a \
        WHERE a.product_id = p.id) AS adjusted_stock, \
     (SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM reservations r \
        WHERE r.product_id = p.id AND r.status = 'confirmed') AS sold \
     FROM products p ORDER BY p.sku";

pub(crate) const ORDER_COLUMNS: &str =
    "id, customer_id, checkout_id, status, total_amount, currency, payment_intent_id, created_at, seq, \
     refund_status, po_number, invoice_id, authorized_amount, captured_amount, refunded_amount";

/// The orders a customer (the parameter named) sees, as a condition on `orders o`: their own
/// and, for a company's buyer, those of the company's other buyers.
macro_rules! seen_by {
    ($customer:literal) => {
        concat!(
            "o.customer_id IN (SELECT b.id FROM customers b WHERE b.id = ",
            $customer,
            " OR b.company_id = (SELECT me.company_id FROM customers me WHERE me.id = ",
            $customer,
            "))"
        )
    };
}

/// A customer's order with its lines, by primary key, in one statement in both stores (an
/// order poll is one round trip): `$1` order, `$2` customer. One row per line, SKU order.
pub(crate) const ORDER_WITH_LINES_SQL: &str = concat!(
    "SELECT o.id, o.customer_id, o.checkout_id, \
     o.status, o.total_amount, o.currency, o.payment_intent_id, o.created_at, o.seq, \
     o.refund_status, o.po_number, o.invoice_id, o.authorized_amount, o.captured_amount, \
     o.refunded_amount, ol.order_id, ol.sku, ol.quantity, ol.unit_price, ol.line_total \
     FROM orders o LEFT JOIN order_lines ol ON ol.order_id = o.id WHERE o.id = $1 AND ",
    seen_by!("$2"),
    " ORDER BY ol.sku"
);

/// A page of the orders a customer sees (`$1`), after `seq` `$2`, at most `$3`, both stores.
pub(crate) fn orders_page_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders o WHERE {} AND o.seq > $2 ORDER BY o.seq LIMIT $3",
        seen_by!("$1")
    )
}

/// The lines of the orders a customer sees (`$1`) with `seq` from `$2` to `$3`, both stores.
pub(crate) const ORDER_LINES_PAGE_SQL: &str = concat!(
    "SELECT ol.order_id, ol.sku, ol.quantity, ol.unit_price, ol.line_total, o.currency \
     FROM order_lines ol JOIN orders o ON o.id = ol.order_id WHERE ",
    seen_by!("$1"),
    " AND o.seq BETWEEN $2 AND $3 ORDER BY ol.sku"
);

/// A customer's cart with its lines, in one statement in both stores: `$1` cart, `$2`
/// customer. One row per line in SKU order; a cart without lines is one row with NULL line
/// columns. The column names are those PostgreSQL's cart change answers with (migration 0050).
pub(crate) const CART_SQL: &str = "SELECT c.status AS cart_status, p.sku AS line_sku, \
     l.quantity AS line_quantity FROM carts c \
     LEFT JOIN cart_lines l ON l.cart_id = c.id LEFT JOIN products p ON p.id = l.product_id \
     WHERE c.id = $1 AND c.customer_id = $2 ORDER BY p.sku";

pub(crate) fn cart_must_be_open(status: &str) -> Result<(), StoreError> {
    match CartStatus::parse(status) {
        Some(CartStatus::Open) => Ok(()),
        Some(other) => Err(StoreError::CartNotOpen(other)),
        None => Err(StoreError::Corrupt(format!("cart status {status:?}"))),
    }
}

/// The version must match, stock stay above what is reserved, and the rules the patch leaves
/// must be ones some quantity can meet. Answers those rules.
pub(crate) fn check_patch(
    current: &Product,
    expected_version: i64,
    patch: &ProductPatch,
) -> Result<OrderingRules, StoreError> {
    if current.version != expected_version {
        return Err(StoreError::VersionMismatch {
            current: current.version,
        });
    }
    let rules = patch
        .rules_over(current.rules)
        .map_err(|e| StoreError::InvalidProduct(e.to_string()))?;
    if let Some(stock) = patch.stock {
        if stock.get() < current.reserved {
            return Err(StoreError::StockBelowReserved {
                stock: stock.get(),
                reserved: current.reserved,
            });
        }
    }
    Ok(rules)
}

/// Cuts a `limit + 1` fetch down to `limit` and names the cursor of the next page.
pub(crate) fn page_of<T>(items: &mut Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(&cursor).or(Some(String::new()))
    } else {
        None
    };
    Page {
        items: std::mem::take(items),
        next,
    }
}

pub(crate) fn attach_lines(orders: &mut [Order], lines: Vec<(OrderId, OrderLine)>) {
    let mut by_order: HashMap<OrderId, Vec<OrderLine>> = HashMap::new();
    for (order, line) in lines {
        by_order.entry(order).or_default().push(line);
    }
    for order in orders {
        order.lines = by_order.remove(&order.id).unwrap_or_default();
    }
}

/// The `order.paid` outbox row of a completed checkout (promise 5).
pub(crate) struct OutboxRow {
    pub event_id: uuid::Uuid,
    pub payload: String,
}

/// How a placed order is paid, as its fulfilment event says.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Paid<'a> {
    Card(&'a str),
    /// Placed on account: the invoice that bills it.
    OnAccount(crate::domain::InvoiceId),
}

/// A shipment's id; its capture's idempotency key is derived from it.
pub type ShipmentId = uuid::Uuid;

/// An admin's shipment of an order under manual capture.
#[derive(Debug, Clone)]
pub struct NewShipment {
    pub id: ShipmentId,
    pub order: OrderId,
    /// Units shipped now, per SKU (a SKU named twice counts twice).
    pub lines: Vec<(Sku, u32)>,
    /// The order's last shipment: every unit not shipped by now is short.
    pub last: bool,
    pub lease_until: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// A shipment whose capture is to be made, or made again with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipmentTicket {
    pub id: ShipmentId,
    pub order_id: OrderId,
    pub payment_intent_id: String,
    /// What this shipment captures (0: nothing shipped, the authorization is released).
    pub amount: i64,
    /// The order's last shipment: the rest of the authorization is released.
    pub final_capture: bool,
    /// What the order's earlier shipments captured.
    pub captured_before: i64,
    pub capture_key: String,
}

/// The capture key of a shipment: every retry of its capture sends the same one.
pub fn capture_key(shipment: ShipmentId) -> String {
    format!("shipment-{shipment}-capture")
}

/// An order line as a shipment sees it.
#[derive(Debug, Clone)]
pub(crate) struct ShippableLine {
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: i64,
    pub unit_price: i64,
    pub shipped: i64,
    pub short: i64,
}

/// One line of a planned shipment: units shipped now and units declared short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PlannedLine {
    #[serde(skip)]
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: i64,
    pub short: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShipmentPlan {
    pub amount: i64,
    pub final_capture: bool,
    pub lines: Vec<PlannedLine>,
}

/// The one rule for a shipment, both stores: every SKU must be of the order, never more
/// units than are left to ship, something must ship unless it is the last shipment; the
/// amount is the shipped units at their order prices (promise 6). The shipment is the last
/// when asked, or when no unit is left to ship after it; then every unit left is short.
pub(crate) fn plan_shipment(
    lines: &[ShippableLine],
    wanted: &[(Sku, u32)],
    last: bool,
) -> Result<ShipmentPlan, StoreError> {
    let mut asked: HashMap<&Sku, i64> = HashMap::new();
    for (sku, quantity) in wanted {
        if !lines.iter().any(|l| &l.sku == sku) {
            return Err(StoreError::BadShipment(format!(
                "{sku} is not a line of this order"
            )));
        }
        *asked.entry(sku).or_default() += i64::from(*quantity);
    }
    let mut planned = Vec::with_capacity(lines.len());
    let mut amount: i64 = 0;
    let mut left_after = 0;
    for line in lines {
        let ship = asked.get(&line.sku).copied().unwrap_or(0);
        let left = line.quantity - line.shipped - line.short;
        if ship > left {
            return Err(StoreError::BadShipment(format!(
                "{} has {left} units left to ship, not {ship}",
                line.sku
            )));
        }
        amount = line
            .unit_price
            .checked_mul(ship)
            .and_then(|a| a.checked_add(amount))
            .ok_or(StoreError::Money(MoneyError::Overflow))?;
        left_after += left - ship;
        planned.push(PlannedLine {
            product_id: line.product_id,
            sku: line.sku.clone(),
            quantity: ship,
            short: left - ship,
        });
    }
    let final_capture = last || left_after == 0;
    for line in &mut planned {
        if !final_capture {
            line.short = 0;
        }
    }
    if amount == 0 && !final_capture {
        return Err(StoreError::BadShipment("nothing to ship".into()));
    }
    planned.retain(|l| l.quantity > 0 || l.short > 0);
    Ok(ShipmentPlan {
        amount,
        final_capture,
        lines: planned,
    })
}

/// Shipment statements shared by both stores.
pub(crate) const SHIPPABLE_ORDER_SQL: &str = "SELECT status, checkout_id, payment_intent_id, \
     captured_amount FROM orders WHERE id = $1";
pub(crate) const SHIPMENT_CAPTURING_SQL: &str =
    "SELECT COUNT(*) FROM shipments WHERE order_id = $1 AND status = 'capturing'";
pub(crate) const SHIPPABLE_LINES_SQL: &str = "SELECT product_id, sku, quantity, unit_price, \
     shipped, short FROM order_lines WHERE order_id = $1 ORDER BY product_id";
/// `$1` id, `$2` order, `$3` amount, `$4` final, `$5` key, `$6` lines JSON, `$7` lease, `$8` now.
pub(crate) const INSERT_SHIPMENT_SQL: &str = "INSERT INTO shipments (id, order_id, seq, amount, \
     final_capture, status, capture_key, lines, lease_until, created_at, updated_at) \
     VALUES ($1, $2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM shipments WHERE order_id = $2), \
     $3, $4, 'capturing', $5, $6, $7, $8, $8)";
/// `$1` order, `$2` product, `$3` shipped now, `$4` short now.
pub(crate) const SHIP_LINE_SQL: &str = "UPDATE order_lines SET shipped = shipped + $3, \
     short = short + $4 WHERE order_id = $1 AND product_id = $2";
/// Short units leave the sale (`$1` checkout, `$2` product, `$3` units): the confirmed
/// reservation shrinks, or is released when all of it is short, and the units are back in
/// stock, so stock + sold still adds up (promise 1).
pub(crate) const SHORT_PART_SQL: &str = "UPDATE reservations SET quantity = quantity - $3 \
     WHERE checkout_id = $1 AND product_id = $2 AND status = 'confirmed' AND quantity > $3";
pub(crate) const SHORT_WHOLE_SQL: &str = "UPDATE reservations SET status = 'released' \
     WHERE checkout_id = $1 AND product_id = $2 AND status = 'confirmed' AND quantity = $3";
pub(crate) const RESTOCK_SQL: &str = "UPDATE products SET stock = stock + $2 WHERE id = $1";
/// `$1` lease until, `$2` now, `$3` limit; `{}`: PostgreSQL's row lock clause.
pub(crate) const SHIPMENT_COLUMNS: &str = "s.id, s.order_id, o.payment_intent_id, s.amount, \
     s.final_capture, s.capture_key, o.captured_amount";
/// Settles a capturing shipment (`$1`, `$2` now): answers its order, amount and finality.
pub(crate) const SHIPMENT_CAPTURED_SQL: &str = "UPDATE shipments SET status = 'captured', \
     lease_until = NULL, updated_at = $2 WHERE id = $1 AND status = 'capturing' \
     RETURNING order_id, amount, final_capture";
/// `$1` order, `$2` amount captured now, `$3` final, `$4` now.
pub(crate) const ORDER_CAPTURED_SQL: &str = "UPDATE orders SET \
     captured_amount = captured_amount + $2, \
     status = CASE WHEN NOT $3 THEN 'partially_fulfilled' \
                   WHEN captured_amount + $2 = 0 THEN 'cancelled' ELSE 'fulfilled' END, \
     updated_at = $4 WHERE id = $1";
pub(crate) const SHIPMENT_FAILED_SQL: &str = "UPDATE shipments SET status = 'failed', \
     failure = $2, lease_until = NULL, updated_at = $3 WHERE id = $1 AND status = 'capturing' \
     RETURNING lines";
/// A refused shipment gives its units back to ship (`$1` shipment, `$2` sku, `$3` units):
/// nothing was captured for them.
pub(crate) const UNSHIP_LINE_SQL: &str = "UPDATE order_lines SET shipped = shipped - $3 \
     WHERE order_id = (SELECT order_id FROM shipments WHERE id = $1) \
     AND product_id = (SELECT id FROM products WHERE sku = $2) AND shipped >= $3";

/// `(sku, units shipped)` of a shipment's stored lines (`[{sku, quantity, short}]`).
pub(crate) fn shipped_units(raw: &str) -> Result<Vec<(String, i64)>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Line {
        sku: String,
        quantity: i64,
    }
    let lines: Vec<Line> = serde_json::from_str(raw)
        .map_err(|e| StoreError::Corrupt(format!("shipment lines: {e}")))?;
    Ok(lines
        .into_iter()
        .filter(|l| l.quantity > 0)
        .map(|l| (l.sku, l.quantity))
        .collect())
}

/// The order's status where shipments may be made.
pub(crate) fn shippable(status: &str) -> Result<(), StoreError> {
    match crate::domain::OrderStatus::parse(status) {
        Some(
            crate::domain::OrderStatus::Authorized | crate::domain::OrderStatus::PartiallyFulfilled,
        ) => Ok(()),
        Some(other) => Err(StoreError::OrderState(other)),
        None => Err(StoreError::Corrupt(format!("order status {status:?}"))),
    }
}

/// The `order.shipment_captured` outbox row: keyed by the shipment (the outbox holds one row
/// per topic and key), the payload names the order.
pub(crate) fn shipment_captured_event(
    shipment: ShipmentId,
    order: OrderId,
    amount: i64,
    final_capture: bool,
    currency: &str,
    now: DateTime<Utc>,
) -> OutboxRow {
    let event_id = uuid::Uuid::new_v4();
    let payload = serde_json::json!({
        "event_id": event_id,
        "order_id": order,
        "shipment_id": shipment,
        "captured": {"amount": amount, "currency": currency},
        "final": final_capture,
        "captured_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    OutboxRow {
        event_id,
        payload: payload.to_string(),
    }
}

/// A partial refund's id; its idempotency key is derived from it.
pub type LineRefundId = uuid::Uuid;

/// An admin's partial refund by line.
#[derive(Debug, Clone)]
pub struct NewLineRefund {
    pub id: LineRefundId,
    pub order: OrderId,
    pub lines: Vec<(Sku, u32)>,
    /// Instead of `lines`: every unit still refundable (what a whole refund of an order with
    /// partial refunds or manual captures gives back).
    pub rest: bool,
    /// Put the refunded units back in stock (once each).
    pub restock: bool,
    pub lease_until: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// A partial refund to ask the gateway for, or to ask again with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRefundTicket {
    pub id: LineRefundId,
    pub order_id: OrderId,
    pub payment_intent_id: String,
    pub amount: i64,
    pub refund_key: String,
}

/// Where a partial refund stands at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRefundStatus {
    Pending,
    Succeeded,
    Failed,
}

pub fn line_refund_key(id: LineRefundId) -> String {
    format!("refund-{id}")
}

/// An order line as a partial refund sees it.
#[derive(Debug, Clone)]
pub(crate) struct RefundableLine {
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: i64,
    pub unit_price: i64,
    pub shipped: i64,
    pub refunded: i64,
}

/// One line of a partial refund, as stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct RefundedLine {
    pub product_id: i64,
    pub sku: Sku,
    pub quantity: i64,
}

/// The one rule for a partial refund, both stores: SKUs of the order only, never more units
/// than are refundable (ordered, or under manual capture shipped, less those refunded or
/// being refunded), and never more money than was captured, counting refunds in flight.
/// `wanted` `None`: every refundable unit. Answers the lines and the amount.
pub(crate) fn plan_line_refund(
    lines: &[RefundableLine],
    wanted: Option<&[(Sku, u32)]>,
    manual: bool,
    captured: i64,
    refunded_or_in_flight: i64,
) -> Result<(Vec<RefundedLine>, i64), StoreError> {
    let sold = |line: &RefundableLine| if manual { line.shipped } else { line.quantity };
    let rest: Vec<(Sku, u32)>;
    let wanted = match wanted {
        Some(wanted) => wanted,
        None => {
            rest = lines
                .iter()
                .filter_map(|l| {
                    let left = u32::try_from(sold(l) - l.refunded).ok()?;
                    (left > 0).then(|| (l.sku.clone(), left))
                })
                .collect();
            &rest
        }
    };
    let mut asked: HashMap<&Sku, i64> = HashMap::new();
    for (sku, quantity) in wanted {
        if !lines.iter().any(|l| &l.sku == sku) {
            return Err(StoreError::BadRefund(format!(
                "{sku} is not a line of this order"
            )));
        }
        *asked.entry(sku).or_default() += i64::from(*quantity);
    }
    let mut planned = Vec::new();
    let mut amount: i64 = 0;
    for line in lines {
        let Some(&quantity) = asked.get(&line.sku) else {
            continue;
        };
        let refundable = sold(line) - line.refunded;
        if quantity > refundable {
            return Err(StoreError::BadRefund(format!(
                "{} has {refundable} refundable units, not {quantity}",
                line.sku
            )));
        }
        amount = line
            .unit_price
            .checked_mul(quantity)
            .and_then(|a| a.checked_add(amount))
            .ok_or(StoreError::Money(MoneyError::Overflow))?;
        planned.push(RefundedLine {
            product_id: line.product_id,
            sku: line.sku.clone(),
            quantity,
        });
    }
    if amount == 0 {
        return Err(StoreError::BadRefund("nothing to refund".into()));
    }
    if refunded_or_in_flight + amount > captured {
        return Err(StoreError::BadRefund(format!(
            "{amount} more would refund more than the {captured} captured"
        )));
    }
    Ok((planned, amount))
}

/// Partial-refund statements shared by both stores.
pub(crate) const REFUNDABLE_ORDER_SQL: &str = "SELECT status, payment_intent_id, total_amount, \
     authorized_amount, captured_amount, refunded_amount, currency, \
     (SELECT CAST(COALESCE(SUM(r.amount), 0) AS BIGINT) FROM order_refunds r \
        WHERE r.order_id = orders.id AND r.status IN ('requested', 'pending')) AS in_flight \
     FROM orders WHERE id = $1";
pub(crate) const REFUNDABLE_LINES_SQL: &str = "SELECT product_id, sku, quantity, unit_price, \
     shipped, refunded FROM order_lines WHERE order_id = $1 ORDER BY product_id";
/// `$1` id, `$2` order, `$3` amount, `$4` lines, `$5` restock, `$6` key, `$7` lease, `$8` now.
pub(crate) const INSERT_LINE_REFUND_SQL: &str = "INSERT INTO order_refunds (id, order_id, \
     amount, lines, restock, status, refund_key, lease_until, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, 'requested', $6, $7, $8, $8)";
/// `$1` order, `$2` product, `$3` units (negative: given back).
pub(crate) const REFUND_LINE_SQL: &str =
    "UPDATE order_lines SET refunded = refunded + $3 WHERE order_id = $1 AND product_id = $2";
pub(crate) const RESTOCKED_LINE_SQL: &str =
    "UPDATE order_lines SET restocked = restocked + $3 WHERE order_id = $1 AND product_id = $2 \
     AND restocked + $3 <= refunded";
pub(crate) const LINE_REFUND_ROW_SQL: &str = "SELECT r.order_id, r.amount, r.lines, r.restock, \
     r.status, o.checkout_id, o.currency FROM order_refunds r JOIN orders o ON o.id = r.order_id \
     WHERE r.id = $1";
/// `$1` id, `$2` status, `$3` gateway refund id, `$4` now.
pub(crate) const SETTLE_LINE_REFUND_SQL: &str = "UPDATE order_refunds SET status = $2, \
     gateway_refund_id = COALESCE(gateway_refund_id, $3), lease_until = NULL, updated_at = $4 \
     WHERE id = $1";
/// `$1` order, `$2` amount, `$3` now: fully refunded once everything captured went back (and,
/// under manual capture, nothing is left to ship).
pub(crate) const ORDER_REFUNDED_PART_SQL: &str = "UPDATE orders SET \
     refunded_amount = refunded_amount + $2, \
     status = CASE WHEN status <> 'partially_fulfilled' AND refunded_amount + $2 >= \
                   COALESCE(NULLIF(captured_amount, 0), total_amount) \
                   THEN 'refunded' ELSE status END, \
     refund_status = CASE WHEN status <> 'partially_fulfilled' AND refunded_amount + $2 >= \
                   COALESCE(NULLIF(captured_amount, 0), total_amount) \
                   THEN 'succeeded' ELSE refund_status END, \
     updated_at = $3 WHERE id = $1";
pub(crate) const LINE_REFUNDS_OF_PAYMENT_SQL: &str = "SELECT r.id, r.amount, r.status, \
     o.refunded_amount FROM orders o JOIN order_refunds r ON r.order_id = o.id \
     WHERE o.payment_intent_id = $1 ORDER BY r.created_at, r.id";
pub(crate) const LINE_REFUND_COLUMNS: &str = "r.id, r.order_id, o.payment_intent_id, r.amount, \
     r.refund_key";

/// Claims requested partial refunds whose lease ran out, both stores: `$1` lease until, `$2`
/// now, `$3` limit; `{lock}` as in [`claim_pending_refunds_sql`].
macro_rules! claim_stalled_line_refunds_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE order_refunds SET lease_until = $1 WHERE id IN ( \
               SELECT id FROM order_refunds WHERE status = 'requested' AND lease_until < $2 \
               ORDER BY lease_until LIMIT $3",
            $lock,
            ") RETURNING id"
        )
    };
}
pub(crate) use claim_stalled_line_refunds_sql;

/// Claims partial refunds Stripe holds pending, unchanged since `$4` (their `refund.*` event
/// may be lost), both stores: `$1` lease until, `$2` now, `$3` limit; `{lock}` as in
/// [`claim_pending_refunds_sql`].
macro_rules! claim_pending_line_refunds_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE order_refunds SET lease_until = $1 WHERE id IN ( \
               SELECT id FROM order_refunds WHERE status = 'pending' \
                 AND gateway_refund_id IS NOT NULL AND updated_at < $4 \
                 AND (lease_until IS NULL OR lease_until < $2) \
               ORDER BY updated_at LIMIT $3",
            $lock,
            ") RETURNING id, gateway_refund_id"
        )
    };
}
pub(crate) use claim_pending_line_refunds_sql;

/// Orders a partial refund may be made of: paid or shipped ones.
pub(crate) fn refundable(status: &str) -> Result<(), StoreError> {
    use crate::domain::OrderStatus;
    match OrderStatus::parse(status) {
        Some(OrderStatus::Paid | OrderStatus::Fulfilled | OrderStatus::PartiallyFulfilled) => {
            Ok(())
        }
        Some(other) => Err(StoreError::OrderState(other)),
        None => Err(StoreError::Corrupt(format!("order status {status:?}"))),
    }
}

/// The `order.refunded` outbox row of a partial refund, keyed by the refund.
pub(crate) fn order_refunded_event(
    refund: LineRefundId,
    order: OrderId,
    amount: i64,
    currency: &str,
    lines: &[RefundedLine],
    now: DateTime<Utc>,
) -> OutboxRow {
    let event_id = uuid::Uuid::new_v4();
    let lines: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::json!({"sku": l.sku, "quantity": l.quantity}))
        .collect();
    let payload = serde_json::json!({
        "event_id": event_id,
        "order_id": order,
        "refund_id": refund,
        "refunded": {"amount": amount, "currency": currency},
        "lines": lines,
        "refunded_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    OutboxRow {
        event_id,
        payload: payload.to_string(),
    }
}

/// Where a dispute stands, as far as its order is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeStatus {
    Open,
    Won,
    Lost,
}

/// `$1` PaymentIntent, `$2` dispute, `$3` now: a dispute not seen before puts its order on
/// hold (a report of a dispute already open or closed changes nothing).
pub(crate) const DISPUTE_OPENED_SQL: &str = "UPDATE orders SET \
     status_before_dispute = status, status = 'disputed', dispute_id = $2, \
     dispute_status = 'open', updated_at = $3 \
     WHERE payment_intent_id = $1 AND (dispute_id IS NULL OR dispute_id <> $2) \
     RETURNING id, currency";
/// `$1` PaymentIntent, `$2` dispute, `$3` now, `$4` 'won' or 'lost': a dispute not closed yet
/// closes; won gives the order its status back, lost leaves it `refunded_by_dispute`.
pub(crate) const DISPUTE_CLOSED_SQL: &str = "UPDATE orders SET \
     status = CASE WHEN $4 = 'lost' THEN 'refunded_by_dispute' \
                   ELSE COALESCE(status_before_dispute, status) END, \
     dispute_id = $2, dispute_status = $4, updated_at = $3 \
     WHERE payment_intent_id = $1 \
       AND (dispute_id IS NULL OR dispute_id <> $2 OR dispute_status = 'open') \
     RETURNING id, currency";
pub(crate) const DISPUTED_ORDERS_SQL: &str =
    "SELECT id FROM orders WHERE status = 'disputed' ORDER BY updated_at DESC LIMIT $1";

/// The `order.disputed` outbox row: the fulfilment hold for the warehouse.
pub(crate) fn order_disputed_event(
    order: OrderId,
    dispute_id: &str,
    payment_intent_id: &str,
    now: DateTime<Utc>,
) -> OutboxRow {
    let event_id = uuid::Uuid::new_v4();
    let payload = serde_json::json!({
        "event_id": event_id,
        "order_id": order,
        "dispute_id": dispute_id,
        "payment_intent_id": payment_intent_id,
        "hold_fulfilment": true,
        "disputed_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    OutboxRow {
        event_id,
        payload: payload.to_string(),
    }
}

/// The capture method of one checkout (`$1`), both stores.
pub(crate) const CAPTURE_METHOD_SQL: &str = "SELECT capture_method FROM checkouts WHERE id = $1";

pub(crate) fn capture_method_of(raw: Option<String>) -> Result<CaptureMethod, StoreError> {
    let raw = raw.ok_or(StoreError::NotFound("checkout"))?;
    CaptureMethod::parse(&raw).ok_or_else(|| StoreError::Corrupt(format!("capture method {raw:?}")))
}

/// The order's move to `authorized` (`$1` order, `$2` PaymentIntent, `$3` authorized amount,
/// `$4` now), both stores.
pub(crate) const ORDER_AUTHORIZED_SQL: &str = "UPDATE orders SET status = 'authorized', \
     payment_intent_id = $2, authorized_amount = $3, captured_amount = 0, authorized_at = $4, \
     updated_at = $4 WHERE id = $1";

/// Orders still holding an authorization given before `$1`, oldest first, at most `$2`.
pub(crate) const AUTHORIZATIONS_BEFORE_SQL: &str = "SELECT id FROM orders \
     WHERE status IN ('authorized', 'partially_fulfilled') AND authorized_at < $1 \
     ORDER BY authorized_at LIMIT $2";

/// The `order.authorized` outbox row of an authorized checkout: the fulfilment event under
/// manual capture, carrying what `order.paid` carries, plus the authorized amount.
pub(crate) fn order_authorized_event(
    checkout: &Checkout,
    payment_intent_id: &str,
    amount: i64,
    lines: Vec<(OrderId, OrderLine)>,
    now: DateTime<Utc>,
) -> OutboxRow {
    let event_id = uuid::Uuid::new_v4();
    let lines: Vec<OrderLine> = lines.into_iter().map(|(_, line)| line).collect();
    let payload = serde_json::json!({
        "event_id": event_id,
        "order_id": checkout.order_id,
        "customer_id": checkout.customer_id,
        "checkout_id": checkout.id,
        "total": checkout.total,
        "authorized": {"amount": amount, "currency": checkout.total.currency()},
        "lines": lines,
        "payment_intent_id": payment_intent_id,
        "authorized_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    OutboxRow {
        event_id,
        payload: payload.to_string(),
    }
}

pub(crate) fn order_paid_event(
    checkout: &Checkout,
    paid: Paid<'_>,
    lines: Vec<(OrderId, OrderLine)>,
    po_number: Option<String>,
    now: DateTime<Utc>,
) -> OutboxRow {
    let event_id = uuid::Uuid::new_v4();
    let lines: Vec<OrderLine> = lines.into_iter().map(|(_, line)| line).collect();
    let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut payload = serde_json::json!({
        "event_id": event_id,
        "order_id": checkout.order_id,
        "customer_id": checkout.customer_id,
        "checkout_id": checkout.id,
        "total": checkout.total,
        "lines": lines,
        "paid_at": at,
    });
    if let Some(po_number) = po_number {
        payload["po_number"] = po_number.into();
    }
    // An order on account has no PaymentIntent: the key stays (consumers expect it), empty.
    match paid {
        Paid::Card(payment_intent_id) => payload["payment_intent_id"] = payment_intent_id.into(),
        Paid::OnAccount(invoice) => {
            payload["payment_intent_id"] = "".into();
            payload["on_account"] = true.into();
            payload["invoice_id"] = invoice.to_string().into();
        }
    }
    OutboxRow {
        event_id,
        payload: payload.to_string(),
    }
}

/// A stored idempotency key, as read under its row lock.
pub(crate) struct StoredKey {
    pub fingerprint: String,
    pub status: Option<i32>,
    pub body: Option<String>,
    pub locked_until: i64,
    pub created_at: i64,
    /// The checkout a start with this key reserved (written in the reservation's transaction).
    pub checkout_id: Option<uuid::Uuid>,
}

impl StoredKey {
    /// DESIGN §4: expired keys start afresh; a different request is a mismatch; a finished one
    /// replays; one whose start reserved a checkout answers that checkout; a running one
    /// conflicts unless its holder died (its lease ran out).
    pub fn decide(&self, fingerprint: &str, now: DateTime<Utc>) -> IdempotencyStart {
        let now_ms = to_millis(now);
        let retention = Duration::hours(IDEMPOTENCY_RETENTION_HOURS).num_milliseconds();
        if self.created_at + retention < now_ms {
            return IdempotencyStart::Proceed;
        }
        if self.fingerprint != fingerprint {
            return IdempotencyStart::Mismatch;
        }
        match (self.status, &self.body, self.checkout_id) {
            (Some(status), Some(body), _) => IdempotencyStart::Replay {
                status: u16::try_from(status).unwrap_or(500),
                body: body.clone(),
            },
            (_, _, Some(checkout)) => IdempotencyStart::Created(CheckoutId::from_uuid(checkout)),
            _ if self.locked_until < now_ms => IdempotencyStart::Proceed,
            _ => IdempotencyStart::InFlight {
                until: from_millis(self.locked_until).unwrap_or(now),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(product_id: i64, quantity: i64) -> WantedLine {
        WantedLine {
            product_id,
            sku: Sku::parse(&format!("p{product_id}")).unwrap(),
            quantity,
        }
    }

    #[test]
    fn lines_of_one_product_are_summed_and_sorted_by_product_id() {
        let lines = lock_order(vec![wanted(3, 1), wanted(1, 2), wanted(3, 4), wanted(2, 1)]);
        let got: Vec<(i64, i64)> = lines.iter().map(|l| (l.product_id, l.quantity)).collect();
        assert_eq!(got, vec![(1, 2), (2, 1), (3, 5)]);
    }

    const HOUR_MS: i64 = 3_600_000;

    /// A key stored at `created_at` by a request whose fingerprint is `"first"`.
    fn stored(finished: bool, created_at: i64, locked_until: i64) -> StoredKey {
        StoredKey {
            fingerprint: "first".into(),
            status: finished.then_some(201),
            body: finished.then(|| "{\"id\":\"c1\"}".to_owned()),
            locked_until,
            created_at,
            checkout_id: None,
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        from_millis(ms).expect("a time in range")
    }

    #[test]
    fn a_finished_key_replays_its_answer_and_refuses_another_request() {
        let key = stored(true, 0, 60_000);
        let replay = IdempotencyStart::Replay {
            status: 201,
            body: "{\"id\":\"c1\"}".into(),
        };
        assert_eq!(key.decide("first", at(HOUR_MS)), replay);
        assert_eq!(key.decide("other", at(HOUR_MS)), IdempotencyStart::Mismatch);
    }

    #[test]
    fn a_key_older_than_the_retention_is_treated_as_new() {
        let retention = IDEMPOTENCY_RETENTION_HOURS * HOUR_MS;
        let created = 1_000;
        for finished in [true, false] {
            let key = stored(finished, created, created + 60_000);
            for fingerprint in ["first", "other"] {
                assert_eq!(
                    key.decide(fingerprint, at(created + retention + 1)),
                    IdempotencyStart::Proceed,
                    "finished {finished}, {fingerprint}"
                );
            }
        }
        // On the last millisecond of the 24 hours it still counts.
        assert_eq!(
            stored(true, created, created + 60_000).decide("other", at(created + retention)),
            IdempotencyStart::Mismatch
        );
    }

    #[test]
    fn a_stale_in_flight_lock_is_taken_over() {
        let key = stored(false, 0, 60_000);
        let in_flight = IdempotencyStart::InFlight { until: at(60_000) };
        assert_eq!(key.decide("first", at(30_000)), in_flight);
        assert_eq!(key.decide("first", at(60_000)), in_flight);
        // The first request's holder died (its lock ran out): the retry goes ahead.
        assert_eq!(key.decide("first", at(60_001)), IdempotencyStart::Proceed);
        // A different request never takes another's key over, stale or not.
        assert_eq!(key.decide("other", at(60_001)), IdempotencyStart::Mismatch);
    }

    #[test]
    fn an_unanswered_start_that_reserved_answers_its_checkout_whatever_its_lease() {
        let checkout = CheckoutId::new();
        let key = StoredKey {
            checkout_id: Some(checkout.uuid()),
            ..stored(false, 0, 60_000)
        };
        for now in [30_000, 60_001] {
            assert_eq!(
                key.decide("first", at(now)),
                IdempotencyStart::Created(checkout)
            );
        }
        assert_eq!(key.decide("other", at(30_000)), IdempotencyStart::Mismatch);
        // A stored answer still wins, and the retention still ends the key.
        let finished = StoredKey {
            checkout_id: Some(checkout.uuid()),
            ..stored(true, 0, 60_000)
        };
        assert!(matches!(
            finished.decide("first", at(30_000)),
            IdempotencyStart::Replay { .. }
        ));
        let retention = IDEMPOTENCY_RETENTION_HOURS * HOUR_MS;
        assert_eq!(
            key.decide("first", at(retention + 1)),
            IdempotencyStart::Proceed
        );
    }

    fn priced(lines: &[(i64, u32)]) -> Vec<PricedLine> {
        let eur = crate::domain::Currency::parse("EUR").expect("a currency");
        lines
            .iter()
            .enumerate()
            .map(|(i, &(price, quantity))| PricedLine {
                product_id: i as i64,
                sku: Sku::parse(&format!("p{i}")).expect("a sku"),
                quantity: Quantity::new(quantity.into()).expect("a quantity in range"),
                unit_price: crate::domain::Money::new(price, eur).expect("a price"),
                list_price: crate::domain::Money::new(price, eur).expect("a price"),
                rules: OrderingRules::default(),
            })
            .collect()
    }

    /// Runs the retry loop over scripted attempt outcomes (`None` = reserved) and returns its
    /// answer with the read-backs the attempts were asked for.
    fn retry_script(script: &[Option<Retry>]) -> (Result<(), StoreError>, Vec<ReadBack>) {
        let mut outcomes = script.iter().copied();
        let mut asked = Vec::new();
        let answer = futures::executor::block_on(reserve_retrying(|read_back| {
            asked.push(read_back);
            let outcome = outcomes.next().expect("the loop stopped within the script");
            std::future::ready(Ok(outcome.map_or(Ok(()), Err)))
        }));
        (answer, asked)
    }

    #[test]
    fn units_freed_meanwhile_never_end_as_a_price_change() {
        let mut script = vec![Some(Retry::Freed); UNLOCKED_READ_BACKS];
        script.push(None);

        let (answer, asked) = retry_script(&script);

        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(asked.len(), UNLOCKED_READ_BACKS + 1);
        assert_eq!(
            asked.last(),
            Some(&ReadBack::Locked),
            "the last read-back is locked"
        );
    }

    #[test]
    fn only_moved_prices_count_toward_the_price_limit() {
        let (answer, asked) = retry_script(&[
            Some(Retry::PriceMoved),
            Some(Retry::Freed),
            Some(Retry::PriceMoved),
            Some(Retry::Freed),
            Some(Retry::PriceMoved),
        ]);

        assert!(
            matches!(answer, Err(StoreError::PriceChanged)),
            "{answer:?}"
        );
        assert_eq!(asked.len(), 5);
    }

    #[test]
    fn a_locked_read_back_that_still_finds_units_freed_stops_the_loop() {
        let (answer, asked) = retry_script(&[Some(Retry::Freed); UNLOCKED_READ_BACKS + 1]);

        assert!(matches!(answer, Err(StoreError::Corrupt(_))), "{answer:?}");
        assert_eq!(asked.len(), UNLOCKED_READ_BACKS + 1);
    }

    #[test]
    fn a_read_back_that_finds_room_at_the_same_price_is_a_retry_not_a_shortfall() {
        let lines = priced(&[(450, 2)]);
        let now = |available, price| RowNow {
            available,
            unit_price: crate::domain::Money::new(
                price,
                crate::domain::Currency::parse("EUR").expect("a currency"),
            )
            .expect("a price"),
        };

        assert!(matches!(
            judge_misses(&[(&lines[0], now(2, 450))]),
            Guarded::Retry(Retry::Freed)
        ));
        assert!(matches!(
            judge_misses(&[(&lines[0], now(1, 450))]),
            Guarded::Short(_)
        ));
        assert!(matches!(
            judge_misses(&[(&lines[0], now(1, 500))]),
            Guarded::Retry(Retry::PriceMoved)
        ));
    }

    /// The exact total in i128, which cannot overflow for these inputs.
    fn exact(lines: &[(i64, u32)]) -> i128 {
        lines
            .iter()
            .map(|&(price, quantity)| i128::from(price) * i128::from(quantity))
            .sum()
    }

    #[test]
    fn a_total_past_the_largest_amount_is_an_overflow_error() {
        let total = order_total(&priced(&[(i64::MAX, 1), (1, 1)]));
        assert!(matches!(
            total,
            Err(StoreError::Money(MoneyError::Overflow))
        ));
    }

    proptest::proptest! {
        /// Catalogue prices up to 10^12 minor units and quantities up to the line maximum.
        #[test]
        fn order_totals_of_catalogue_sized_lines_are_exact(
            lines in proptest::collection::vec((0i64..=1_000_000_000_000, 1u32..=10_000), 1..=50)
        ) {
            let total = order_total(&priced(&lines)).expect("these totals fit in an i64");
            proptest::prop_assert_eq!(i128::from(total.amount()), exact(&lines));
        }

        /// Any price at all: the total is exact or an overflow error, never a wrapped figure.
        #[test]
        fn order_totals_are_exact_or_overflow_and_never_wrap(
            lines in proptest::collection::vec((0i64..=i64::MAX, 1u32..=10_000), 1..=50)
        ) {
            match order_total(&priced(&lines)) {
                Ok(total) => proptest::prop_assert_eq!(i128::from(total.amount()), exact(&lines)),
                Err(StoreError::Money(MoneyError::Overflow)) => {
                    // Some prefix of the sum (or one line) left the i64 range.
                    let mut running = 0i128;
                    let overflowed = lines.iter().any(|&(price, quantity)| {
                        let line = i128::from(price) * i128::from(quantity);
                        running += line;
                        line > i128::from(i64::MAX) || running > i128::from(i64::MAX)
                    });
                    proptest::prop_assert!(overflowed);
                }
                Err(other) => proptest::prop_assert!(false, "unexpected error {other}"),
            }
        }
    }
}
