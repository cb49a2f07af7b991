//! A seeded simulation of the saga that searches for crash windows (docs/crash-search.md).
//!
//! One scheduler, driven by one seed, picks each step of a history: a buyer starts a checkout,
//! completes it with a card that succeeds, declines or needs authentication, cancels it, an
//! admin refunds an order, the customer authenticates, the gateway delivers a webhook (any
//! pending one, so out of order; sometimes kept for a second delivery, sometimes never sent),
//! the recovery, expiry or relay worker ticks, or the simulated clock ([`ManualClock`]) moves
//! on. The gateway is simulated too ([`SimGateway`]): its calls time out before or after they
//! took effect (an answer lost, or late, the webhook telling it), a payment may stay
//! `processing` and settle later, Stripe's idempotency keys replay an answer, and its ledger is
//! what the promises are checked against.
//!
//! A crash is the process dying at an await point: the step's future is dropped at the `n`-th
//! await point of its gateway calls (before a call acts, or after it acted and before its
//! answer; what the step committed before stays, an open transaction rolls back) or after the
//! step (its answer lost), and a new instance (a new `CheckoutService`, workers and relay with
//! a new lease owner) takes over the same store and gateway. Or the instance only stalls
//! there: a new one serves meanwhile, and the stalled one comes back later and finishes its
//! step with its old lease.
//!
//! After every step the audit runs on its safety checks (promises 1, 3, 5 and the order/checkout
//! agreement of 4) and the gateway's ledger is checked (at most one charge per checkout, no
//! refund beyond the charge). At the end of a history the clock runs on and the workers run
//! until everything settles; then the full audit with no grace, no checkout left open, and
//! every succeeded payment must have ended paid (and kept) or refunded (and given back).
//!
//! How deterministic: the schedule, the gateway's behaviour and the crash points come from the
//! seed alone, and each step runs alone, so a history replays step for step (same steps, same
//! outcomes, same crashes; `HOLDFAST_SIM_TRACE=1` prints them). Crash points are counted at the
//! gateway's own await points, never in the store driver's suspensions, which vary with
//! SQLite's worker thread. Not the seed's: ids are random UUIDs (nothing the scheduler picks
//! depends on them, but a store query ordered by id may visit rows in another order).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use chrono::{Duration, TimeZone as _, Utc};
use holdfast::audit::{self, AuditOptions};
use holdfast::checkout::{CheckoutService, SagaSettings, Windows};
use holdfast::domain::{
    CheckoutId, CheckoutState, Clock, Currency, CustomerId, CustomerName, ManualClock, Money,
    NewProduct, OrderId, ProductName, Quantity, Sku, StockLevel,
};
use holdfast::flash_sale::InProcessGate;
use holdfast::outbox::{InProcessSink, Relay};
use holdfast::payments::events::{EventObject, WebhookEvent};
use holdfast::payments::{
    ChargeOutcome, ChargeRequest, Decline, GatewayError, IntentStatus, PaymentGateway,
    PaymentIntent, Refund, RefundRequest,
};
use holdfast::store::{SqliteStore, Store};
use holdfast::workers::{ExpiryWorker, RecoveryWorker};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Histories of the CI sweep; `HOLDFAST_SIM_HISTORIES` runs more.
const HISTORIES: u64 = 200;
/// Steps per history; `HOLDFAST_SIM_STEPS` changes it.
const STEPS: u64 = 40;
/// Seeds of histories that once broke a promise, replayed first on every run.
const REGRESSION_SEEDS: &[u64] = &[];

const SKU: &str = "sim-01";
const PRICE: i64 = 1250;
const STOCK: i64 = 4;

/// The cards a buyer may pay with, as the simulated gateway reads them.
const CARDS: [&str; 3] = [
    "pm_card_visa",
    "pm_card_chargeDeclined",
    "pm_card_authenticationRequired",
];

// ---------------------------------------------------------------------------------------------
// The gateway.

#[derive(Default)]
struct Ledger {
    intents: Vec<PaymentIntent>,
    /// Idempotency key → intent id: a repeated request replays the first answer.
    charge_keys: HashMap<String, String>,
    refund_keys: HashMap<String, Refund>,
    /// Intent id → amount given back.
    refunded: HashMap<String, i64>,
    /// Events not delivered yet, in the order they happened.
    events: Vec<WebhookEvent>,
    next_id: u64,
}

impl Ledger {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_sim{}", self.next_id)
    }

    fn intent_mut(&mut self, id: &str) -> Option<&mut PaymentIntent> {
        self.intents.iter_mut().find(|i| i.id == id)
    }

    fn emit(&mut self, event_type: &str, object: EventObject) {
        let id = self.id("evt");
        self.events.push(WebhookEvent {
            id,
            event_type: event_type.to_owned(),
            created: self.next_id as i64,
            object,
        });
    }
}

