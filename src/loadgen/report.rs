//! What a load run found, in the terms of DESIGN §2 and §10: units sold against units on
//! offer (promise 1), buyers refused while stock remained (promise 2), latency per call type,
//! throughput and the audit. One [`Summary`] is printed for people (`Display`) or as one JSON
//! object (`--json`) for scripts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Latency of one call type, in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyStats {
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    /// `None` for no samples: a percentile of nothing would be a made-up number.
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |p: f64| {
            // Nearest rank: the smallest sample with at least p of the samples at or below it.
            let rank = (p * samples.len() as f64).ceil() as usize;
            millis(samples[rank.clamp(1, samples.len()) - 1])
        };
        Some(Self {
            count: samples.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: millis(samples[samples.len() - 1]),
        })
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

/// The audit at the end of a run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AuditOutcome {
    Clean {
        report: String,
    },
    Violations {
        count: usize,
        report: String,
    },
    /// No store to read: the run only saw the HTTP side.
    Skipped {
        how_to_run: String,
    },
}

impl AuditOutcome {
    pub fn is_clean(&self) -> bool {
        matches!(self, AuditOutcome::Clean { .. })
    }

    pub fn has_violations(&self) -> bool {
        matches!(self, AuditOutcome::Violations { .. })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `flash-sale` or `steady`.
    pub scenario: &'static str,
    pub target: String,
    /// Flash sale only: whether buyers went through the admission gate (DESIGN §5) or, on a
    /// server without the flash-sale routes, straight to checkout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_gate: Option<bool>,
    /// Flash sale through the gate only: units one buyer could buy (each buyer's cart holds
    /// one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_buyer: Option<u32>,
    pub concurrency: usize,
    pub seed: u64,
    /// SKUs the run created (a flash sale has one; `steady` lists its prefix).
    pub skus: String,
    /// Units on offer over all of the run's SKUs.
    pub units: i64,
    /// Buyer journeys started in the timed phase (a flash-sale buyer, or one steady cart).
    pub attempts: u64,
    /// Units in checkouts the service answered `completed`.
    pub sold: i64,
    /// Units the service itself counts as sold at the end (stock taken out of the catalogue).
    pub sold_by_service: i64,
    /// Units still held by reservations at the end (abandoned checkouts, payments in flight).
    pub reserved_at_end: i64,
    /// Journeys refused for stock (`insufficient_stock` or `sold_out`).
    pub refused: u64,
    /// Refusals that stock left unsold at the end proves wrong (see `mod.rs`): must be 0.
    pub refused_with_stock: u64,
    /// Units sold beyond a SKU's stock, summed over SKUs: must be 0.
    pub oversold: i64,
    /// Journeys that ended in a 5xx, a transport failure or an answer outside the contract.
    pub errors: u64,
    /// Every classified answer that decided a journey's step, by kind.
    pub outcomes: BTreeMap<String, u64>,
    pub latency: BTreeMap<String, LatencyStats>,
    pub setup_seconds: f64,
    pub wall_seconds: f64,
    pub attempts_per_second: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    /// A few of the errors, verbatim, to start looking from.
    pub error_samples: Vec<String>,
    pub notes: Vec<String>,
    /// Connections the server's store took from its pool during the timed phase (read from
    /// its `/metrics` before and after; `None` when it does not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_connections: Option<u64>,
    /// The `users` scenario's own figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<UsersFigures>,
    pub audit: AuditOutcome,
}

/// What only the `users` scenario measures: connections, answers by status, the server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsersFigures {
    pub shoppers: usize,
    /// Shopper connections open when the timed phase ended (each shopper holds one).
    pub connections_open_at_end: u64,
    /// Most shopper connections open at once.
    pub connections_peak: u64,
    /// Connections opened again after one closed (an instance stopped, a transport error).
    pub reconnects: u64,
    /// Every answer by HTTP status, plus `transport` for calls that got none.
    pub statuses: BTreeMap<String, u64>,
    /// Checkouts the service left to expire (the abandoned ones), from `/v1/admin/ops`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkouts_by_state: Option<BTreeMap<String, i64>>,
    /// Peak resident memory (VmHWM) of each `--server-pid`, in MB.
    pub server_peak_rss_mb: BTreeMap<u32, f64>,
}

impl Summary {
    /// Non-zero exit: a unit was sold twice or the audit found a broken promise.
    pub fn failed(&self) -> bool {
        self.oversold > 0 || self.audit.has_violations()
    }

