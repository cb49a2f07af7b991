//! The public catalogue in memory: `GET /v1/products` and `GET /v1/products/{sku}` are answered
//! from a snapshot of every product, never from the pool the writes queue in.
//!
//! Freshness: a write of this instance that can move availability (checkouts, payments, admin
//! product changes) asks for a reload and answers only once a snapshot read after it is in
//! place (read-your-writes); other instances' writes arrive through PostgreSQL `LISTEN/NOTIFY`
//! (a statement trigger on `products`); and the snapshot is reloaded every
//! [`RESYNC_EVERY`] whatever happened, which bounds the staleness when a notification is
//! lost. Reloads are coalesced: at most one is in flight, at least [`MIN_GAP`] apart, and one
//! reload serves every change asked for before it started.
//!
//! The reservation stays the only authority on stock: a stale "available" only shows a number,
//! it never sells a unit.
//!
//! Each product's JSON is serialised once per snapshot (its ETag is a hash of those bytes), so a
//! read copies bytes instead of building and serialising views: at the peak every shopper's
//! catalogue page is answered from the same bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use axum::body::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};

use crate::domain::Product;
use crate::store::Store;

use super::views::ProductView;

/// Reloaded this often even when nothing signalled a change.
pub const RESYNC_EVERY: Duration = Duration::from_millis(250);
/// Two reloads are at least this far apart, however many writes ask for one.
pub const MIN_GAP: Duration = Duration::from_millis(10);
/// A write waits at most this long for the snapshot to show it.
const WRITE_WAITS_AT_MOST: Duration = Duration::from_secs(1);

/// One loaded catalogue, sorted by SKU.
pub struct Snapshot {
    pub products: Vec<ProductView>,
    /// Each product's view as JSON, same order as `products`.
    pub bodies: Vec<Bytes>,
    /// Quoted strong ETag of each product's view, same order as `products`.
    pub etags: Vec<String>,
    index: HashMap<String, usize>,
    /// Hash over every product's view: the list's ETag is derived from it.
    pub digest: String,
}

impl Snapshot {
    fn of(products: &[Product]) -> Self {
        let mut views: Vec<ProductView> = products.iter().map(ProductView::from).collect();
        views.sort_by(|a, b| a.sku.as_str().cmp(b.sku.as_str()));
        let mut all = Sha256::new();
        let bodies: Vec<Bytes> = views
            .iter()
            .map(|v| Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
            .collect();
        let etags = bodies
            .iter()
            .map(|body| {
                all.update(body);
                format!("\"{}\"", short_hash(body))
            })
            .collect();
        let index = views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.sku.as_str().to_owned(), i))
            .collect();
        Self {
            products: views,
            bodies,
            etags,
            index,
            digest: hex::encode(&all.finalize()[..8]),
        }
    }

    pub fn find(&self, sku: &str) -> Option<usize> {
        self.index.get(sku).copied()
    }

    /// Products after `after` (exclusive), as the store pages them.
    pub fn page_start(&self, after: Option<&str>) -> usize {
        after.map_or(0, |after| {
            self.products.partition_point(|p| p.sku.as_str() <= after)
        })
    }

    /// `{"data": [...], "next_cursor": ...}` of the products `start..end`, as `ListView`
    /// serialises it, from the stored bytes.
    pub fn page_body(&self, start: usize, end: usize, next_cursor: Option<&str>) -> Vec<u8> {
        let bodies = &self.bodies[start..end];
        let size = bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 64;
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(b"{\"data\":[");
        for (i, body) in bodies.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(body);
        }
        out.extend_from_slice(b"],\"next_cursor\":");
        // Writing a string or `null` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &next_cursor);
        out.push(b'}');
        out
    }

    /// The ETag of one page of the list.
    pub fn list_etag(&self, cursor: Option<&str>, limit: u32) -> String {
        let key = format!("{}|{}|{limit}", self.digest, cursor.unwrap_or(""));
        format!("\"{}\"", short_hash(key.as_bytes()))
    }
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// The live snapshot and the machinery that keeps it fresh.
pub struct Catalogue {
    current: RwLock<Option<Arc<Snapshot>>>,
    /// Changes asked for so far; a reload started after asking covers the change.
    asked: AtomicU64,
    /// The highest `asked` value a loaded snapshot covers.
    loaded: watch::Sender<u64>,
    wake: Arc<Notify>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self {
            current: RwLock::new(None),
            asked: AtomicU64::new(0),
            loaded: watch::Sender::new(0),
            wake: Arc::new(Notify::new()),
        }
    }
}

