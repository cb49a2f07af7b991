//! Exactly one fulfilment event per paid order, delivered at least once, recorded once
//! (promise 5). The rows are written here with plain SQL, as the saga writes them in the
//! transaction that marks an order paid; the relay, the sinks and the consumers under test are
//! the application's own, over real PostgreSQL, SQLite and NATS JetStream.

use std::future::IntoFuture as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, consumer::PullConsumer, context::Publish, AckKind};
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use clap::Parser as _;
use futures::StreamExt as _;
use holdfast::domain::{
    CheckoutId, Currency, CustomerId, EventId, Money, OrderId, OrderLine, Quantity, Sku,
};
use holdfast::outbox::consumers::{Consumer, Warehouse};
use holdfast::outbox::{
    EventSink, InProcessSink, NatsSink, OrderPaid, Relay, RelayError, RelayTick, SinkError,
};
use holdfast::store::{OutboxEvent, StoreKind};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

use crate::both_stores;
use crate::helpers::{eventually, nats_url, spawn_app_with, Options, TestApp};

both_stores!(
    a_relay_tick_delivers_each_paid_order_once_to_both_consumers,
    an_event_delivered_twice_is_recorded_once,
    a_failing_sink_stops_the_batch_and_the_next_tick_retries_the_rest,
    two_relays_racing_over_two_hundred_events_publish_each_once,
    outbox_lag_counts_unpublished_events_and_the_age_of_the_oldest,
    the_running_workers_deliver_events_in_process,
    a_backlog_paid_during_a_nats_outage_shorter_than_the_lease_goes_out_when_nats_returns,
);

/// Workers off and time still: the test drives every tick.
async fn still_app(kind: StoreKind) -> TestApp {
    spawn_app_with(
        kind,
        Options {
            manual_clock: true,
            ..Options::default()
        },
    )
    .await
}

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::parse("EUR").expect("EUR")).expect("non-negative")
}

/// A paid order of two lines, 9.00 EUR in all.
fn paid_order(paid_at: DateTime<Utc>) -> OrderPaid {
    let line = |sku: &str, quantity: i64, unit: i64| OrderLine {
        sku: Sku::parse(sku).expect("sku"),
        quantity: Quantity::new(quantity).expect("quantity"),
        unit_price: eur(unit),
        line_total: eur(unit * quantity),
    };
    OrderPaid {
        event_id: EventId::new(),
        order_id: OrderId::new(),
        customer_id: CustomerId::new(),
        checkout_id: CheckoutId::new(),
        total: eur(900),
        lines: vec![line("tea-01", 1, 450), line("mug-02", 2, 225)],
        payment_intent_id: format!("pi_{}", uuid::Uuid::new_v4().simple()),
        paid_at,
        po_number: None,
        on_account: false,
        invoice_id: None,
    }
}

/// The test's own connection to the application's database.
enum Db {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

impl Db {
    async fn of(app: &TestApp) -> Db {
        match app.kind {
            StoreKind::Postgres => {
                let url = app
                    .database_url
                    .as_deref()
                    .expect("a PostgreSQL app has a URL");
                Db::Pg(sqlx::PgPool::connect(url).await.expect("connect"))
            }
            StoreKind::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(app.settings.data_dir.join("holdfast.db"))
                    .busy_timeout(std::time::Duration::from_secs(10));
                Db::Lite(sqlx::SqlitePool::connect_with(options).await.expect("open"))
            }
        }
    }

    /// The row the saga writes when it marks the order paid.
    async fn insert(&self, event: &OrderPaid, created_at: DateTime<Utc>) {
        const SQL: &str = "INSERT INTO outbox (event_id, topic, order_id, payload, created_at) \
                           VALUES ($1, $2, $3, $4, $5)";
        let (payload, at) = (event.to_payload(), created_at.timestamp_millis());
        match self {
            Db::Pg(pool) => sqlx::query(SQL)
                .bind(event.event_id.uuid())
                .bind(OrderPaid::TOPIC)
                .bind(event.order_id.uuid())
                .bind(payload)
                .bind(at)
                .execute(pool)
                .await
                .map(drop),
            Db::Lite(pool) => sqlx::query(SQL)
                .bind(event.event_id.uuid())
                .bind(OrderPaid::TOPIC)
                .bind(event.order_id.uuid())
                .bind(payload)
                .bind(at)
                .execute(pool)
                .await
                .map(drop),
        }
        .expect("insert an outbox row");
    }