/// How a call to the gateway goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Answered.
    Answered,
    /// Timed out before the gateway saw it: nothing happened.
    LostBefore,
    /// The gateway acted, the answer was lost (a late answer; the webhook still comes).
    LostAfter,
}

#[derive(Clone)]
struct SimGateway {
    ledger: Arc<Mutex<Ledger>>,
    rng: Arc<Mutex<StdRng>>,
    tripwire: Arc<Mutex<Tripwire>>,
}

/// Where the next crash happens: at the `countdown`-th await point of the gateway from now.
#[derive(Debug, Default)]
struct Tripwire {
    countdown: Option<u32>,
    tripped: bool,
    /// Wakes the call that tripped, when its process was only stalled and comes back.
    release: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimGateway {
    fn new(seed: u64) -> Self {
        Self {
            ledger: Arc::default(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed_6a7e))),
            tripwire: Arc::default(),
        }
    }

    fn tripwire(&self) -> std::sync::MutexGuard<'_, Tripwire> {
        self.tripwire.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An await point of every gateway call, before it acts and after: a suspension, or, when
    /// the tripwire says so, the place the process dies or stalls (it goes on from here only
    /// if a stalled process is let go).
    async fn await_point(&self) {
        let stalled = {
            let mut wire = self.tripwire();
            match wire.countdown {
                Some(0) => {
                    let (release, stalled) = tokio::sync::oneshot::channel();
                    wire.countdown = None;
                    wire.tripped = true;
                    wire.release = Some(release);
                    Some(stalled)
                }
                Some(n) => {
                    wire.countdown = Some(n - 1);
                    None
                }
                None => None,
            }
        };
        if let Some(stalled) = stalled {
            let _ = stalled.await;
        }
        tokio::task::yield_now().await;
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fate(&self) -> Fate {
        let roll = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .gen_range(0..100);
        match roll {
            0..=9 => Fate::LostBefore,
            10..=19 => Fate::LostAfter,
            _ => Fate::Answered,
        }
    }

    /// Every payment still `processing` settles: one in three fails, by its position.
    fn settle_processing(&self) {
        let mut ledger = self.ledger();
        let processing: Vec<String> = ledger
            .intents
            .iter()
            .filter(|i| i.status == IntentStatus::Processing)
            .map(|i| i.id.clone())
            .collect();
        for (n, id) in processing.into_iter().enumerate() {
            let Some(intent) = ledger.intent_mut(&id) else {
                continue;
            };
            let event = if n % 3 == 2 {
                intent.status = IntentStatus::RequiresPaymentMethod;
                intent.last_payment_error = Some(decline("card_declined"));
                "payment_intent.payment_failed"
            } else {
                intent.status = IntentStatus::Succeeded;
                "payment_intent.succeeded"
            };
            let object = EventObject::PaymentIntent(intent.clone());
            ledger.emit(event, object);
        }
    }

    /// One charge in ten is answered `processing`.
    fn processing(&self) -> bool {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .gen_bool(0.1)
    }

    /// The customer finishes (or fails) 3-D Secure on an intent waiting for it, or a
    /// `processing` payment settles.
    fn authenticate(&self, pick: usize, succeeds: bool) {
        let mut ledger = self.ledger();
        let waiting: Vec<String> = ledger
            .intents
            .iter()
            .filter(|i| {
                matches!(
                    i.status,
                    IntentStatus::RequiresAction | IntentStatus::Processing
                )
            })
            .map(|i| i.id.clone())
            .collect();
        if waiting.is_empty() {
            return;
        }
        let id = waiting[pick % waiting.len()].clone();
        let Some(intent) = ledger.intent_mut(&id) else {
            return;
        };
        let event = if succeeds {
            intent.status = IntentStatus::Succeeded;
            intent.client_secret = None;
            "payment_intent.succeeded"
        } else {
            intent.status = IntentStatus::RequiresPaymentMethod;
            intent.last_payment_error = Some(decline("payment_intent_authentication_failure"));
            "payment_intent.payment_failed"
        };
        let object = EventObject::PaymentIntent(intent.clone());
        ledger.emit(event, object);
    }
}

fn decline(code: &str) -> Decline {
    Decline {
        code: code.to_owned(),
        decline_code: Some("generic_decline".to_owned()),
        message: "declined".to_owned(),
    }
}

fn unknown(fate: Fate) -> GatewayError {
    GatewayError::Unknown(format!("simulated timeout ({fate:?})"))
}