impl Catalogue {
    /// The snapshot, or `None` before the first load succeeded (callers read the store).
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.read().ok().and_then(|s| s.clone())
    }

    /// Products may have changed: reload soon, without waiting.
    pub fn changed(&self) -> u64 {
        let ticket = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.notify_one();
        ticket
    }

    /// Products changed: returns once a snapshot loaded after this call is in place (or after
    /// [`WRITE_WAITS_AT_MOST`], when the store is too slow to answer).
    pub async fn changed_and_reloaded(&self) {
        let ticket = self.changed();
        let mut loaded = self.loaded.subscribe();
        let _ = tokio::time::timeout(WRITE_WAITS_AT_MOST, loaded.wait_for(|&l| l >= ticket)).await;
    }

    /// Loads once now; the first snapshot before the server answers.
    pub async fn load(&self, store: &dyn Store) -> Result<(), crate::store::StoreError> {
        let ticket = self.asked.load(Ordering::Acquire);
        let products = store.all_products().await?;
        let snapshot = Arc::new(Snapshot::of(&products));
        if let Ok(mut current) = self.current.write() {
            *current = Some(snapshot);
        }
        self.loaded.send_if_modified(|l| {
            let moved = ticket > *l;
            *l = (*l).max(ticket);
            moved
        });
        Ok(())
    }

    /// Keeps the snapshot fresh until the catalogue is dropped: reloads on a change of this
    /// instance, on a notification from the store, and every [`RESYNC_EVERY`].
    pub fn spawn_refresher(self: &Arc<Self>, store: Arc<dyn Store>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let listener_target = weak.clone();
        let listener_store = store.clone();
        tokio::spawn(async move {
            let Some(mut changes) = listener_store.listen_product_changes().await else {
                return;
            };
            while changes.recv().await.is_some() {
                let Some(catalogue) = listener_target.upgrade() else {
                    return;
                };
                catalogue.changed();
            }
        });
        let wake = self.wake.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let woken = wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let pending = {
                    let Some(catalogue) = weak.upgrade() else {
                        return;
                    };
                    let loaded = *catalogue.loaded.borrow();
                    catalogue.asked.load(Ordering::Acquire) > loaded
                };
                if !pending {
                    let _ = tokio::time::timeout(RESYNC_EVERY, woken).await;
                }
                // Only the wake-up is held between reloads: a dropped catalogue ends the task.
                let Some(catalogue) = weak.upgrade() else {
                    return;
                };
                reload(&catalogue, store.as_ref(), &mut failures).await;
                drop(catalogue);
                tokio::time::sleep(MIN_GAP).await;
            }
        });
    }
}

async fn reload(catalogue: &Catalogue, store: &dyn Store, failures: &mut u32) {
    match catalogue.load(store).await {
        Ok(()) => {
            if *failures > 0 {
                tracing::info!(failed = *failures, "catalogue snapshot reloading again");
            }
            *failures = 0;
        }
        Err(e) => {
            // One line when reloading starts failing and one every ~10 s after, not one per try.
            if failures.is_multiple_of(40) {
                tracing::warn!(error = %e, failed = *failures + 1, "catalogue snapshot reload failed; serving the last one");
            }
            *failures += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, Money, Sku};
    use crate::http::views::ListView;

    fn product(id: i64, sku: &str, name: &str) -> Product {
        Product {
            id,
            sku: Sku::parse(sku).expect("a sku"),
            name: name.to_owned(),
            price: Money::new(450 + id, Currency::parse("EUR").expect("EUR")).expect("a price"),
            stock: 10,
            reserved: id,
            version: 1,
            rules: Default::default(),
            price_tiers: Default::default(),
        }
    }

    #[test]
    fn a_page_from_the_stored_bytes_is_the_list_view_serialised() {
        let snapshot = Snapshot::of(&[
            product(3, "tea-03", "Tea \"quoted\" \u{e9}"),
            product(1, "tea-01", "Tea"),
            product(2, "cup-02", "Cup\n"),
        ]);
        let len = snapshot.products.len();
        for (start, end) in [(0, len), (0, 1), (1, len), (2, 2), (len, len)] {
            let next = (end < len && end > start).then(|| snapshot.products[end - 1].sku.as_str());
            let expected = serde_json::to_vec(&ListView {
                data: snapshot.products[start..end].to_vec(),
                next_cursor: next.map(str::to_owned),
            })
            .expect("a view serialises");
            assert_eq!(
                String::from_utf8(snapshot.page_body(start, end, next)).expect("utf-8"),
                String::from_utf8(expected).expect("utf-8"),
                "{start}..{end}"
            );
        }
    }
}