    /// `n` paid orders' rows, in order.
    async fn insert_paid(&self, n: usize, at: DateTime<Utc>) -> Vec<OrderPaid> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let event = paid_order(at);
            self.insert(&event, at).await;
            events.push(event);
        }
        events
    }

    /// A relay that crashed after publishing but before marking: every row unpublished again.
    async fn forget_published(&self) {
        const SQL: &str = "UPDATE outbox SET published_at = NULL, claimed_until = NULL";
        match self {
            Db::Pg(pool) => sqlx::query(SQL).execute(pool).await.map(drop),
            Db::Lite(pool) => sqlx::query(SQL).execute(pool).await.map(drop),
        }
        .expect("reset the outbox");
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self {
            Db::Pg(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
            Db::Lite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
        }
        .expect("count")
    }
}

/// Passes events on to the in-process consumers, remembers which went through in what
/// order, and fails the `fail_on`-th call (1-based) once.
struct RecordingSink {
    inner: InProcessSink,
    calls: AtomicUsize,
    fail_on: Option<usize>,
    delivered: Mutex<Vec<EventId>>,
}

impl RecordingSink {
    fn new(app: &TestApp, fail_on: Option<usize>) -> Self {
        Self {
            inner: InProcessSink::new(app.store.clone(), app.clock.clone()),
            calls: AtomicUsize::new(0),
            fail_on,
            delivered: Mutex::new(Vec::new()),
        }
    }

    fn delivered(&self) -> Vec<EventId> {
        self.delivered.lock().expect("not poisoned").clone()
    }
}

#[async_trait]
impl EventSink for RecordingSink {
    async fn publish(&self, event: &OutboxEvent) -> Result<(), SinkError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(call) == self.fail_on {
            return Err(SinkError::Unavailable(
                "the broker is down for this call".into(),
            ));
        }
        self.inner.publish(event).await?;
        self.delivered
            .lock()
            .expect("not poisoned")
            .push(event.event_id);
        Ok(())
    }
}

fn ids(events: &[OrderPaid]) -> Vec<EventId> {
    events.iter().map(|e| e.event_id).collect()
}

#[track_caller]
fn assert_recorded_once(counts: &[(i64, i64)]) {
    assert!(
        counts.iter().all(|c| *c == (1, 1)),
        "every order has exactly one allocation and one notification: {counts:?}"
    );
}

/// `(allocations, notifications)` per order.
async fn records(app: &TestApp, events: &[OrderPaid]) -> Vec<(i64, i64)> {
    let mut counts = Vec::with_capacity(events.len());
    for event in events {
        counts.push((
            app.store
                .allocations_for(event.order_id)
                .await
                .expect("count"),
            app.store
                .notifications_for(event.order_id)
                .await
                .expect("count"),
        ));
    }
    counts
}