#[async_trait]
impl PaymentGateway for SimGateway {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn create_and_confirm(&self, req: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        self.await_point().await;
        let fate = self.fate();
        if fate == Fate::LostBefore {
            return Err(unknown(fate));
        }
        let intent = {
            let mut ledger = self.ledger();
            let known = ledger.charge_keys.get(&req.idempotency_key).cloned();
            match known.and_then(|id| ledger.intents.iter().find(|i| i.id == id).cloned()) {
                Some(replayed) => replayed,
                None => {
                    let id = ledger.id("pi");
                    let (status, error, event) = match req.payment_method.as_str() {
                        // Some payments take a while to settle (Stripe: `processing`); the
                        // customer step settles them later, and a webhook says how.
                        "pm_card_visa" if self.processing() => {
                            (IntentStatus::Processing, None, None)
                        }
                        "pm_card_visa" => (
                            IntentStatus::Succeeded,
                            None,
                            Some("payment_intent.succeeded"),
                        ),
                        "pm_card_authenticationRequired" => {
                            (IntentStatus::RequiresAction, None, None)
                        }
                        _ => (
                            IntentStatus::RequiresPaymentMethod,
                            Some(decline("card_declined")),
                            Some("payment_intent.payment_failed"),
                        ),
                    };
                    let intent = PaymentIntent {
                        client_secret: (status == IntentStatus::RequiresAction)
                            .then(|| format!("{id}_secret")),
                        id: id.clone(),
                        status,
                        amount: req.amount.amount(),
                        currency: "eur".to_owned(),
                        metadata: req.metadata(),
                        last_payment_error: error,
                        created: ledger.next_id as i64,
                        amount_capturable: 0,
                        amount_received: 0,
                    };
                    ledger.intents.push(intent.clone());
                    ledger.charge_keys.insert(req.idempotency_key.clone(), id);
                    if let Some(event) = event {
                        ledger.emit(event, EventObject::PaymentIntent(intent.clone()));
                    }
                    intent
                }
            }
        };
        self.await_point().await;
        if fate == Fate::LostAfter {
            return Err(unknown(fate));
        }
        ChargeOutcome::from_confirmed_intent(intent)
    }

    async fn retrieve(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError> {
        self.await_point().await;
        let fate = self.fate();
        if fate != Fate::Answered {
            return Err(unknown(fate));
        }
        self.ledger()
            .intents
            .iter()
            .find(|i| i.id == payment_intent_id)
            .cloned()
            .ok_or_else(|| GatewayError::InvalidRequest {
                code: "resource_missing".to_owned(),
                message: format!("no such payment_intent: {payment_intent_id}"),
            })
    }

    async fn cancel(
        &self,
        payment_intent_id: &str,
        _idempotency_key: &str,
    ) -> Result<PaymentIntent, GatewayError> {
        self.await_point().await;
        let fate = self.fate();
        if fate == Fate::LostBefore {
            return Err(unknown(fate));
        }
        let answer = {
            let mut ledger = self.ledger();
            let Some(intent) = ledger.intent_mut(payment_intent_id) else {
                return Err(GatewayError::InvalidRequest {
                    code: "resource_missing".to_owned(),
                    message: payment_intent_id.to_owned(),
                });
            };
            match intent.status {
                IntentStatus::Succeeded => Err(GatewayError::InvalidRequest {
                    code: "payment_intent_unexpected_state".to_owned(),
                    message: "a succeeded payment intent cannot be canceled".to_owned(),
                }),
                IntentStatus::Canceled => Ok(intent.clone()),
                _ => {
                    intent.status = IntentStatus::Canceled;
                    let canceled = intent.clone();
                    ledger.emit(
                        "payment_intent.canceled",
                        EventObject::PaymentIntent(canceled.clone()),
                    );
                    Ok(canceled)
                }
            }
        };
        self.await_point().await;
        if fate == Fate::LostAfter {
            return Err(unknown(fate));
        }
        answer
    }

    /// This model charges at checkout only: nothing is ever authorized to capture.
    async fn capture(
        &self,
        req: &holdfast::payments::CaptureRequest,
    ) -> Result<PaymentIntent, GatewayError> {
        Err(GatewayError::InvalidRequest {
            code: "payment_intent_unexpected_state".to_owned(),
            message: format!("{} is not awaiting capture", req.payment_intent_id),
        })
    }

    async fn refund(&self, req: &RefundRequest) -> Result<Refund, GatewayError> {
        self.await_point().await;
        let fate = self.fate();
        if fate == Fate::LostBefore {
            return Err(unknown(fate));
        }
        let answer = {
            let mut ledger = self.ledger();
            if let Some(refund) = ledger.refund_keys.get(&req.idempotency_key) {
                Ok(refund.clone())
            } else {
                let Some(intent) = ledger
                    .intents
                    .iter()
                    .find(|i| i.id == req.payment_intent_id)
                    .cloned()
                else {
                    return Err(GatewayError::InvalidRequest {
                        code: "resource_missing".to_owned(),
                        message: req.payment_intent_id.clone(),
                    });
                };
                let already = ledger.refunded.get(&intent.id).copied().unwrap_or(0);
                let amount = req.amount.unwrap_or(intent.amount - already);
                if intent.status != IntentStatus::Succeeded || already + amount > intent.amount {
                    Err(GatewayError::InvalidRequest {
                        code: "charge_already_refunded".to_owned(),
                        message: intent.id.clone(),
                    })
                } else {
                    let refund = Refund {
                        id: ledger.id("re"),
                        payment_intent_id: Some(intent.id.clone()),
                        amount,
                        status: Some("succeeded".to_owned()),
                        failure_reason: None,
                    };
                    *ledger.refunded.entry(intent.id.clone()).or_default() += amount;
                    ledger
                        .refund_keys
                        .insert(req.idempotency_key.clone(), refund.clone());
                    let charge = EventObject::Charge {
                        id: format!("ch_{}", intent.id),
                        payment_intent: Some(intent.id.clone()),
                        amount_refunded: already + amount,
                        refunded: already + amount == intent.amount,
                    };
                    ledger.emit("charge.refunded", charge);
                    Ok(refund)
                }
            }
        };
        self.await_point().await;
        if fate == Fate::LostAfter {
            return Err(unknown(fate));
        }
        answer
    }

    async fn retrieve_refund(&self, refund_id: &str) -> Result<Refund, GatewayError> {
        self.ledger()
            .refund_keys
            .values()
            .find(|refund| refund.id == refund_id)
            .cloned()
            .ok_or_else(|| GatewayError::InvalidRequest {
                code: "resource_missing".to_owned(),
                message: refund_id.to_owned(),
            })
    }

    async fn intents_for_checkout(
        &self,
        checkout_id: CheckoutId,
    ) -> Result<Vec<PaymentIntent>, GatewayError> {
        Ok(self
            .ledger()
            .intents
            .iter()
            .filter(|i| i.checkout_id() == Some(checkout_id))
            .cloned()
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Crashing at an await point.

/// Polls `inner` until it is done or the gateway's tripwire went off inside it; then hands the
/// unfinished future back, to be dropped there, as a process dying at that await point would
/// (with it, any open transaction rolls back), or parked, as a stalled process.
struct CrashAt<F: Future> {
    inner: Option<Pin<Box<F>>>,
    tripwire: Arc<Mutex<Tripwire>>,
}

impl<F: Future> Future for CrashAt<F> {
    type Output = Result<F::Output, Pin<Box<F>>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending;
        };
        match inner.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Ok(out)),
            Poll::Pending => {
                let tripped = self
                    .tripwire
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .tripped;
                match (tripped, self.inner.take()) {
                    (true, Some(unfinished)) => Poll::Ready(Err(unfinished)),
                    (_, inner) => {
                        self.inner = inner;
                        Poll::Pending
                    }
                }
            }
        }
    }
}

