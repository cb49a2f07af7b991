//! Round trips per step on PostgreSQL (DESIGN §10: each step a buyer waits on is one round
//! trip). Every statement sqlx sends is one `sqlx::query` event, `BEGIN` and `COMMIT`
//! included; the store runs on a current-thread runtime under a subscriber that counts them, so
//! only this test's statements are counted. The figures are published in docs/performance.md;
//! a step that grows fails here. Its own test binary: no other test's subscriber in the process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{Duration, Utc};
use holdfast::domain::{
    CheckoutId, Currency, CustomerName, Money, NewProduct, OrderId, ProductName, Quantity, Sku,
    StockLevel,
};
use holdfast::store::{NewCheckout, PgStore, Store, StoreError};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

/// An empty database of its own (as `tests/api/helpers.rs` makes them).
async fn fresh_postgres_database() -> String {
    use sqlx::Connection as _;
    let base = std::env::var("HOLDFAST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".to_owned());
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/test"))
        .await
        .expect("PostgreSQL must be reachable for the test suite (see README)");
    let name = format!("hf_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    format!("{base}/{name}")
}

/// Counts the statements sqlx sends.
#[derive(Clone, Default)]
struct Statements(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Statements {
    /// Statements and pool acquisitions `step` took.
    async fn of<T>(
        &self,
        store: &PgStore,
        step: impl std::future::Future<Output = T>,
    ) -> (usize, u64, T) {
        let (statements, acquisitions) = (self.0.load(Ordering::Relaxed), store.acquisitions());
        let out = step.await;
        (
            self.0.load(Ordering::Relaxed) - statements,
            store.acquisitions() - acquisitions,
            out,
        )
    }
}

async fn product(store: &PgStore, sku: &str, stock: i64) -> Sku {
    let sku = Sku::parse(sku).expect("a sku");
    let product = NewProduct {
        sku: sku.clone(),
        name: ProductName::parse("Tea").expect("a name"),
        price: Money::new(450, Currency::parse("EUR").expect("EUR")).expect("a price"),
        stock: StockLevel::new(stock).expect("a stock level"),
    };
    store
        .create_product(&product, "test", Utc::now())
        .await
        .expect("a product");
    sku
}

async fn checkout_of(store: &PgStore, name: &str, lines: &[(&Sku, i64)]) -> NewCheckout {
    let customer = store
        .create_customer(&CustomerName::parse(name).expect("a name"), name)
        .await
        .expect("a customer");
    let now = Utc::now();
    let cart = store.create_cart(customer.id, now).await.expect("a cart");
    for (sku, quantity) in lines {
        store
            .set_cart_line(
                customer.id,
                cart.id,
                sku,
                Quantity::new(*quantity).expect("a quantity"),
                now,
            )
            .await
            .expect("a line");
    }
    NewCheckout {
        capture_method: Default::default(),
        id: CheckoutId::new(),
        order_id: OrderId::new(),
        customer_id: customer.id,
        cart_id: cart.id,
        now,
        ttl: Duration::seconds(180),
        max_lifetime: Duration::seconds(1800),
        flash_sale: None,
        idempotency_key: None,
        flash_sale_units: 0,
        open_sales: Vec::new(),
    }
}

#[test]
fn starting_a_checkout_is_one_statement_whatever_its_outcome_or_batch() {
    let statements = Statements::default();
    let subscriber = tracing_subscriber::registry().with(statements.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let url = fresh_postgres_database().await;
            let store = PgStore::connect(&url, 4).await.expect("connect");
            store.migrate().await.expect("migrate");
            let tea = product(&store, "tea-01", 3).await;
            let cup = product(&store, "cup-01", 100).await;
            let ada = checkout_of(&store, "Ada", &[(&cup, 2), (&tea, 1)]).await;
            let bob = checkout_of(&store, "Bob", &[(&tea, 5)]).await;
            let batch = vec![
                checkout_of(&store, "Cy", &[(&tea, 1)]).await,
                checkout_of(&store, "Di", &[(&tea, 2), (&cup, 3)]).await,
                checkout_of(&store, "Ed", &[(&cup, 1)]).await,
            ];

            let reserved = statements.of(&store, store.reserve_checkout(&ada)).await;
            let refused = statements.of(&store, store.reserve_checkout(&bob)).await;
            let again = statements.of(&store, store.reserve_checkout(&ada)).await;
            let grouped = statements.of(&store, store.reserve_checkouts(&batch)).await;

            assert!(reserved.2.is_ok(), "{:?}", reserved.2);
            assert!(matches!(refused.2, Err(StoreError::InsufficientStock(_))));
            assert!(matches!(again.2, Err(StoreError::CartNotOpen(_))));
            let answers: Vec<bool> = grouped.2.iter().map(Result::is_ok).collect();
            assert_eq!(answers, vec![true, false, true], "{:?}", grouped.2);
            let counted = [&reserved, &refused, &again]
                .map(|(statements, acquisitions, _)| (*statements, *acquisitions));
            assert_eq!(counted, [(1, 1); 3], "a single checkout start");
            assert_eq!((grouped.0, grouped.1), (1, 1), "a batch of three");
        })
    });
}