async fn a_relay_tick_delivers_each_paid_order_once_to_both_consumers(kind: StoreKind) {
    // Arrange
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(5, app.clock.now()).await;
    let sink = Arc::new(RecordingSink::new(&app, None));
    let relay = Relay::new(app.store.clone(), sink.clone(), app.clock.clone());

    // Act
    let first = relay.tick().await.expect("a tick");
    let second = relay.tick().await.expect("a tick");

    // Assert
    assert_eq!(
        first,
        RelayTick {
            claimed: 5,
            published: 5
        }
    );
    assert_eq!(second, RelayTick::default(), "nothing is left to publish");
    assert_eq!(sink.delivered(), ids(&events), "published in outbox order");
    assert_eq!(
        app.store
            .outbox_lag(app.clock.now())
            .await
            .unwrap()
            .unpublished,
        0
    );
    assert_recorded_once(&records(&app, &events).await);
    let message: String = match &db {
        Db::Pg(pool) => sqlx::query_scalar("SELECT message FROM notifications WHERE order_id = $1")
            .bind(events[0].order_id.uuid())
            .fetch_one(pool)
            .await
            .unwrap(),
        Db::Lite(pool) => {
            sqlx::query_scalar("SELECT message FROM notifications WHERE order_id = $1")
                .bind(events[0].order_id.uuid())
                .fetch_one(pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        message,
        format!(
            "Your order {} is paid: 3 items, 9.00 EUR",
            events[0].order_id
        )
    );

    // The application's own relay (in-process sink) finds nothing left either.
    assert_eq!(app.relay.tick().await.unwrap(), RelayTick::default());
    app.stop().await;
}

async fn an_event_delivered_twice_is_recorded_once(kind: StoreKind) {
    // Arrange
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(3, app.clock.now()).await;
    let claim = app
        .store
        .claim_outbox(app.clock.now(), 10, Duration::seconds(30))
        .await
        .expect("claim");
    let sink = InProcessSink::new(app.store.clone(), app.clock.clone());
    let warehouse = Warehouse::new(app.store.clone(), app.clock.clone());

    // Act: the sink twice, the consumer directly, then the relay after a crash that lost the
    // "published" marks.
    for event in &claim {
        sink.publish(event).await.expect("first delivery");
        sink.publish(event).await.expect("second delivery");
    }
    let again = warehouse.handle(&events[0]).await.expect("handle");
    db.forget_published().await;
    let republished = app.relay.tick().await.expect("a tick");

    // Assert
    assert!(!again, "the warehouse reports the event as already handled");
    assert_eq!(republished.published, 3, "the relay delivers again");
    assert_recorded_once(&records(&app, &events).await);
    assert_eq!(db.count("warehouse_allocations").await, 3);
    assert_eq!(db.count("notifications").await, 3);
    app.stop().await;
}

async fn a_failing_sink_stops_the_batch_and_the_next_tick_retries_the_rest(kind: StoreKind) {
    // Arrange
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(5, app.clock.now()).await;
    let sink = Arc::new(RecordingSink::new(&app, Some(3)));
    let relay = Relay::new(app.store.clone(), sink.clone(), app.clock.clone());

    // Act: the clock stands still, far inside the lease.
    let failed = relay.tick().await;
    let next = relay.tick().await.expect("a tick");
    let done = relay.tick().await.expect("a tick");

    // Assert
    assert!(
        matches!(failed, Err(RelayError::Sink { published: 2, .. })),
        "events 1 and 2 went out, then the sink failed: {failed:?}"
    );
    assert_eq!(
        next,
        RelayTick {
            claimed: 3,
            published: 3
        },
        "the failed claim was handed back: the next tick publishes the rest, lease or not"
    );
    assert_eq!(done, RelayTick::default());
    assert_eq!(
        sink.delivered(),
        ids(&events),
        "every event, in order, once"
    );
    assert_recorded_once(&records(&app, &events).await);
    app.stop().await;
}

async fn two_relays_racing_over_two_hundred_events_publish_each_once(kind: StoreKind) {
    // Arrange
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(200, app.clock.now()).await;
    let sink = Arc::new(RecordingSink::new(&app, None));
    let barrier = Arc::new(Barrier::new(2));

    // Act: two relays (think: two instances) drain the outbox in small batches at once.
    let racers = (0..2).map(|_| {
        let relay = Relay::new(app.store.clone(), sink.clone(), app.clock.clone()).with_batch(7);
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let mut published = 0;
            loop {
                let tick = relay.tick().await.expect("a tick");
                if tick.claimed == 0 {
                    return published;
                }
                published += tick.published;
            }
        })
    });
    let published: Vec<usize> = futures::future::try_join_all(racers)
        .await
        .expect("relays finish");

    // Assert
    assert_eq!(published.iter().sum::<usize>(), 200, "{published:?}");
    let mut delivered = sink.delivered();
    assert_eq!(delivered.len(), 200, "no event was published twice");
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 200);
    assert_recorded_once(&records(&app, &events).await);
    assert_eq!(db.count("warehouse_allocations").await, 200);
    assert_eq!(db.count("notifications").await, 200);
    app.stop().await;
}

