//! `holdfast audit`: checks the promises of DESIGN §2 on a live store and reports one line per
//! promise. Race, chaos and load tests end by running it.

use std::fmt;

use crate::store::{Store, StoreError};

/// One promise and what breaks it.
#[derive(Debug, Clone)]
pub struct Check {
    pub promise: &'static str,
    pub violations: Vec<String>,
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
            if check.violations.is_empty() {
                writeln!(f, "ok    {}", check.promise)?;
            } else {
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
        Ok(())
    }
}

pub async fn run(store: &dyn Store) -> Result<Report, StoreError> {
    Ok(Report {
        checks: vec![no_oversell(store).await?],
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
    })
}
