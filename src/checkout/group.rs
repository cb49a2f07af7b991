//! Group reservation: checkouts that arrive while the hot product row is busy are reserved
//! together, in one transaction with one commit and one update per product row
//! (`Store::reserve_checkouts`), instead of queueing one by one on the row lock. Each request
//! still gets its own answer with the plain path's guarantees (promises 1 and 2).
//!
//! A collector task takes the first waiting request, drains what is already queued up to
//! `max_batch`, waits up to `linger` for more, and hands the batch to a task of its own. A few
//! batches run at once (fewer than the pool's connections); while they hold the row, new
//! requests queue up, so batches grow with the load. When the service is dropped the queue
//! closes, the collector finishes the batches in flight and stops. A request is never lost: if
//! its batch is dropped, its waiter hears an error.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::domain::Checkout;
use crate::observe;
use crate::store::{NewCheckout, Store, StoreError};

/// Batches in flight at once: enough to keep the next batch filling while one commits, well
/// below the connection pool so other work still gets connections.
const BATCHES_IN_FLIGHT: usize = 3;

/// `--group-reservations` (on by default: it won or tied against the plain path at 1, 8 and 64
/// connections, docs/performance.md), `--group-max-batch`, `--group-linger-us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    pub enabled: bool,
    pub max_batch: usize,
    pub linger: Duration,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch: 64,
            linger: Duration::ZERO,
        }
    }
}

struct Waiting {
    new: NewCheckout,
    reply: oneshot::Sender<Result<Checkout, StoreError>>,
}

/// The queue in front of the collector task.
pub struct Grouper {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl Grouper {
    /// Starts the collector on the current runtime.
    pub fn start(store: Arc<dyn Store>, settings: &GroupSettings) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(collect(
            waiting,
            store,
            settings.max_batch.max(1),
            settings.linger,
        ));
        Self { queue }
    }

    /// Reserves `new` in the next batch and waits for its own answer.
    pub async fn reserve(&self, new: NewCheckout) -> Result<Checkout, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Waiting { new, reply })
            .map_err(|_| StoreError::Unavailable("the reservation queue is closed".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the reservation batch was dropped".to_owned()))?
    }
}

async fn collect(
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    store: Arc<dyn Store>,
    max_batch: usize,
    linger: Duration,
) {
    let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut running = JoinSet::new();
    loop {
        // A permit first: while every batch in flight holds the row, requests pile up in the
        // queue and the next batch takes them all.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = waiting.recv().await else {
            break;
        };
        let batch = fill(first, &mut waiting, max_batch, linger).await;
        let store = store.clone();
        running.spawn(async move {
            run(store.as_ref(), batch).await;
            drop(permit);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// The first request, what is already queued, and what arrives within `linger`.
async fn fill(
    first: Waiting,
    waiting: &mut mpsc::UnboundedReceiver<Waiting>,
    max_batch: usize,
    linger: Duration,
) -> Vec<Waiting> {
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match waiting.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    if linger.is_zero() {
        return batch;
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max_batch {
        match tokio::time::timeout_at(deadline, waiting.recv()).await {
            Ok(Some(next)) => batch.push(next),
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// One batch: every waiter gets its own answer. A waiter whose answer is missing (or whose
/// batch is dropped) hears an error from `Grouper::reserve`.
async fn run(store: &dyn Store, batch: Vec<Waiting>) {
    let (news, replies): (Vec<NewCheckout>, Vec<_>) =
        batch.into_iter().map(|w| (w.new, w.reply)).unzip();
    observe::reservation_batch(news.len());
    let answers = store.reserve_checkouts(&news).await;
    for (reply, answer) in replies.into_iter().zip(answers) {
        // A waiter that gave up (its client went away) needs no answer.
        let _ = reply.send(answer);
    }
}