async fn outbox_lag_counts_unpublished_events_and_the_age_of_the_oldest(kind: StoreKind) {
    // Arrange
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let now = app.clock.now();
    let empty = app.store.outbox_lag(now).await.expect("lag");
    db.insert(&paid_order(now), now - Duration::seconds(90))
        .await;
    db.insert(&paid_order(now), now - Duration::seconds(30))
        .await;

    // Act
    let behind = app.store.outbox_lag(now).await.expect("lag");
    app.relay.tick().await.expect("a tick");
    let caught_up = app.store.outbox_lag(now).await.expect("lag");

    // Assert
    assert_eq!((empty.unpublished, empty.oldest_unpublished_age), (0, None));
    assert_eq!(behind.unpublished, 2);
    assert_eq!(behind.oldest_unpublished_age, Some(Duration::seconds(90)));
    assert_eq!(
        (caught_up.unpublished, caught_up.oldest_unpublished_age),
        (0, None)
    );
    app.stop().await;
}

async fn the_running_workers_deliver_events_in_process(kind: StoreKind) {
    // Arrange: real time, workers on.
    let app = spawn_app_with(kind, Options::default()).await;
    let db = Db::of(&app).await;

    // Act
    let events = db.insert_paid(3, app.clock.now()).await;

    // Assert
    eventually(10, "every event recorded by both consumers", || async {
        records(&app, &events).await.iter().all(|c| *c == (1, 1))
    })
    .await;
    eventually(10, "the outbox marked published", || async {
        app.store
            .outbox_lag(app.clock.now())
            .await
            .unwrap()
            .unpublished
            == 0
    })
    .await;
    assert_recorded_once(&records(&app, &events).await);
    app.stop().await;
}

// NATS JetStream: the production shape, on PostgreSQL, each test on a stream of its own.

/// A still app publishing to its own stream, and a JetStream context to inspect it.
async fn nats_app(workers: bool) -> (TestApp, jetstream::Context) {
    let app = spawn_app_with(
        StoreKind::Postgres,
        Options {
            manual_clock: !workers,
            nats: true,
            ..Options::default()
        },
    )
    .await;
    let client = async_nats::connect(nats_url())
        .await
        .expect("NATS must be reachable for the test suite (see README)");
    (app, jetstream::new(client))
}

