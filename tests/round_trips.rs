//! Round trips per step on PostgreSQL (DESIGN §10: each step a buyer waits on is one round
//! trip). Every statement sqlx sends is one `sqlx::query` event, `BEGIN` and `COMMIT`
//! included; the store runs on a current-thread runtime under a subscriber that counts them, so
//! only this test's statements are counted. The figures are published in docs/performance.md;
//! a step that grows fails here. Its own test binary: no other test's subscriber in the process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{Duration, Utc};
use holdfast::domain::CheckoutState;
use holdfast::domain::{
    CheckoutId, Currency, CustomerName, Money, NewProduct, OrderId, ProductName, Quantity, Sku,
    StockLevel,
};
use holdfast::outbox::OrderPaid;
use holdfast::store::{Lease, NewCheckout, PgStore, Store, StoreError};
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
        rules: Default::default(),
        price_tiers: Default::default(),
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
        po_number: None,
        open_sales: Vec::new(),
    }
}

/// Runs `test` with a fresh migrated store, on a current-thread runtime under a subscriber
/// that counts the statements sent (so only this test's are counted).
fn counted<F, Fut>(test: F)
where
    F: FnOnce(Statements, PgStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
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
            test(statements, store).await;
        })
    });
}

/// A reserved checkout of its own customer and cart.
async fn reserved(store: &PgStore, name: &str, lines: &[(&Sku, i64)]) -> NewCheckout {
    let new = checkout_of(store, name, lines).await;
    store.reserve_checkout(&new).await.expect("reserved");
    new
}

fn lease(now: chrono::DateTime<Utc>) -> Lease<'static> {
    Lease {
        owner: "instance-a",
        now,
        until: now + Duration::seconds(30),
    }
}

/// (statements, pool acquisitions) of each step, as published in docs/performance.md.
type Counted = (usize, u64);

fn count<T>((statements, acquisitions, _): &(usize, u64, T)) -> Counted {
    (*statements, *acquisitions)
}

