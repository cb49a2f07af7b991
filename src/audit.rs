//! `holdfast audit`: checks the promises of DESIGN §2 on a live store and reports one line per
//! promise. Race, chaos and load tests end by running it.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::domain::{CheckoutState, OrderStatus};
use crate::payments::{IntentStatus, PaymentGateway, RefundOutcome};
use crate::store::{CheckoutAuditRow, Store, StoreError};

/// One promise and what breaks it.
#[derive(Debug, Clone)]
pub struct Check {
    pub promise: &'static str,
    pub violations: Vec<String>,
    /// Why the check could not run, if it could not.
    pub skipped: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.checks.iter().all(|c| c.violations.is_empty())
    }

    pub fn violations(&self) -> impl Iterator<Item = &String> {
        self.checks.iter().flat_map(|c| c.violations.iter())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            match (&check.skipped, check.violations.is_empty()) {
                (Some(why), _) => writeln!(f, "skip  {} ({why})", check.promise)?,
                (None, true) => writeln!(f, "ok    {}", check.promise)?,
                (None, false) => {
                    writeln!(
                        f,
                        "FAIL  {} ({} violations)",
                        check.promise,
                        check.violations.len()
                    )?;
                    for v in check.violations.iter().take(20) {
                        writeln!(f, "      - {v}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the audit may consult besides the store.
pub struct AuditOptions<'a> {
    /// The gateway whose ledger promise 3 is checked against (`None`: skipped).
    pub gateway: Option<&'a dyn PaymentGateway>,
    pub now: DateTime<Utc>,
    /// How long a checkout may sit past its expiry or lease, or an event unpublished, before it
    /// counts as abandoned (workers run every second or so).
    pub grace: Duration,
}

impl Default for AuditOptions<'_> {
    fn default() -> Self {
        Self {
            gateway: None,
            now: Utc::now(),
            grace: Duration::seconds(60),
        }
    }
}

/// Promises 1, 4 and 5 from the store; 3 when a gateway is given.
pub async fn run(store: &dyn Store) -> Result<Report, StoreError> {
    run_with(store, AuditOptions::default()).await
}

pub async fn run_with(store: &dyn Store, options: AuditOptions<'_>) -> Result<Report, StoreError> {
    let checkouts = store.checkout_audit().await?;
    Ok(Report {
        checks: vec![
            no_oversell(store).await?,
            sales_within_units(store).await?,
            one_charge(&checkouts, options.gateway).await,
            no_ghosts(&checkouts, &options),
            one_event(&checkouts, &options),
            credit_within_limits(store).await?,
            lines_within_rules(store).await?,
            captured_within_authorized(&checkouts),
        ],
    })
}

/// Net terms: no company owes more than its credit limit, and what it owes is exactly what
/// its invoices still ask for (nothing consumed without an invoice, nothing paid twice).
async fn credit_within_limits(store: &dyn Store) -> Result<Check, StoreError> {
    let mut violations = Vec::new();
    for row in store.credit_audit().await? {
        if row.outstanding < 0 || row.outstanding > row.limit {
            violations.push(format!(
                "company {}: {} outstanding against a limit of {}",
                row.company, row.outstanding, row.limit
            ));
        }
        if row.outstanding != row.invoiced {
            violations.push(format!(
                "company {}: {} outstanding but its invoices owe {}",
                row.company, row.outstanding, row.invoiced
            ));
        }
        if row.voids_astray > 0 {
            violations.push(format!(
                "company {}: {} invoices void without their order refunded, or open or paid \
                 with it refunded",
                row.company, row.voids_astray
            ));
        }
    }
    Ok(Check {
        promise: "no company's outstanding credit above its limit; outstanding = open invoices; \
                  an invoice is void exactly when its order is refunded",
        violations,
        skipped: None,
    })
}

/// Ordering rules: no order line holds a quantity outside the rules its product had when the
/// line was reserved (recorded with the line by the database).
async fn lines_within_rules(store: &dyn Store) -> Result<Check, StoreError> {
    let violations = store
        .line_rules_audit()
        .await?
        .into_iter()
        .filter_map(|row| {
            let breach = row.rules.breach(&row.sku, row.quantity)?;
            Some(format!(
                "order {}: {} x {} breaks its {} of {}",
                row.order_id, row.quantity, row.sku, breach.rule, breach.allowed
            ))
        })
        .collect();
    Ok(Check {
        promise: "no line sold outside its ordering rules",
        violations,
        skipped: None,
    })
}

/// How many sales the audit reads (the most recent first).
const SALES_AUDITED: u32 = 10_000;

/// Promise 1 for flash sales (DESIGN §5): a sale never sells more units than it offered.
async fn sales_within_units(store: &dyn Store) -> Result<Check, StoreError> {
    let violations = store
        .flash_sale_stats(SALES_AUDITED)
        .await?
        .into_iter()
        .filter(|sale| sale.sold > sale.units)
        .map(|sale| {
            format!(
                "flash sale {} of {}: {} units sold of {}",
                sale.id, sale.sku, sale.sold, sale.units
            )
        })
        .collect();
    Ok(Check {
        promise: "flash sales sell at most their units",
        violations,
        skipped: None,
    })
}

/// Promise 1: `0 <= reserved <= stock`, `reserved` equals the live reservations, and stock is
/// accounted for by recorded adjustments minus units sold.
async fn no_oversell(store: &dyn Store) -> Result<Check, StoreError> {
    let mut violations = Vec::new();
    for row in store.inventory_audit().await? {
        if row.reserved < 0 || row.reserved > row.stock {
            violations.push(format!(
                "{}: reserved {} outside 0..={}",
                row.sku, row.reserved, row.stock
            ));
        }
        if row.reserved != row.live_reserved {
            violations.push(format!(
                "{}: reserved {} but live reservations hold {}",
                row.sku, row.reserved, row.live_reserved
            ));
        }
        if row.stock != row.adjusted_stock - row.sold {
            violations.push(format!(
                "{}: stock {} but adjustments {} minus sold {} = {}",
                row.sku,
                row.stock,
                row.adjusted_stock,
                row.sold,
                row.adjusted_stock - row.sold
            ));
        }
    }
    Ok(Check {
        promise:
            "1 no oversell: 0 <= reserved <= stock, reserved = live reservations, stock adds up",
        violations,
        skipped: None,
    })
}

/// Promise 3: the gateway holds at most one successful charge per checkout, and a checkout
/// with a successful charge ended paid or refunded.
async fn one_charge(checkouts: &[CheckoutAuditRow], gateway: Option<&dyn PaymentGateway>) -> Check {
    let promise = "3 at most one charge per checkout (gateway ledger)";
    let Some(gateway) = gateway else {
        return Check {
            promise,
            violations: Vec::new(),
            skipped: Some("no gateway ledger to compare with".into()),
        };
    };
    let mut violations = Vec::new();
    for row in checkouts {
        match gateway.intents_for_checkout(row.id).await {
            Ok(intents) => {
                let paid = intents
                    .iter()
                    .filter(|i| i.status == IntentStatus::Succeeded)
                    .count();
                if paid > 1 {
                    violations.push(format!("checkout {}: {paid} successful charges", row.id));
                }
                // A refund Stripe holds pending is on its way back; a failed one is not.
                let settled = matches!(
                    row.state,
                    CheckoutState::Completed | CheckoutState::Refunded
                ) || row.refund_due
                    || row.refund_status.as_deref() == Some("pending");
                if paid == 1 && !settled && row.state.is_terminal() {
                    violations.push(format!(
                        "checkout {}: charged but {} without a refund",
                        row.id,
                        row.state.as_str()
                    ));
                }
            }
            Err(e) => violations.push(format!("checkout {}: gateway not readable: {e}", row.id)),
        }
        if let Some(refund) = &row.refund_id {
            if let Some(disagreement) = refund_disagreement(gateway, row, refund).await {
                violations.push(disagreement);
            }
        }
    }
    Check {
        promise,
        violations,
        skipped: None,
    }
}

/// A refund holdfast and the gateway tell apart: refunded here but not settled there (or the
/// other way round), or failed on one side only.
async fn refund_disagreement(
    gateway: &dyn PaymentGateway,
    row: &CheckoutAuditRow,
    refund_id: &str,
) -> Option<String> {
    let there = match gateway.retrieve_refund(refund_id).await {
        Ok(refund) => refund,
        Err(e) => {
            return Some(format!(
                "checkout {}: refund {refund_id} not readable: {e}",
                row.id
            ))
        }
    };
    let here = match (row.state, row.refund_status.as_deref()) {
        (CheckoutState::Refunded, _) => RefundOutcome::Succeeded,
        (_, Some("failed")) => RefundOutcome::Failed,
        _ => RefundOutcome::Pending,
    };
    (here != there.outcome()).then(|| {
        format!(
            "checkout {}: refund {refund_id} is {here:?} here but {} at the gateway",
            row.id,
            there.status.as_deref().unwrap_or("null")
        )
    })
}

/// Promise 4: every checkout is terminal or owned by a live lease (or, when reserved, not long
/// past its expiry), money due back does not wait forever, and the order agrees.
fn no_ghosts(checkouts: &[CheckoutAuditRow], options: &AuditOptions<'_>) -> Check {
    let stale = options.now - options.grace;
    let mut violations = Vec::new();
    for row in checkouts {
        let id = row.id;
        match row.state {
            CheckoutState::Reserved if row.expires_at < stale => {
                violations.push(format!(
                    "checkout {id}: reserved, expired at {} and never released",
                    row.expires_at
                ));
            }
            CheckoutState::Charging | CheckoutState::RequiresAction
                if row.lease_until.is_none_or(|t| t < stale) =>
            {
                violations.push(format!(
                    "checkout {id}: {} with no live lease",
                    row.state.as_str()
                ));
            }
            _ => {}
        }
        if row.refund_due && row.lease_until.is_none_or(|t| t < stale) {
            violations.push(format!(
                "checkout {id}: money due back and nobody refunding it"
            ));
        }
        let expected: &[OrderStatus] = match row.state {
            CheckoutState::Reserved | CheckoutState::Charging => &[OrderStatus::PendingPayment],
            CheckoutState::RequiresAction => &[OrderStatus::PaymentProcessing],
            CheckoutState::Completed if row.authorized_amount.is_some() => &[
                OrderStatus::Authorized,
                OrderStatus::PartiallyFulfilled,
                OrderStatus::Fulfilled,
                // Manual capture: the last shipment shipped nothing at all.
                OrderStatus::Cancelled,
                OrderStatus::Refunded,
                OrderStatus::Disputed,
                OrderStatus::RefundedByDispute,
            ],
            CheckoutState::Completed => &[
                OrderStatus::AwaitingPaymentOnTerms,
                OrderStatus::Paid,
                OrderStatus::Fulfilled,
                OrderStatus::Refunded,
                OrderStatus::Disputed,
                OrderStatus::RefundedByDispute,
            ],
            CheckoutState::PaymentFailed => &[OrderStatus::PaymentFailed],
            CheckoutState::Expired | CheckoutState::Cancelled => {
                &[OrderStatus::Cancelled, OrderStatus::PaymentFailed]
            }
            CheckoutState::Refunded => &[OrderStatus::Refunded],
        };
        if !expected.contains(&row.order_status) {
            violations.push(format!(
                "checkout {id}: {} but its order is {}",
                row.state.as_str(),
                row.order_status.as_str()
            ));
        }
    }
    Check {
        promise: "4 no ghost orders: every checkout terminal or moved on by a live lease",
        violations,
        skipped: None,
    }
}

/// Manual capture: captured ≤ authorized, refunded ≤ captured, and nothing captured that no
/// captured shipment accounts for (no capture without a shipment).
fn captured_within_authorized(checkouts: &[CheckoutAuditRow]) -> Check {
    let mut violations = Vec::new();
    for row in checkouts {
        if row.overdrawn_lines > 0 {
            violations.push(format!(
                "checkout {}: {} lines restocked more than refunded, refunded more than \
                 ordered, or shipped more than ordered",
                row.id, row.overdrawn_lines
            ));
        }
        let Some(authorized) = row.authorized_amount else {
            if row.refunded_amount > row.total_amount {
                violations.push(format!(
                    "checkout {}: refunded {} of {} paid",
                    row.id, row.refunded_amount, row.total_amount
                ));
            }
            continue;
        };
        if row.captured_amount > authorized {
            violations.push(format!(
                "checkout {}: captured {} of {authorized} authorized",
                row.id, row.captured_amount
            ));
        }
        if row.refunded_amount > row.captured_amount {
            violations.push(format!(
                "checkout {}: refunded {} of {} captured",
                row.id, row.refunded_amount, row.captured_amount
            ));
        }
        if row.captured_amount != row.shipments_captured {
            violations.push(format!(
                "checkout {}: captured {} but its captured shipments add up to {}",
                row.id, row.captured_amount, row.shipments_captured
            ));
        }
    }
    Check {
        promise:
            "captures and refunds: captured <= authorized, refunded <= captured, every capture a shipment's, each unit restocked at most once",
        violations,
        skipped: None,
    }
}

/// Promise 5: every paid order has exactly one `order.paid` event, published in time; no
/// unpaid order has one.
fn one_event(checkouts: &[CheckoutAuditRow], options: &AuditOptions<'_>) -> Check {
    let stale = options.now - options.grace;
    let mut violations = Vec::new();
    for row in checkouts {
        let paid = matches!(
            row.order_status,
            OrderStatus::Paid
                | OrderStatus::Fulfilled
                | OrderStatus::AwaitingPaymentOnTerms
                | OrderStatus::Authorized
                | OrderStatus::PartiallyFulfilled
                | OrderStatus::Disputed
        );
        // A refunded order had its event if it was paid first; a refunded late success never was.
        // So had an authorized order whose shipments shipped nothing (cancelled).
        let refunded = matches!(
            row.order_status,
            OrderStatus::Refunded | OrderStatus::RefundedByDispute
        ) || (row.order_status == OrderStatus::Cancelled
            && row.state == CheckoutState::Completed
            && row.authorized_amount.is_some());
        match (paid, refunded, row.paid_events) {
            (true, _, 1) | (false, false, 0) | (false, true, 0 | 1) => {}
            (_, _, n) => violations.push(format!(
                "checkout {}: order {} with {n} order.paid events",
                row.id,
                row.order_status.as_str()
            )),
        }
        if row.oldest_unpublished.is_some_and(|t| t < stale) {
            violations.push(format!(
                "checkout {}: order.paid event unpublished since {:?}",
                row.id, row.oldest_unpublished
            ));
        }
    }
    Check {
        promise: "5 exactly one fulfilment event per paid order, published",
        violations,
        skipped: None,
    }
}