async fn messages_in(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// The test's streams are its own: leave nothing behind on the shared server.
async fn finish(app: TestApp, js: jetstream::Context) {
    let stream = app.settings.nats_stream.clone();
    app.stop().await;
    js.delete_stream(&stream)
        .await
        .expect("delete the test stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_each_event_to_jetstream_once_even_when_published_twice() {
    // Arrange
    let (app, js) = nats_app(false).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(4, app.clock.now()).await;
    let stream = app.settings.nats_stream.clone();
    let prefix = app.settings.nats_subject_prefix.clone();

    // Act: publish, lose the marks as in a crash, publish again; then a second sink (think:
    // another instance) publishes the same rows once more.
    let first = app.relay.tick().await.expect("a tick");
    db.forget_published().await;
    let second = app.relay.tick().await.expect("a tick");
    let other = NatsSink::connect(&nats_url(), &stream, &prefix)
        .await
        .expect("connect");
    db.forget_published().await;
    let claim = app
        .store
        .claim_outbox(app.clock.now(), 10, Duration::seconds(30))
        .await
        .expect("claim");
    for event in &claim {
        other.publish(event).await.expect("publish");
    }

    // Assert
    assert_eq!((first.published, second.published), (4, 4));
    assert_eq!(claim.len(), 4);
    assert_eq!(
        messages_in(&js, &stream).await,
        4,
        "the stream holds one message per event"
    );
    let consumer: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: format!("{prefix}.order.paid"),
            ..Default::default()
        })
        .await
        .expect("an ephemeral reader");
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let mut seen = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.expect("a message");
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned());
        let event = OrderPaid::from_payload(&message.payload).expect("an OrderPaid");
        assert_eq!(
            msg_id,
            Some(event.event_id.to_string()),
            "Nats-Msg-Id is the event id"
        );
        seen.push(event);
    }
    assert_eq!(seen, events, "every event, in order, with its payload");
    finish(app, js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_consumers_record_each_event_once_even_after_a_redelivery() {
    // Arrange
    let (app, js) = nats_app(false).await;
    let db = Db::of(&app).await;
    let events = db.insert_paid(3, app.clock.now()).await;
    let stream = app.settings.nats_stream.clone();
    let prefix = app.settings.nats_subject_prefix.clone();
    assert_eq!(app.relay.tick().await.expect("a tick").published, 3);
    // A warehouse that wrote its record and crashed before acking: the message comes back.
    let durable: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .get_consumer("warehouse")
        .await
        .expect("the application created the durable consumer");
    let mut batch = durable
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = batch.next().await.expect("one message").expect("a message");
    let crashed = OrderPaid::from_payload(&message.payload).expect("an OrderPaid");
    let warehouse = Warehouse::new(app.store.clone(), app.clock.clone());
    assert!(warehouse.handle(&crashed).await.expect("recorded"));
    message
        .ack_with(AckKind::Nak(None))
        .await
        .expect("hand it back");
    drop(batch);
    // The first event published again after the duplicate window: a second message.
    js.send_publish(
        format!("{prefix}.order.paid"),
        Publish::build()
            .payload(events[0].to_payload().into())
            .message_id(format!("{}-late", events[0].event_id)),
    )
    .await
    .expect("publish")
    .into_future()
    .await
    .expect("acked");

    // Act
    let consumers = app.nats_consumers.clone().expect("NATS is configured");
    let stop = CancellationToken::new();
    let running = consumers.clone().spawn(stop.clone());

    // Assert
    eventually(15, "both consumers handled every message", || async {
        let handled = |name| {
            consumers
                .stats(name)
                .map(|s| s.recorded + s.duplicates)
                .unwrap_or(0)
        };
        handled("warehouse") >= 4 && handled("notification") >= 4
    })
    .await;
    stop.cancel();
    running.await.expect("consumers stop");
    let warehouse = consumers.stats("warehouse").expect("stats");
    let notification = consumers.stats("notification").expect("stats");
    assert_eq!(
        (warehouse.recorded, warehouse.duplicates),
        (2, 2),
        "the redelivered and the republished event were recognised: {warehouse:?}"
    );
    assert_eq!(
        (notification.recorded, notification.duplicates),
        (3, 1),
        "{notification:?}"
    );
    assert_eq!((warehouse.rejected, notification.rejected), (0, 0));
    assert_recorded_once(&records(&app, &events).await);
    assert_eq!(db.count("warehouse_allocations").await, 3);
    assert_eq!(db.count("notifications").await, 3);
    finish(app, js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_the_running_workers_deliver_end_to_end() {
    // Arrange: real time, workers on: the relay and both NATS consumers run.
    let (app, js) = nats_app(true).await;
    let db = Db::of(&app).await;

    // Act
    let events = db.insert_paid(5, app.clock.now()).await;

    // Assert
    eventually(15, "every event recorded by both consumers", || async {
        records(&app, &events).await.iter().all(|c| *c == (1, 1))
    })
    .await;
    eventually(10, "the outbox marked published", || async {
        app.store
            .outbox_lag(app.clock.now())
            .await
            .unwrap()
            .unpublished
            == 0
    })
    .await;
    assert_eq!(messages_in(&js, &app.settings.nats_stream).await, 5);
    assert_recorded_once(&records(&app, &events).await);
    finish(app, js).await;
}

fn settings_with_nats_url(data_dir: &str, url: &str) -> holdfast::config::Settings {
    let cli = holdfast::config::Cli::try_parse_from([
        "holdfast",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--nats-url",
        url,
    ])
    .expect("flags parse");
    holdfast::config::Settings::from_flags(&cli.flags).expect("valid settings")
}

#[tokio::test]
async fn an_unreachable_nats_server_starts_degraded_and_a_bad_nats_url_stops_start_up() {
    // Arrange: port 1 on loopback has no NATS server; port 99999 is no port at all.
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().display().to_string();

    // Act
    let unreachable = holdfast::startup::Application::build(settings_with_nats_url(
        &data_dir,
        "nats://127.0.0.1:1",
    ))
    .await;
    let bad = holdfast::startup::Application::build(settings_with_nats_url(
        &data_dir,
        "nats://127.0.0.1:99999",
    ))
    .await;

    // Assert: the first serves without its consumers (they start once NATS answers) and its
    // relay leaves the outbox alone; the second fails with the one line main prints before
    // exiting with code 2.
    let app = unreachable.expect("an unreachable NATS only degrades the start");
    assert!(app.nats_consumers().is_none());
    assert_eq!(
        app.relay().tick().await.expect("a tick"),
        holdfast::outbox::RelayTick::default()
    );
    let Err(error) = bad else {
        panic!("start-up must fail with a NATS URL that cannot work");
    };
    assert!(
        matches!(error, holdfast::startup::StartupError::Events(_)),
        "{error}"
    );
    let line = error.to_string();
    assert!(
        line.contains("NATS URL is not valid") && !line.contains('\n'),
        "{line}"
    );
}

/// A NATS JetStream server of the test's own, which it stops and starts again on the same port
/// and storage (the shared server on 4222 is never stopped).
struct OwnNats {
    port: u16,
    storage: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnNats {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut nats = Self {
            port,
            storage: tempfile::TempDir::new().expect("a storage dir"),
            child: None,
        };
        nats.resume().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    async fn resume(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.storage.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed (see .ci/run)");
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        eventually(10, "the test's NATS server accepts connections", || {
            let address = address.clone();
            async move { tokio::net::TcpStream::connect(address).await.is_ok() }
        })
        .await;
    }

    /// The outage: the server process is killed and gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("stop the test's NATS server");
            child.wait().expect("reap the test's NATS server");
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Unpublished rows of the outbox.
async fn unpublished(app: &TestApp) -> i64 {
    app.store
        .outbox_lag(app.clock.now())
        .await
        .expect("outbox lag")
        .unpublished
}

async fn a_backlog_paid_during_a_nats_outage_shorter_than_the_lease_goes_out_when_nats_returns(
    kind: StoreKind,
) {
    // Arrange: a relay with a 30 s lease on a NATS of the test's own; the app's clock stands
    // still, so no lease ever runs out during the test.
    let mut nats = OwnNats::start().await;
    let app = still_app(kind).await;
    let db = Db::of(&app).await;
    let name = format!("hf_outage_{}", uuid::Uuid::new_v4().simple());
    let sink = NatsSink::connect(&nats.url(), &name, &name)
        .await
        .expect("the test's NATS is up");
    let relay = Arc::new(
        Relay::new(app.store.clone(), Arc::new(sink), app.clock.clone())
            .with_lease(Duration::seconds(30)),
    );
    let before = db.insert_paid(1, app.clock.now()).await;
    assert_eq!(relay.tick().await.expect("a tick").published, 1);

    // Act: NATS goes away; three orders are paid; the relay tries them and fails; NATS comes
    // back and the relay runs on its own.
    nats.stop();
    let during = db.insert_paid(3, app.clock.now()).await;
    let failed = relay.tick().await;
    assert!(
        matches!(failed, Err(RelayError::Sink { published: 0, .. })),
        "NATS is down: {failed:?}"
    );
    nats.resume().await;
    let back = tokio::time::Instant::now();
    let stop = CancellationToken::new();
    let running = tokio::spawn(
        relay
            .clone()
            .run_until_stopped(std::time::Duration::from_millis(100), stop.clone()),
    );

    // Assert: the backlog is on the stream shortly after NATS's return, well inside the lease,
    // each event once.
    eventually(
        10,
        "the backlog is published after NATS returned",
        || async { unpublished(&app).await == 0 },
    )
    .await;
    eprintln!("backlog published {:?} after NATS returned", back.elapsed());
    stop.cancel();
    running.await.expect("the relay stops");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client);
    assert_eq!(
        messages_in(&js, &name).await,
        (before.len() + during.len()) as u64,
        "each event once on the stream"
    );
    js.delete_stream(&name).await.expect("delete the stream");
    app.stop().await;
}