#[test]
fn every_other_step_a_buyer_waits_on_is_one_statement() {
    counted(|statements, store| async move {
        let tea = product(&store, "tea-01", 2).await;
        let cup = product(&store, "cup-01", 100).await;
        let ada = reserved(&store, "Ada", &[(&cup, 2), (&tea, 1)]).await;
        let bob = reserved(&store, "Bob", &[(&cup, 1)]).await;
        let cy = reserved(&store, "Cy", &[(&cup, 3)]).await;
        let di = reserved(&store, "Di", &[(&tea, 1)]).await;
        let now = Utc::now();
        let ttl = Duration::seconds(120);

        // What a start reads before it reserves: the cart and the open sales.
        let extra = checkout_of(&store, "Fay", &[(&cup, 1), (&tea, 1)]).await;
        let first_look = statements
            .of(
                &store,
                store.cart_and_current_sales(extra.customer_id, extra.cart_id, now),
            )
            .await;
        let (cart, sales) = first_look.2.as_ref().expect("the cart and the sales");
        let skus: Vec<String> = cart
            .as_ref()
            .expect("Fay's cart")
            .lines
            .iter()
            .map(|l| l.sku.to_string())
            .collect();
        assert_eq!(skus, vec!["cup-01", "tea-01"]);
        assert!(sales.is_empty());

        // Heartbeat: renewed, or refused from the state it found.
        let beat = statements
            .of(
                &store,
                store.heartbeat_checkout(ada.customer_id, ada.id, now, ttl),
            )
            .await;
        let beat = (count(&beat), beat.2.map(|c| c.state));
        let unknown = statements
            .of(
                &store,
                store.heartbeat_checkout(ada.customer_id, CheckoutId::new(), now, ttl),
            )
            .await;
        assert!(
            matches!(unknown.2, Err(StoreError::NotFound("checkout"))),
            "{:?}",
            unknown.2
        );

        // Cancel, and cancel again; a heartbeat of a cancelled checkout names its state.
        let cancel = statements
            .of(&store, store.cancel_checkout(bob.customer_id, bob.id, now))
            .await;
        let again = statements
            .of(&store, store.cancel_checkout(bob.customer_id, bob.id, now))
            .await;
        let late_beat = statements
            .of(
                &store,
                store.heartbeat_checkout(bob.customer_id, bob.id, now, ttl),
            )
            .await;
        assert!(
            matches!(
                late_beat.2,
                Err(StoreError::CheckoutState(CheckoutState::Cancelled))
            ),
            "{:?}",
            late_beat.2
        );

        // Starting the charge, and again while its lease holds.
        let charge = statements
            .of(
                &store,
                store.begin_charge(ada.customer_id, ada.id, "pm_card_visa", lease(now)),
            )
            .await;
        let ticket = charge.2.as_ref().expect("the charge starts");
        assert!(ticket.opens_attempt && ticket.checkout.state == CheckoutState::Charging);
        let busy = statements
            .of(
                &store,
                store.begin_charge(ada.customer_id, ada.id, "pm_card_visa", lease(now)),
            )
            .await;
        assert!(
            matches!(busy.2, Err(StoreError::ChargeInProgress)),
            "{:?}",
            busy.2
        );

        // The outcomes: requires_action, then success; a decline; a late success whose units
        // were given back (taken again) and one whose units are gone (money due back).
        let action = statements
            .of(
                &store,
                store.record_requires_action(ada.id, "pi_ada", Some("secret"), lease(now)),
            )
            .await;
        let paid = statements
            .of(&store, store.record_charge_succeeded(ada.id, "pi_ada", now))
            .await;
        store
            .begin_charge(cy.customer_id, cy.id, "pm_card_visa", lease(now))
            .await
            .expect("the charge starts");
        let declined = statements
            .of(
                &store,
                store.record_charge_declined(cy.id, Some("pi_cy"), "card_declined", now),
            )
            .await;
        let taken_again = statements
            .of(&store, store.record_charge_succeeded(bob.id, "pi_bob", now))
            .await;
        store
            .cancel_checkout(di.customer_id, di.id, now)
            .await
            .expect("cancelled");
        // The last tea unit goes to another buyer before Di's late success arrives.
        reserved(&store, "Ed", &[(&tea, 1)]).await;
        let due_back = statements
            .of(&store, store.record_charge_succeeded(di.id, "pi_di", now))
            .await;
        let webhook = statements
            .of(
                &store,
                store.record_webhook_event(
                    "evt_1",
                    "payment_intent.succeeded",
                    Some("pi_ada"),
                    now,
                ),
            )
            .await;

        let state = |r: &Result<holdfast::domain::Checkout, StoreError>| {
            r.as_ref().map(|c| c.state).map_err(ToString::to_string)
        };
        assert_eq!(beat.1.as_ref().ok(), Some(&CheckoutState::Reserved));
        assert_eq!(state(&cancel.2), Ok(CheckoutState::Cancelled));
        assert_eq!(state(&again.2), Ok(CheckoutState::Cancelled));
        assert_eq!(state(&action.2), Ok(CheckoutState::RequiresAction));
        assert_eq!(state(&paid.2), Ok(CheckoutState::Completed));
        assert_eq!(state(&declined.2), Ok(CheckoutState::PaymentFailed));
        assert_eq!(state(&taken_again.2), Ok(CheckoutState::Completed));
        let due = due_back.2.as_ref().expect("recorded");
        assert!(
            due.refund_due && due.state == CheckoutState::Cancelled,
            "{due:?}"
        );
        assert!(webhook.2.is_ok(), "{:?}", webhook.2);

        let steps: Vec<(&str, Counted)> = vec![
            (
                "a start's first look: cart and open sales",
                count(&first_look),
            ),
            ("heartbeat", beat.0),
            ("heartbeat of no such checkout", count(&unknown)),
            ("heartbeat refused for its state", count(&late_beat)),
            ("cancel", count(&cancel)),
            ("cancel of a cancelled checkout", count(&again)),
            ("begin_charge", count(&charge)),
            ("begin_charge while its lease holds", count(&busy)),
            ("record_requires_action", count(&action)),
            ("record_charge_succeeded", count(&paid)),
            ("record_charge_declined", count(&declined)),
            (
                "record_charge_succeeded, units taken again",
                count(&taken_again),
            ),
            ("record_charge_succeeded, money due back", count(&due_back)),
            ("record_webhook_event", count(&webhook)),
        ];
        for (step, counted) in &steps {
            assert_eq!(*counted, (1, 1), "{step}");
        }

        // The order.paid row the success wrote is the event the relay publishes.
        let payloads: Vec<String> =
            sqlx::query_scalar("SELECT payload FROM outbox WHERE topic = 'order.paid' ORDER BY id")
                .fetch_all(store.pool())
                .await
                .expect("the outbox");
        assert_eq!(payloads.len(), 2, "Ada's and Bob's sales, not Di's");
        let event = OrderPaid::from_payload(payloads[0].as_bytes()).expect("an OrderPaid");
        let completed = paid.2.as_ref().expect("completed");
        assert_eq!(
            (
                event.order_id,
                event.checkout_id,
                event.customer_id,
                event.total
            ),
            (completed.order_id, ada.id, ada.customer_id, completed.total)
        );
        assert_eq!(event.payment_intent_id, "pi_ada");
        let lines: Vec<(String, u32, i64)> = event
            .lines
            .iter()
            .map(|l| (l.sku.to_string(), l.quantity.get(), l.line_total.amount()))
            .collect();
        assert_eq!(
            lines,
            vec![("cup-01".into(), 2, 900), ("tea-01".into(), 1, 450)]
        );
        assert_eq!(event.paid_at.timestamp_millis(), now.timestamp_millis());
        let audit = holdfast::audit::run(&store).await.expect("the audit runs");
        assert!(audit.is_clean(), "{audit:?}");
    });
}