    /// How many answers of this kind were counted.
    pub fn outcome(&self, kind: &str) -> u64 {
        self.outcomes.get(kind).copied().unwrap_or(0)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} against {}", self.scenario, self.target)?;
        if let Some(gate) = self.admission_gate {
            let through = if gate { "yes" } else { "no" };
            writeln!(f, "  admission gate      {through}")?;
        }
        if let Some(limit) = self.max_per_buyer {
            writeln!(f, "  per-buyer limit     {limit} units")?;
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        writeln!(
            f,
            "  skus {}, concurrency {}, seed {}, setup {:.2} s (not timed)",
            self.skus, self.concurrency, self.seed, self.setup_seconds
        )?;
        writeln!(f, "  attempts            {}", self.attempts)?;
        writeln!(
            f,
            "  sold                {} of {} units (service counts {} sold, {} still reserved)",
            self.sold, self.units, self.sold_by_service, self.reserved_at_end
        )?;
        writeln!(
            f,
            "  refused             {} (while stock remained: {})",
            self.refused, self.refused_with_stock
        )?;
        writeln!(f, "  oversold            {}", self.oversold)?;
        writeln!(f, "  errors              {}", self.errors)?;
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        writeln!(f, "  outcomes            {}", outcomes.join(", "))?;
        writeln!(
            f,
            "  latency (ms)        {:<18} {:>7} {:>8} {:>8} {:>8} {:>8}",
            "call", "count", "p50", "p95", "p99", "max"
        )?;
        for (call, s) in &self.latency {
            writeln!(
                f,
                "                      {call:<18} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                s.count, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
            )?;
        }
        writeln!(
            f,
            "  throughput          {} attempts in {:.2} s = {:.0}/s; {} requests = {:.0}/s",
            self.attempts,
            self.wall_seconds,
            self.attempts_per_second,
            self.requests,
            self.requests_per_second
        )?;
        if let Some(connections) = self.store_connections {
            let per_attempt = connections as f64 / self.attempts.max(1) as f64;
            writeln!(
                f,
                "  store connections   {connections} during the run ({per_attempt:.2} per attempt)"
            )?;
        }
        if let Some(users) = &self.users {
            writeln!(
                f,
                "  connections         {} shoppers: {} open at the end, {} at most, {} reconnects",
                users.shoppers,
                users.connections_open_at_end,
                users.connections_peak,
                users.reconnects
            )?;
            let statuses: Vec<String> = users
                .statuses
                .iter()
                .map(|(status, n)| format!("{status} {n}"))
                .collect();
            writeln!(f, "  statuses            {}", statuses.join(", "))?;
            if let Some(states) = &users.checkouts_by_state {
                let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
                writeln!(f, "  checkouts (server)  {}", states.join(", "))?;
            }
            for (pid, mb) in &users.server_peak_rss_mb {
                writeln!(f, "  server peak RSS     pid {pid}: {mb:.1} MB")?;
            }
        }
        for sample in &self.error_samples {
            writeln!(f, "  error sample        {sample}")?;
        }
        match &self.audit {
            AuditOutcome::Clean { report } => {
                writeln!(f, "  audit               clean")?;
                write_indented(f, report)
            }
            AuditOutcome::Violations { count, report } => {
                writeln!(f, "  audit               {count} VIOLATIONS")?;
                write_indented(f, report)
            }
            AuditOutcome::Skipped { how_to_run } => {
                writeln!(f, "  audit               skipped: {how_to_run}")
            }
        }
    }
}

fn write_indented(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for line in text.lines() {
        writeln!(f, "    {line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_sorted_samples() {
        let samples = (1..=100).rev().map(Duration::from_millis).collect();
        let stats = LatencyStats::of(samples).expect("samples");
        assert_eq!(
            (stats.count, stats.p50_ms, stats.p95_ms, stats.p99_ms),
            (100, 50.0, 95.0, 99.0)
        );
        assert_eq!(stats.max_ms, 100.0);
    }

    #[test]
    fn a_single_sample_is_every_percentile_and_none_is_no_figure() {
        let one = LatencyStats::of(vec![Duration::from_micros(1500)]).expect("a sample");
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (1.5, 1.5, 1.5));
        assert_eq!(LatencyStats::of(Vec::new()), None);
    }
}