/// Where a step's process dies, if it does.
#[derive(Debug, Clone, Copy)]
enum CrashPlan {
    /// At this await point of the gateway calls the step makes (0: before the first call acts,
    /// 1: after it acted and before its answer, ...); no crash if the step makes fewer.
    AtGatewayPoint(u32),
    /// After the step finished: its answer is lost, what it committed stays.
    AfterStep,
    /// At this await point the process stalls (a long pause, a partition): another instance
    /// takes over, and the stalled one may come back later and carry on where it stopped.
    StallAtGatewayPoint(u32),
}

// ---------------------------------------------------------------------------------------------
// One process and one history.

/// What one instance of holdfast holds in memory; a crash loses it and a new one starts.
struct Process {
    service: Arc<CheckoutService>,
    recovery: Arc<RecoveryWorker>,
    expiry: Arc<ExpiryWorker>,
    relay: Arc<Relay>,
}

impl Process {
    fn boot(store: &Arc<dyn Store>, clock: &Arc<ManualClock>, gateway: &SimGateway) -> Self {
        let clock: Arc<dyn Clock> = clock.clone();
        let saga = SagaSettings {
            lease: Duration::seconds(30),
            // One retry within the request, at once: later ones are recovery's.
            retry_delays: vec![std::time::Duration::ZERO],
            retry_later: Duration::seconds(5),
            reconcile_after: Duration::seconds(60),
            fault: None,
        };
        let windows = Windows {
            ttl: Duration::seconds(180),
            max_lifetime: Duration::minutes(30),
        };
        let service = Arc::new(CheckoutService::new(
            store.clone(),
            clock.clone(),
            Arc::new(gateway.clone()),
            Arc::new(InProcessGate::new()),
            windows,
            saga,
        ));
        Self {
            recovery: Arc::new(RecoveryWorker::new(service.clone())),
            expiry: Arc::new(
                ExpiryWorker::new(store.clone(), clock.clone()).with_admissions(service.clone()),
            ),
            relay: Arc::new(Relay::new(
                store.clone(),
                Arc::new(InProcessSink::new(store.clone(), clock.clone())),
                clock,
            )),
            service,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Start,
    Complete(usize, &'static str),
    Cancel(usize),
    Refund(usize),
    Authenticate(usize, bool),
    Deliver {
        pick: usize,
        again: bool,
        lost: bool,
    },
    Recover,
    Expire,
    Relay,
    Advance(i64),
    Crash,
    /// The stalled process, if any, comes back and finishes what it was doing.
    Resume,
}

/// A stalled process's unfinished step, and what lets it go on.
type Parked = (
    Pin<Box<dyn Future<Output = ()>>>,
    tokio::sync::oneshot::Sender<()>,
);

struct History {
    seed: u64,
    rng: StdRng,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    gateway: SimGateway,
    process: Process,
    customers: Vec<CustomerId>,
    /// Checkouts in the order they were started, with their customer and order.
    checkouts: Vec<(CustomerId, CheckoutId, OrderId)>,
    crashes: u32,
    /// Crashes at an await point of a gateway call (the others: after a step, or between).
    gateway_crashes: u32,
    stalls: u32,
    /// A stalled process's unfinished step and what lets it go on.
    parked: Option<Parked>,
    log: Vec<String>,
    /// Where the store lives: dropped (or the database dropped) with the history.
    place: Place,
}

/// A history's store: SQLite in a temp dir (CI), or a PostgreSQL database of its own
/// (`HOLDFAST_SIM_STORE=postgres`), dropped at the end.
enum Place {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(String),
}

/// The store of one history, on the store `HOLDFAST_SIM_STORE` names (`sqlite` by default).
async fn open_store() -> (Arc<dyn Store>, Place) {
    match std::env::var("HOLDFAST_SIM_STORE").as_deref() {
        Ok("postgres") => {
            let url = crate::helpers::fresh_postgres_database().await;
            let store = holdfast::store::PgStore::connect(&url, 4)
                .await
                .expect("open postgres");
            store.migrate().await.expect("migrate");
            (Arc::new(store), Place::Postgres(url))
        }
        Ok("sqlite") | Err(_) => {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = SqliteStore::open(dir.path()).await.expect("open sqlite");
            store.migrate().await.expect("migrate");
            (Arc::new(store), Place::Sqlite(dir))
        }
        Ok(other) => panic!("HOLDFAST_SIM_STORE is sqlite or postgres, not {other:?}"),
    }
}

/// Drops this history's own PostgreSQL database, once its pool is gone.
async fn drop_database(url: &str) {
    use sqlx::Connection as _;
    let Some((base, name)) = url.rsplit_once('/') else {
        return;
    };
    if !name.starts_with("hf_test_") {
        return;
    }
    if let Ok(mut admin) = sqlx::PgConnection::connect(&format!("{base}/test")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

impl History {
    async fn new(seed: u64) -> Self {
        let (store, place) = open_store().await;
        let clock = Arc::new(ManualClock::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
                .single()
                .expect("a time"),
        ));
        let gateway = SimGateway::new(seed);
        let product = NewProduct {
            sku: Sku::parse(SKU).expect("a sku"),
            name: ProductName::parse("Simulated kettle").expect("a name"),
            price: Money::new(PRICE, Currency::parse("EUR").expect("EUR")).expect("a price"),
            stock: StockLevel::new(STOCK).expect("a stock level"),
            rules: Default::default(),
            price_tiers: Default::default(),
        };
        store
            .create_product(&product, "simulation", clock.now())
            .await
            .expect("product");
        let mut customers = Vec::new();
        for i in 0..3 {
            let customer = store
                .create_customer(
                    &CustomerName::parse(&format!("Sim buyer {i}")).expect("a name"),
                    &format!("sim-token-hash-{i}"),
                )
                .await
                .expect("customer");
            customers.push(customer.id);
        }
        let process = Process::boot(&store, &clock, &gateway);
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            store,
            clock,
            gateway,
            process,
            customers,
            checkouts: Vec::new(),
            crashes: 0,
            gateway_crashes: 0,
            stalls: 0,
            parked: None,
            log: Vec::new(),
            place,
        }
    }

    fn pick_step(&mut self) -> Step {
        let n = self.checkouts.len().max(1);
        let rng = &mut self.rng;
        // Mostly one of the newest checkouts: the older ones have usually ended.
        let recent = n - 1 - rng.gen_range(0..n.min(3));
        match rng.gen_range(0..100) {
            0..=17 => Step::Start,
            18..=37 => Step::Complete(recent, CARDS[rng.gen_range(0..CARDS.len())]),
            38..=41 => Step::Cancel(rng.gen_range(0..n)),
            42..=45 => Step::Refund(rng.gen_range(0..n)),
            46..=51 => Step::Authenticate(rng.gen_range(0..8), rng.gen_bool(0.7)),
            52..=65 => Step::Deliver {
                pick: rng.gen_range(0..8),
                again: rng.gen_bool(0.2),
                lost: rng.gen_bool(0.1),
            },
            66..=73 => Step::Recover,
            74..=78 => Step::Expire,
            79..=84 => Step::Relay,
            85..=93 => Step::Advance(rng.gen_range(1..=90)),
            94..=96 => Step::Resume,
            _ => Step::Crash,
        }
    }

    /// A crash for the next step: most steps run to the end.
    /// Steps that call the gateway crash more often: their await points are the interesting ones.
    fn crash_point(&mut self, step: Step) -> Option<CrashPlan> {
        let calls_gateway = matches!(step, Step::Complete(..) | Step::Refund(_) | Step::Recover);
        if !self.rng.gen_bool(if calls_gateway { 0.4 } else { 0.1 }) {
            return None;
        }
        Some(match self.rng.gen_range(0..10) {
            0..=4 => CrashPlan::AtGatewayPoint(self.rng.gen_range(0..3)),
            5..=7 if self.parked.is_none() => {
                CrashPlan::StallAtGatewayPoint(self.rng.gen_range(0..3))
            }
            5..=7 => CrashPlan::AtGatewayPoint(self.rng.gen_range(0..3)),
            _ => CrashPlan::AfterStep,
        })
    }

    fn crash(&mut self) {
        self.crashes += 1;
        self.process = Process::boot(&self.store, &self.clock, &self.gateway);
    }

    /// Runs `work` (built on the current process) under `plan`; `None` when the process died
    /// or stalled before it finished.
    async fn run<F: Future + 'static>(
        &mut self,
        plan: Option<CrashPlan>,
        work: F,
    ) -> Option<F::Output> {
        if let Some(CrashPlan::AtGatewayPoint(n) | CrashPlan::StallAtGatewayPoint(n)) = plan {
            self.gateway.tripwire().countdown = Some(n);
        }
        let out = CrashAt {
            inner: Some(Box::pin(work)),
            tripwire: self.gateway.tripwire.clone(),
        }
        .await;
        let release = std::mem::take(&mut *self.gateway.tripwire()).release;
        match (out, plan) {
            (Ok(out), Some(CrashPlan::AfterStep)) => {
                self.log.push("  crashed after the step".to_owned());
                self.crash();
                Some(out)
            }
            (Ok(out), _) => Some(out),
            (Err(unfinished), Some(CrashPlan::StallAtGatewayPoint(_))) => {
                self.log.push(format!("  stalled ({plan:?})"));
                self.stalls += 1;
                let release = release.expect("a tripped call leaves its release");
                self.parked = Some((
                    Box::pin(async move {
                        let _ = unfinished.await;
                    }),
                    release,
                ));
                // Another instance serves meanwhile.
                self.process = Process::boot(&self.store, &self.clock, &self.gateway);
                None
            }
            (Err(_), _) => {
                self.log.push(format!("  crashed ({plan:?})"));
                self.gateway_crashes += 1;
                self.crash();
                None
            }
        }
    }

    /// The stalled process comes back and finishes its step.
    async fn resume(&mut self) {
        if let Some((unfinished, release)) = self.parked.take() {
            self.log.push("  the stalled process goes on".to_owned());
            let _ = release.send(());
            unfinished.await;
        }
    }

    /// Logs how a step ended (the state, or that it was refused), for a replay to compare.
    fn note<E>(&mut self, out: &Option<Result<holdfast::domain::Checkout, E>>) {
        if let Some(out) = out {
            self.log.push(match out {
                Ok(checkout) => format!("  -> {}", checkout.state.as_str()),
                Err(_) => "  -> refused".to_owned(),
            });
        }
    }

    async fn step(&mut self, step: Step) {
        self.log.push(format!("{step:?}"));
        let crash = self.crash_point(step);
        let service = self.process.service.clone();
        match step {
            Step::Start => {
                let customer = self.customers[self.rng.gen_range(0..self.customers.len())];
                let now = self.clock.now();
                let cart = self.store.create_cart(customer, now).await.expect("cart");
                let quantity = Quantity::new(self.rng.gen_range(1..=2)).expect("a quantity");
                let sku = Sku::parse(SKU).expect("a sku");
                self.store
                    .set_cart_line(customer, cart.id, &sku, quantity, now)
                    .await
                    .expect("line");
                let started = self
                    .run(crash, async move {
                        service.start(customer, cart.id, None, None).await
                    })
                    .await;
                if let Some(Ok(checkout)) = started {
                    self.checkouts
                        .push((customer, checkout.id, checkout.order_id));
                }
            }
            Step::Complete(i, card) => {
                if let Some(&(customer, id, _)) = self.checkouts.get(i) {
                    let out = self
                        .run(
                            crash,
                            async move { service.complete(customer, id, card).await },
                        )
                        .await;
                    self.note(&out);
                }
            }
            Step::Cancel(i) => {
                if let Some(&(customer, id, _)) = self.checkouts.get(i) {
                    let out = self
                        .run(crash, async move { service.cancel(customer, id).await })
                        .await;
                    self.note(&out);
                }
            }
            Step::Refund(i) => {
                if let Some(&(_, _, order)) = self.checkouts.get(i) {
                    let out = self
                        .run(crash, async move {
                            service
                                .refund_order(order)
                                .await
                                .map(|(checkout, _)| checkout)
                        })
                        .await;
                    self.note(&out);
                }
            }
            Step::Authenticate(pick, succeeds) => self.gateway.authenticate(pick, succeeds),
            Step::Deliver { pick, again, lost } => {
                let event = {
                    let mut ledger = self.gateway.ledger();
                    if ledger.events.is_empty() {
                        None
                    } else {
                        let at = pick % ledger.events.len();
                        Some(if again {
                            ledger.events[at].clone()
                        } else {
                            ledger.events.remove(at)
                        })
                    }
                };
                if let Some(event) = event.filter(|_| !lost) {
                    let store = self.store.clone();
                    let now = self.clock.now();
                    self.run(crash, deliver(store, service, event, now)).await;
                }
            }
            Step::Recover => {
                let recovery = self.process.recovery.clone();
                self.run(crash, async move { recovery.tick().await }).await;
            }
            Step::Expire => {
                let expiry = self.process.expiry.clone();
                self.run(crash, async move { expiry.tick().await }).await;
            }
            Step::Relay => {
                let relay = self.process.relay.clone();
                self.run(crash, async move { relay.tick().await }).await;
            }
            Step::Advance(seconds) => self.clock.advance(Duration::seconds(seconds)),
            Step::Crash => self.crash(),
            Step::Resume => self.resume().await,
        }
    }

    /// The safety promises, which hold after every step.
    async fn check_safety(&self) -> Result<(), String> {
        let report = audit::run_with(
            self.store.as_ref(),
            AuditOptions {
                gateway: Some(&self.gateway),
                now: self.clock.now(),
                // Liveness waits for the end of the history; here only safety counts.
                grace: Duration::days(3650),
            },
        )
        .await
        .map_err(|e| format!("the audit cannot read the store: {e}"))?;
        if !report.is_clean() {
            return Err(report.to_string());
        }
        let ledger = self.gateway.ledger();
        for intent in &ledger.intents {
            let refunded = ledger.refunded.get(&intent.id).copied().unwrap_or(0);
            if refunded > intent.amount {
                return Err(format!(
                    "{} refunded {refunded} of {}",
                    intent.id, intent.amount
                ));
            }
        }
        Ok(())
    }

    /// Lets time run and every worker and pending webhook finish, with no more crashes.
    async fn settle(&mut self) {
        self.resume().await;
        for round in 0..30 {
            if round == 5 {
                // Payments still `processing` settle at last (the first ones that fail).
                self.gateway.settle_processing();
            }
            self.clock.advance(Duration::seconds(120));
            let events = std::mem::take(&mut self.gateway.ledger().events);
            for event in events {
                let now = self.clock.now();
                let _ = deliver(self.store.clone(), self.process.service.clone(), event, now).await;
            }
            let _ = self.process.recovery.tick().await;
            let _ = self.process.expiry.tick().await;
            let _ = self.process.relay.tick().await;
        }
    }

    /// Liveness: the full audit with no grace, and every succeeded payment paid and kept, or
    /// refunded in full.
    async fn check_settled(&self) -> Result<(), String> {
        let report = audit::run_with(
            self.store.as_ref(),
            AuditOptions {
                gateway: Some(&self.gateway),
                now: self.clock.now(),
                grace: Duration::zero(),
            },
        )
        .await
        .map_err(|e| format!("the audit cannot read the store: {e}"))?;
        if !report.is_clean() {
            return Err(report.to_string());
        }
        let (intents, refunded) = {
            let ledger = self.gateway.ledger();
            (ledger.intents.clone(), ledger.refunded.clone())
        };
        for &(customer, id, _) in &self.checkouts {
            let checkout = self
                .store
                .checkout(customer, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("checkout {id} vanished"))?;
            if !checkout.state.is_terminal() {
                return Err(format!(
                    "checkout {id} still {} with the gateway settled and time run out",
                    checkout.state.as_str()
                ));
            }
            for intent in intents
                .iter()
                .filter(|i| i.checkout_id() == Some(id) && i.status == IntentStatus::Succeeded)
            {
                let refunded = refunded.get(&intent.id).copied().unwrap_or(0);
                let fine = match checkout.state {
                    CheckoutState::Completed => refunded == 0,
                    _ => refunded == intent.amount,
                };
                if !fine {
                    return Err(format!(
                        "checkout {id} ended {} with payment {} refunded {refunded} of {}",
                        checkout.state.as_str(),
                        intent.id,
                        intent.amount
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A webhook as the HTTP handler takes it: a seen event id is a duplicate; else handle, then
/// record it.
async fn deliver(
    store: Arc<dyn Store>,
    service: Arc<CheckoutService>,
    event: WebhookEvent,
    now: chrono::DateTime<Utc>,
) -> Result<(), String> {
    if store
        .webhook_seen(&event.id)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(());
    }
    service
        .handle_event(&event)
        .await
        .map_err(|e| e.to_string())?;
    store
        .record_webhook_event(&event.id, &event.event_type, event.payment_intent_id(), now)
        .await
        .map_err(|e| e.to_string())
}

/// What the sweep explored, summed over histories.
#[derive(Debug, Default)]
struct Explored {
    histories: u64,
    crashes: u32,
    gateway_crashes: u32,
    stalls: u32,
    /// Checkouts by the state they ended in.
    ended: std::collections::BTreeMap<&'static str, u64>,
    charges: u64,
    refunds: u64,
}

/// Runs the history of `seed`: `Err` names the step that broke a promise and the steps so far.
async fn run_history(seed: u64, steps: u64, explored: &mut Explored) -> Result<(), String> {
    let mut history = History::new(seed).await;
    for _ in 0..steps {
        let step = history.pick_step();
        history.step(step).await;
        if let Err(e) = history.check_safety().await {
            return Err(failure(&history, &e));
        }
    }
    history.settle().await;
    if std::env::var_os("HOLDFAST_SIM_TRACE").is_some() {
        eprintln!("seed {seed}:\n{}", history.log.join("\n"));
    }
    history
        .check_settled()
        .await
        .map_err(|e| failure(&history, &format!("after settling: {e}")))?;
    explored.histories += 1;
    explored.crashes += history.crashes;
    explored.gateway_crashes += history.gateway_crashes;
    explored.stalls += history.stalls;
    for &(customer, id, _) in &history.checkouts {
        if let Ok(Some(checkout)) = history.store.checkout(customer, id).await {
            *explored.ended.entry(checkout.state.as_str()).or_default() += 1;
        }
    }
    {
        let ledger = history.gateway.ledger();
        explored.charges += ledger
            .intents
            .iter()
            .filter(|i| i.status == IntentStatus::Succeeded)
            .count() as u64;
        explored.refunds += ledger.refund_keys.len() as u64;
    }
    // A history that broke a promise keeps its database for a look; a clean one goes.
    let History { place, .. } = history;
    if let Place::Postgres(url) = place {
        drop_database(&url).await;
    }
    Ok(())
}

fn failure(history: &History, why: &str) -> String {
    format!(
        "seed {} broke a promise (replay: HOLDFAST_SIM_SEED={}):\n{why}\nsteps:\n{}",
        history.seed,
        history.seed,
        history.log.join("\n")
    )
}

fn env_number(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    Some(
        raw.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {raw:?}")),
    )
}

#[tokio::test]
async fn a_seeded_sweep_of_saga_histories_with_crashes_and_a_faulty_gateway_keeps_every_promise() {
    let steps = env_number("HOLDFAST_SIM_STEPS").unwrap_or(STEPS);
    let seeds: Vec<u64> = match env_number("HOLDFAST_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let histories = env_number("HOLDFAST_SIM_HISTORIES").unwrap_or(HISTORIES);
            let first = env_number("HOLDFAST_SIM_FIRST_SEED")
                .unwrap_or_else(|| rand::thread_rng().gen_range(0..u64::MAX / 2));
            eprintln!(
                "simulation: {histories} histories of {steps} steps from seed {first} \
                 (replay the sweep: HOLDFAST_SIM_FIRST_SEED={first})"
            );
            REGRESSION_SEEDS
                .iter()
                .copied()
                .chain(first..first + histories)
                .collect()
        }
    };
    let mut explored = Explored::default();
    for &seed in &seeds {
        if let Err(e) = run_history(seed, steps, &mut explored).await {
            panic!("{e}");
        }
    }
    eprintln!(
        "simulation: {} histories explored, {} crashes ({} inside a gateway call), {} stalled \
         instances (resumed later), {} successful charges, {} refunds, checkouts ended \
         {:?}; 0 violations",
        explored.histories,
        explored.crashes,
        explored.gateway_crashes,
        explored.stalls,
        explored.charges,
        explored.refunds,
        explored.ended
    );
    assert_eq!(explored.histories, seeds.len() as u64);
}
