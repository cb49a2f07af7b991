//! Pool settings shared by both stores, and a count of how often the store reached for a
//! connection: every statement needs one, so a count that does not move proves a request never
//! touched the database (a refused flash-sale buyer, DESIGN §5).
//!
//! sqlx pings every idle connection before handing it out by default: one extra round trip per
//! store call, on the hot path of every checkout. A connection that was just returned is as
//! good as the last statement it ran, so only connections idle for longer are pinged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolOptions;
use sqlx::{Connection as _, Database};

/// Idle longer than this and a connection is pinged before use (a server restart or a closed
/// socket shows there, not as a failed statement).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);

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
            .test_before_acquire(false)
            .after_connect(move |_, _| {
                fresh.count();
                Box::pin(async { Ok(()) })
            })
            .before_acquire(move |conn, meta| {
                reused.count();
                Box::pin(async move {
                    if meta.idle_for > PING_WHEN_IDLE_FOR {
                        // A dead connection is dropped and another one is taken.
                        return Ok(conn.ping().await.is_ok());
                    }
                    Ok(true)
                })
            })
    }
}
