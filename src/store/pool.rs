//! Pool settings shared by both stores, and a count of how often the store reached for a
//! connection: every statement needs one, so a count that does not move proves a request never
//! touched the database (a refused flash-sale buyer, DESIGN §5).
//!
//! sqlx pings every idle connection before handing it out by default: one extra round trip per
//! store call, on the hot path of every checkout. A connection that was just returned is as
//! good as the last statement it ran, so only connections idle for longer are pinged, and every
//! connection is pinged again for a while after any of them was found broken (the database
//! restarted or dropped its sessions): the others in the pool are likely dead too, and a ping
//! swaps them for fresh ones instead of failing a request on each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::pool::PoolOptions;
use sqlx::{Connection as _, Database};

/// Idle longer than this and a connection is pinged before use (a server restart or a closed
/// socket shows there, not as a failed statement).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);

/// A request waits at most this long for a PostgreSQL pool connection, then answers `503`
/// with `Retry-After` instead of queueing without bound.
pub const PG_ACQUIRE_DEADLINE: Duration = Duration::from_secs(10);

/// After a broken connection, every connection is pinged before use for this long.
const PING_ALL_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// When a connection was last found broken (ms since the epoch; 0 = never). Process-wide: a
/// failure seen by one pool makes every pool careful for a while, which costs pings, not
/// answers.
static LAST_CONNECTION_FAILURE_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether `e` says the connection itself is gone (socket, protocol, or the server ending the
/// session: SQLSTATE classes 08 and 57), rather than the statement failing.
pub(super) fn is_connection_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
        _ => false,
    }
}

/// Remember that a connection was found broken: pool connections are pinged before use for a
/// while.
pub(super) fn note_connection_failure() {
    LAST_CONNECTION_FAILURE_MS.store(now_ms(), Ordering::Relaxed);
}

fn failed_recently() -> bool {
    let last = LAST_CONNECTION_FAILURE_MS.load(Ordering::Relaxed);
    last != 0 && now_ms().saturating_sub(last) < PING_ALL_AFTER_FAILURE.as_millis() as u64
}

/// How many times the store took a connection from its pool.
#[derive(Debug, Clone, Default)]
pub struct Acquisitions(Arc<AtomicU64>);

impl Acquisitions {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// `options` with the idle-only ping, counting every connection handed out (new ones
    /// through `after_connect`, reused ones through `before_acquire`).
    pub fn options<DB: Database>(&self, options: PoolOptions<DB>) -> PoolOptions<DB> {
        let (fresh, reused) = (self.clone(), self.clone());
        options
            // sqlx warns once per slow acquisition: at saturation one line per request. The
            // requests that waited too long are summarised by the HTTP layer instead.
            .acquire_slow_level(log::LevelFilter::Off)
            .test_before_acquire(false)
            .after_connect(move |_, _| {
                fresh.count();
                Box::pin(async { Ok(()) })
            })
            .before_acquire(move |conn, meta| {
                reused.count();
                Box::pin(async move {
                    if meta.idle_for > PING_WHEN_IDLE_FOR || failed_recently() {
                        // A dead connection is dropped and another one is taken.
                        let alive = conn.ping().await.is_ok();
                        if !alive {
                            note_connection_failure();
                        }
                        return Ok(alive);
                    }
                    Ok(true)
                })
            })
    }
}
