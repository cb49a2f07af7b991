//! Structured logs through `tracing`: text for people, JSON for machines. Every request runs
//! in a span carrying its request id (see `http::router`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` overrides the default filter. Logs go to
/// stderr so that command output (the audit report) stays clean on stdout.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests build several apps in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Raises the open-file soft limit to the hard limit (each keep-alive connection is a file
/// descriptor) and says so in the log.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(
            open_files = limit,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// A warning that may fire once per request at saturation, logged as one summary line per
/// interval instead: the first occurrence at once, then at most one line per
/// [`SUMMARY_EVERY`] with how many happened since the last line and the latest cause.
pub struct Summarised {
    what: &'static str,
    since_last: AtomicU64,
    /// When the last line was written (ms since the process's first summary; `u64::MAX` = never).
    last_line_ms: AtomicU64,
}

/// One summary line per warning kind at most this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

fn process_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Summarised {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            since_last: AtomicU64::new(0),
            last_line_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts one occurrence; writes the summary line when one is due. Returns whether it did.
    pub fn warn(&self, cause: &dyn std::fmt::Display) -> bool {
        let count = self.since_last.fetch_add(1, Ordering::AcqRel) + 1;
        let now = process_ms();
        let last = self.last_line_ms.load(Ordering::Acquire);
        let due = last == u64::MAX || now.saturating_sub(last) >= SUMMARY_EVERY.as_millis() as u64;
        if !due
            || self
                .last_line_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        let count = self.since_last.swap(0, Ordering::AcqRel).max(count);
        let window_s = if last == u64::MAX {
            0.0
        } else {
            now.saturating_sub(last) as f64 / 1000.0
        };
        tracing::warn!(
            occurrences = count,
            window_s,
            last_error = %cause,
            "{} (one line per {} s at most)",
            self.what,
            SUMMARY_EVERY.as_secs()
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summarised_warning_writes_one_line_per_interval_however_often_it_fires() {
        let summary = Summarised::new("test warning");
        let lines = (0..1000).filter(|_| summary.warn(&"cause")).count();
        assert_eq!(lines, 1);
        assert_eq!(summary.since_last.load(Ordering::Acquire), 999);
    }

    #[test]
    fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
        raise_open_file_limit();
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        // macOS caps the soft limit below an unlimited hard one; elsewhere they are equal.
        assert!(soft == hard || cfg!(target_os = "macos"), "{soft} < {hard}");
    }
}