#[test]
fn starting_a_checkout_is_one_statement_whatever_its_outcome_or_batch() {
    counted(|statements, store| async move {
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
        let single = [count(&reserved), count(&refused), count(&again)];
        assert_eq!(single, [(1, 1); 3], "a single checkout start");
        assert_eq!(count(&grouped), (1, 1), "a batch of three");
    });
}

#[test]
fn a_shoppers_cart_writes_and_order_poll_are_one_statement_each_whatever_their_outcome() {
    counted(|statements, store| async move {
        let tea = product(&store, "tea-01", 3).await;
        let cup = product(&store, "cup-01", 100).await;
        let unknown = Sku::parse("no-such-01").expect("a sku");
        let ada = store
            .create_customer(&CustomerName::parse("Ada").expect("a name"), "ada")
            .await
            .expect("a customer");
        let bob = checkout_of(&store, "Bob", &[(&cup, 1)]).await;
        let now = Utc::now();
        let two = Quantity::new(2).expect("a quantity");

        let created = statements.of(&store, store.create_cart(ada.id, now)).await;
        let cart = created.2.as_ref().expect("a cart").id;
        let set = statements
            .of(&store, store.set_cart_line(ada.id, cart, &tea, two, now))
            .await;
        let again = statements
            .of(&store, store.set_cart_line(ada.id, cart, &cup, two, now))
            .await;
        let missing = statements
            .of(
                &store,
                store.set_cart_line(ada.id, cart, &unknown, two, now),
            )
            .await;
        let others = statements
            .of(
                &store,
                store.set_cart_line(bob.customer_id, cart, &tea, two, now),
            )
            .await;
        let removed = statements
            .of(&store, store.remove_cart_line(ada.id, cart, &cup, now))
            .await;
        let read = statements.of(&store, store.cart(ada.id, cart)).await;
        let reserved = store.reserve_checkout(&bob).await.expect("reserved");
        let held = statements
            .of(
                &store,
                store.set_cart_line(bob.customer_id, bob.cart_id, &tea, two, now),
            )
            .await;
        let held_removal = statements
            .of(
                &store,
                store.remove_cart_line(bob.customer_id, bob.cart_id, &cup, now),
            )
            .await;
        let order = statements
            .of(&store, store.order(bob.customer_id, reserved.order_id))
            .await;
        let not_theirs = statements
            .of(&store, store.order(ada.id, reserved.order_id))
            .await;

        let lines = |cart: &holdfast::domain::Cart| -> Vec<(String, u32)> {
            cart.lines
                .iter()
                .map(|l| (l.sku.to_string(), l.quantity.get()))
                .collect()
        };
        assert_eq!(lines(set.2.as_ref().expect("set")), [("tea-01".into(), 2)]);
        assert_eq!(
            lines(again.2.as_ref().expect("set")),
            [("cup-01".into(), 2), ("tea-01".into(), 2)]
        );
        assert!(matches!(missing.2, Err(StoreError::NotFound("product"))));
        assert!(matches!(others.2, Err(StoreError::NotFound("cart"))));
        assert_eq!(
            lines(removed.2.as_ref().expect("removed")),
            [("tea-01".into(), 2)]
        );
        let read_back = read.2.as_ref().expect("read").as_ref().expect("found");
        assert_eq!(lines(read_back), [("tea-01".into(), 2)]);
        assert!(matches!(held.2, Err(StoreError::CartNotOpen(_))));
        assert!(matches!(held_removal.2, Err(StoreError::CartNotOpen(_))));
        let order_lines: Vec<(String, u32)> = order
            .2
            .as_ref()
            .expect("the order")
            .as_ref()
            .expect("found")
            .lines
            .iter()
            .map(|l| (l.sku.to_string(), l.quantity.get()))
            .collect();
        assert_eq!(order_lines, [("cup-01".into(), 1)]);
        assert!(matches!(not_theirs.2, Ok(None)));

        let counted = [
            (created.0, created.1),
            (set.0, set.1),
            (again.0, again.1),
            (missing.0, missing.1),
            (others.0, others.1),
            (removed.0, removed.1),
            (read.0, read.1),
            (held.0, held.1),
            (held_removal.0, held_removal.1),
            (order.0, order.1),
            (not_theirs.0, not_theirs.1),
        ];
        assert_eq!(counted, [(1, 1); 11], "cart create, line changes, reads");
    });
}
