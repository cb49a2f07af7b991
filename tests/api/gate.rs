//! The admission gate's conformance suite (DESIGN §5): every case runs against the Redis gate
//! (a real Redis, its own key prefix per test) and the in-process gate, so the embedded and the
//! production shape admit exactly the same buyers. The Redis-only tests at the end kill and
//! freeze a dedicated `redis-server` to prove the Redis gate fails closed, fast, and recovers.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use holdfast::domain::{CheckoutId, CustomerId, FlashSaleId};
use holdfast::flash_sale::{
    AdmissionGate, GateError, GateFigures, InProcessGate, RedisGate, RequestBudget, SaleRecord,
    SaleTerms, TOKEN_PREFIX,
};
use tokio::sync::Barrier;
use tokio::time::{sleep, timeout, Instant};

/// The shared Redis of this machine; `HOLDFAST_TEST_REDIS_URL` points the suite elsewhere.
fn redis_url() -> String {
    std::env::var("HOLDFAST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Runs each case once per gate: `gate::redis::<case>` and `gate::in_process::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let prefix = super::fresh_prefix();
                    let gate = holdfast::flash_sale::RedisGate::connect(&super::redis_url(), prefix.clone())
                        .await
                        .expect("the test Redis answers (is redis-server running on 6379?)");
                    super::$case(std::sync::Arc::new(gate)).await;
                    super::delete_keys(&prefix).await;
                }
            )*
        }

        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(std::sync::Arc::new(holdfast::flash_sale::InProcessGate::new())).await;
                }
            )*
        }
    };
}

conformance!(
    five_thousand_buyers_for_a_hundred_units_admit_exactly_a_hundred,
    a_holder_asking_again_gets_the_same_token_and_no_second_unit,
    a_token_is_bound_to_its_customer_its_sale_and_its_hold,
    a_lapsed_hold_frees_its_unit_for_the_next_buyer,
    releasing_hands_the_unit_back_and_is_idempotent,
    a_repeated_release_never_takes_away_a_later_admission,
    consuming_counts_the_unit_sold_once_and_releasing_does_not_return_it,
    a_payment_after_the_hold_lapsed_still_counts_as_sold,
    extending_keeps_a_holder_alive_past_its_first_expiry,
    extending_never_shortens_a_hold_and_never_makes_a_holder,
    a_sale_admits_nobody_before_it_starts_or_from_its_end_on,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn fresh_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4())
}

/// Removes what a Redis case left behind. Best effort: a failed cleanup must not fail a test
/// that passed, and a panicking case skips it (its keys carry a unique prefix either way).
pub(crate) async fn delete_keys(prefix: &str) {
    let Ok(client) = ::redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = match ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
    {
        Ok(keys) => keys,
        Err(_) => return,
    };
    if !keys.is_empty() {
        let _: Result<(), _> = ::redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut connection)
            .await;
    }
}

/// A whole millisecond, so the Redis gate (which keeps milliseconds) and the in-process gate
/// see exactly the same instants.
fn an_instant() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
        .expect("the current time is representable")
}

fn sale(units: u32, starts_at: DateTime<Utc>) -> SaleTerms {
    SaleTerms {
        sale_id: FlashSaleId::new(),
        units,
        max_per_buyer: 1,
        starts_at,
        ends_at: None,
    }
}

/// The sale, loaded into the gate with no checkouts yet (as opening it does).
async fn opened(gate: &dyn AdmissionGate, terms: SaleTerms) -> SaleTerms {
    assert!(gate
        .load(terms.sale_id, &SaleRecord::default())
        .await
        .expect("the gate loads the sale"));
    terms
}

fn hold() -> Duration {
    Duration::minutes(5)
}

async fn figures(gate: &dyn AdmissionGate, terms: &SaleTerms, now: DateTime<Utc>) -> GateFigures {
    gate.figures(terms.sale_id, now)
        .await
        .expect("the gate reports its figures")
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn five_thousand_buyers_for_a_hundred_units_admit_exactly_a_hundred(
    gate: Arc<dyn AdmissionGate>,
) {
    // Arrange
    const BUYERS: usize = 5_000;
    let now = an_instant();
    let terms = Arc::new(opened(gate.as_ref(), sale(100, now - Duration::seconds(1))).await);
    let barrier = Arc::new(Barrier::new(BUYERS));

    // Act
    let tasks: Vec<_> = (0..BUYERS)
        .map(|_| {
            let (gate, terms, barrier) = (gate.clone(), terms.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                gate.admit(&terms, CustomerId::new(), now, hold()).await
            })
        })
        .collect();
    let mut tokens = Vec::new();
    let (mut sold_out, mut other) = (0, Vec::new());
    for task in tasks {
        match task.await.expect("an admission task does not panic") {
            Ok(admission) => {
                assert!(admission.newly_granted);
                tokens.push(admission.token);
            }
            Err(GateError::SoldOut) => sold_out += 1,
            Err(e) => other.push(e),
        }
    }

    // Assert
    assert_eq!(
        other,
        Vec::<GateError>::new(),
        "no answer but admitted or sold out"
    );
    assert_eq!(tokens.len(), 100);
    assert_eq!(sold_out, 4_900);
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 100, "every admission has its own token");
    assert!(tokens.iter().all(|t| t.starts_with(TOKEN_PREFIX)));
    assert_eq!(
        figures(gate.as_ref(), &terms, now).await,
        GateFigures {
            holders: 100,
            held: 100,
            sold: 0
        }
    );
}

async fn a_holder_asking_again_gets_the_same_token_and_no_second_unit(
    gate: Arc<dyn AdmissionGate>,
) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(2, now)).await;
    let (buyer, other) = (CustomerId::new(), CustomerId::new());
    let first = gate
        .admit(&terms, buyer, now, hold())
        .await
        .expect("two units are free");

    // Act
    let again = gate
        .admit(&terms, buyer, now + Duration::seconds(30), hold())
        .await
        .expect("a holder is answered with its admission");

    // Assert
    assert!(first.newly_granted);
    assert!(!again.newly_granted);
    assert_eq!(again.token, first.token);
    assert_eq!(
        again.expires_at, first.expires_at,
        "asking again does not extend"
    );
    assert_eq!(first.expires_at, now + hold());
    assert_eq!(figures(gate.as_ref(), &terms, now).await.holders, 1);
    gate.admit(&terms, other, now, hold())
        .await
        .expect("the second unit is still free");
    assert_eq!(
        gate.admit(&terms, CustomerId::new(), now, hold()).await,
        Err(GateError::SoldOut)
    );
}

async fn a_token_is_bound_to_its_customer_its_sale_and_its_hold(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(2, now)).await;
    let (alice, bob) = (CustomerId::new(), CustomerId::new());
    let alices = gate.admit(&terms, alice, now, hold()).await.expect("free");
    let bobs = gate.admit(&terms, bob, now, hold()).await.expect("free");
    let sale_id = terms.sale_id;
    let check = |customer: CustomerId, token: String, at: DateTime<Utc>| {
        let gate = gate.clone();
        async move {
            gate.check(sale_id, customer, &token, at)
                .await
                .expect("the gate answers")
        }
    };

    // Act + Assert
    assert!(check(alice, alices.token.clone(), now).await);
    assert!(check(bob, bobs.token.clone(), now).await);
    assert!(
        !check(bob, alices.token.clone(), now).await,
        "another customer's token"
    );
    assert!(
        !check(CustomerId::new(), alices.token.clone(), now).await,
        "a customer who holds nothing"
    );
    assert!(
        !check(alice, format!("{TOKEN_PREFIX}{}", "0".repeat(32)), now).await,
        "a wrong token"
    );
    assert!(!check(alice, String::new(), now).await, "an empty token");
    let last_live_instant = alices.expires_at - Duration::milliseconds(1);
    assert!(check(alice, alices.token.clone(), last_live_instant).await);
    assert!(
        !check(alice, alices.token.clone(), alices.expires_at).await,
        "an expired hold"
    );
    assert_eq!(
        gate.check(FlashSaleId::new(), alice, &alices.token, now)
            .await,
        Err(GateError::NotLoaded),
        "another sale, which this gate never loaded"
    );
}

async fn a_lapsed_hold_frees_its_unit_for_the_next_buyer(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(1, now)).await;
    let (first, next) = (CustomerId::new(), CustomerId::new());
    gate.admit(&terms, first, now, hold()).await.expect("free");
    assert_eq!(
        gate.admit(&terms, next, now + Duration::minutes(1), hold())
            .await,
        Err(GateError::SoldOut)
    );

    // Act
    let lapsed = now + hold();
    let admission = gate
        .admit(&terms, next, lapsed, hold())
        .await
        .expect("the first hold lapsed, so its unit is free");

    // Assert
    assert!(admission.newly_granted);
    assert_eq!(admission.expires_at, lapsed + hold());
    assert_eq!(
        gate.admit(&terms, first, lapsed, hold()).await,
        Err(GateError::SoldOut),
        "the lapsed holder queues like everyone else"
    );
    assert_eq!(
        figures(gate.as_ref(), &terms, lapsed).await,
        GateFigures {
            holders: 1,
            held: 1,
            sold: 0
        }
    );
}

async fn releasing_hands_the_unit_back_and_is_idempotent(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(1, now)).await;
    let (first, next) = (CustomerId::new(), CustomerId::new());
    let admission = gate.admit(&terms, first, now, hold()).await.expect("free");
    assert_eq!(
        gate.admit(&terms, next, now, hold()).await,
        Err(GateError::SoldOut)
    );

    // Act
    let checkout = CheckoutId::new();
    gate.release(terms.sale_id, first, checkout)
        .await
        .expect("released");
    gate.release(terms.sale_id, first, checkout)
        .await
        .expect("releasing again is harmless");

    // Assert
    assert!(!gate
        .check(terms.sale_id, first, &admission.token, now)
        .await
        .expect("the gate answers"));
    gate.admit(&terms, next, now, hold())
        .await
        .expect("the released unit goes to the next buyer");
    assert_eq!(
        figures(gate.as_ref(), &terms, now).await,
        GateFigures {
            holders: 1,
            held: 1,
            sold: 0
        }
    );
    assert_eq!(
        gate.release(FlashSaleId::new(), first, CheckoutId::new())
            .await,
        Err(GateError::NotLoaded),
        "a sale the gate never loaded is loaded first, never counted blind"
    );
}

/// A declined payment hands its unit back, and the buyer takes a new admission at once; then
/// the decline's webhook arrives and the saga settles the same checkout again. That second
/// release must not drop the new admission (the database holds its unit), or the gate would let
/// one buyer more through than there are units and refuse them at checkout.
async fn a_repeated_release_never_takes_away_a_later_admission(gate: Arc<dyn AdmissionGate>) {
    // Arrange: one unit, held by a buyer whose first checkout failed and who is back.
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(1, now)).await;
    let (buyer, next) = (CustomerId::new(), CustomerId::new());
    let failed = CheckoutId::new();
    gate.admit(&terms, buyer, now, hold()).await.expect("free");
    gate.release(terms.sale_id, buyer, failed)
        .await
        .expect("released");
    let again = gate
        .admit(&terms, buyer, now, hold())
        .await
        .expect("the unit is free again");

    // Act: the same checkout is settled a second time.
    gate.release(terms.sale_id, buyer, failed)
        .await
        .expect("a repeated release is harmless");

    // Assert
    assert!(
        gate.check(terms.sale_id, buyer, &again.token, now)
            .await
            .expect("the gate answers"),
        "the new admission stands"
    );
    assert_eq!(
        gate.admit(&terms, next, now, hold()).await,
        Err(GateError::SoldOut),
        "the one unit is still held"
    );
}

async fn consuming_counts_the_unit_sold_once_and_releasing_does_not_return_it(
    gate: Arc<dyn AdmissionGate>,
) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(2, now)).await;
    let (payer, holder, late) = (CustomerId::new(), CustomerId::new(), CustomerId::new());
    let paid = gate.admit(&terms, payer, now, hold()).await.expect("free");
    gate.admit(&terms, holder, now, hold()).await.expect("free");
    let within_units = |f: GateFigures| f.holders + f.sold <= terms.units;

    // Act
    let bought = CheckoutId::new();
    gate.consume(terms.sale_id, payer, bought, 1)
        .await
        .expect("consumed");
    gate.consume(terms.sale_id, payer, bought, 1)
        .await
        .expect("consuming again is harmless");
    gate.release(terms.sale_id, payer, CheckoutId::new())
        .await
        .expect("releasing a paid unit is harmless");

    // Assert
    let after = figures(gate.as_ref(), &terms, now).await;
    assert_eq!(
        after,
        GateFigures {
            holders: 1,
            held: 1,
            sold: 1
        }
    );
    assert!(within_units(after));
    assert!(!gate
        .check(terms.sale_id, payer, &paid.token, now)
        .await
        .expect("the gate answers"));
    assert_eq!(
        gate.admit(&terms, late, now, hold()).await,
        Err(GateError::SoldOut),
        "one unit held and one sold"
    );
    assert_eq!(
        gate.admit(&terms, payer, now, hold()).await,
        Err(GateError::SoldOut),
        "a buyer who paid is not admitted again"
    );
    gate.release(terms.sale_id, holder, CheckoutId::new())
        .await
        .expect("released");
    gate.admit(&terms, late, now, hold())
        .await
        .expect("the released unit is free, the sold one is not");
    let end = figures(gate.as_ref(), &terms, now).await;
    assert_eq!(
        end,
        GateFigures {
            holders: 1,
            held: 1,
            sold: 1
        }
    );
    assert!(within_units(end));
}

async fn a_payment_after_the_hold_lapsed_still_counts_as_sold(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(2, now)).await;
    let payer = CustomerId::new();
    gate.admit(&terms, payer, now, hold()).await.expect("free");
    let lapsed = now + hold() + Duration::seconds(1);
    gate.admit(&terms, CustomerId::new(), lapsed, hold())
        .await
        .expect("the lapsed unit is free again");

    // Act
    gate.consume(terms.sale_id, payer, CheckoutId::new(), 1)
        .await
        .expect("consumed");

    // Assert
    assert_eq!(
        figures(gate.as_ref(), &terms, lapsed).await,
        GateFigures {
            holders: 1,
            held: 1,
            sold: 1
        }
    );
    assert_eq!(
        gate.admit(&terms, CustomerId::new(), lapsed, hold()).await,
        Err(GateError::SoldOut)
    );
}

async fn extending_keeps_a_holder_alive_past_its_first_expiry(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(1, now)).await;
    let (holder, next) = (CustomerId::new(), CustomerId::new());
    let admission = gate.admit(&terms, holder, now, hold()).await.expect("free");
    let until = now + Duration::minutes(10);

    // Act
    gate.extend(terms.sale_id, holder, until)
        .await
        .expect("extended");

    // Assert
    let past_first_expiry = admission.expires_at + Duration::minutes(2);
    assert!(gate
        .check(terms.sale_id, holder, &admission.token, past_first_expiry)
        .await
        .expect("the gate answers"));
    assert_eq!(
        gate.admit(&terms, next, past_first_expiry, hold()).await,
        Err(GateError::SoldOut)
    );
    let again = gate
        .admit(&terms, holder, past_first_expiry, hold())
        .await
        .expect("still a holder");
    assert_eq!(again.expires_at, until);
    assert!(!again.newly_granted);
    gate.admit(&terms, next, until, hold())
        .await
        .expect("the extended hold lapsed at last");
}

async fn extending_never_shortens_a_hold_and_never_makes_a_holder(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let now = an_instant();
    let terms = opened(gate.as_ref(), sale(2, now)).await;
    let (holder, stranger) = (CustomerId::new(), CustomerId::new());
    let admission = gate.admit(&terms, holder, now, hold()).await.expect("free");

    // Act
    gate.extend(terms.sale_id, holder, now + Duration::minutes(1))
        .await
        .expect("an earlier expiry is ignored");
    gate.extend(terms.sale_id, stranger, now + Duration::minutes(10))
        .await
        .expect("extending a non-holder is a no-op");

    // Assert
    let again = gate
        .admit(&terms, holder, now, hold())
        .await
        .expect("still a holder");
    assert_eq!(again.expires_at, admission.expires_at);
    assert_eq!(figures(gate.as_ref(), &terms, now).await.holders, 1);
    let after_a_minute = now + Duration::minutes(2);
    assert!(gate
        .check(terms.sale_id, holder, &admission.token, after_a_minute)
        .await
        .expect("the gate answers"));
}

async fn a_sale_admits_nobody_before_it_starts_or_from_its_end_on(gate: Arc<dyn AdmissionGate>) {
    // Arrange
    let starts_at = an_instant();
    let ends_at = starts_at + Duration::hours(1);
    let terms = opened(
        gate.as_ref(),
        SaleTerms {
            ends_at: Some(ends_at),
            ..sale(10, starts_at)
        },
    )
    .await;
    let buyer = CustomerId::new();

    // Act + Assert
    assert_eq!(
        gate.admit(&terms, buyer, starts_at - Duration::milliseconds(1), hold())
            .await,
        Err(GateError::NotStarted)
    );
    assert_eq!(
        gate.admit(&terms, buyer, ends_at, hold()).await,
        Err(GateError::Ended)
    );
    assert_eq!(
        figures(gate.as_ref(), &terms, starts_at).await,
        GateFigures::default(),
        "a refused buyer holds nothing"
    );
    gate.admit(&terms, buyer, starts_at, hold())
        .await
        .expect("open from its start instant");
}

// ---------------------------------------------------------------------------------------------
// Redis going away and coming back

/// A `redis-server` of this test's own, on a free port, killed when dropped so no process
/// outlives the test.
pub(crate) struct DedicatedRedis {
    port: u16,
    child: Option<Child>,
}

impl DedicatedRedis {
    pub(crate) fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("the OS hands out a free port")
            .port();
        let mut redis = Self { port, child: None };
        redis.restart();
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn restart(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already gone is fine; the point is that it is gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: its socket stays open but nothing
    /// answers, as when a host hangs or a network drops packets silently.
    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("the server is running")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill is installed");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Waits until the server answers PING, with a deadline.
    pub(crate) async fn wait_until_ready(&self) {
        let deadline = Instant::now() + StdDuration::from_secs(10);
        let client = ::redis::Client::open(self.url()).expect("a valid URL");
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                let pong: Result<String, _> =
                    ::redis::cmd("PING").query_async(&mut connection).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            sleep(StdDuration::from_millis(20)).await;
        }
    }
}

impl Drop for DedicatedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_gate_fails_closed_while_redis_is_down_and_recovers_when_it_returns() {
    // Arrange
    let mut server = DedicatedRedis::start();
    server.wait_until_ready().await;
    let gate = RedisGate::connect(&server.url(), fresh_prefix())
        .await
        .expect("the dedicated Redis answers");
    let now = an_instant();
    let terms = opened(&gate, sale(1, now)).await;
    gate.admit(&terms, CustomerId::new(), now, hold())
        .await
        .expect("the gate works while Redis is up");

    // Act: Redis goes away.
    server.kill();

    // Assert: refused at once, never admitted, never "sold out".
    for attempt in 0..3 {
        let answer = timeout(
            StdDuration::from_secs(5),
            gate.admit(&terms, CustomerId::new(), now, hold()),
        )
        .await
        .expect("the gate answers instead of hanging");
        assert!(
            matches!(answer, Err(GateError::Unavailable(_))),
            "attempt {attempt}: {answer:?}"
        );
    }
    let checked = timeout(
        StdDuration::from_secs(5),
        gate.check(terms.sale_id, CustomerId::new(), "fst_x", now),
    )
    .await
    .expect("the gate answers instead of hanging");
    assert!(
        matches!(checked, Err(GateError::Unavailable(_))),
        "an unanswerable check is an error, not a no: {checked:?}"
    );

    // Act: Redis comes back (empty: it kept nothing).
    server.restart();
    server.wait_until_ready().await;

    // Assert: the gate reconnects by itself and loads its scripts again.
    let buyer = CustomerId::new();
    let deadline = Instant::now() + StdDuration::from_secs(10);
    let admission = loop {
        match timeout(
            StdDuration::from_secs(5),
            gate.admit(&terms, buyer, now, hold()),
        )
        .await
        .expect("the gate answers instead of hanging")
        {
            Ok(admission) => break admission,
            Err(GateError::Unavailable(_)) if Instant::now() < deadline => {
                sleep(StdDuration::from_millis(50)).await;
            }
            // The restarted server is empty: the sale must be loaded again (the service loads
            // it from the database) before anyone is admitted.
            Err(GateError::NotLoaded) => {
                gate.load(terms.sale_id, &SaleRecord::default())
                    .await
                    .expect("the restarted Redis loads the sale");
            }
            Err(other) => panic!("the gate did not recover: {other:?}"),
        }
    };
    assert!(admission.newly_granted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_gate_refuses_rather_than_waits_when_redis_stops_answering() {
    // Arrange
    let server = DedicatedRedis::start();
    server.wait_until_ready().await;
    let gate = RedisGate::connect(&server.url(), fresh_prefix())
        .await
        .expect("the dedicated Redis answers");
    let now = an_instant();
    let terms = opened(&gate, sale(10, now)).await;
    gate.admit(&terms, CustomerId::new(), now, hold())
        .await
        .expect("the gate works while Redis answers");
    let buyer = CustomerId::new();

    // Act: Redis hangs with the connection open.
    server.signal("-STOP");
    let answer = timeout(
        StdDuration::from_secs(5),
        gate.admit(&terms, buyer, now, hold()),
    )
    .await
    .expect("the gate gives up instead of hanging");
    server.signal("-CONT");

    // Assert
    assert!(
        matches!(answer, Err(GateError::Unavailable(_))),
        "{answer:?}"
    );
    // The refused call may still have run once Redis woke up; asking again is safe either way:
    // the buyer gets one hold, never two.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    let admission = loop {
        match gate.admit(&terms, buyer, now, hold()).await {
            Ok(admission) => break admission,
            Err(GateError::Unavailable(_)) if Instant::now() < deadline => {
                sleep(StdDuration::from_millis(50)).await;
            }
            // The restarted server is empty: the sale must be loaded again (the service loads
            // it from the database) before anyone is admitted.
            Err(GateError::NotLoaded) => {
                gate.load(terms.sale_id, &SaleRecord::default())
                    .await
                    .expect("the restarted Redis loads the sale");
            }
            Err(other) => panic!("the gate did not recover: {other:?}"),
        }
    };
    assert!(admission.token.starts_with(TOKEN_PREFIX));
    assert_eq!(
        gate.figures(terms.sale_id, now)
            .await
            .expect("the gate answers"),
        GateFigures {
            holders: 2,
            held: 2,
            sold: 0
        }
    );
}

#[tokio::test]
async fn the_in_process_gate_names_itself() {
    assert_eq!(InProcessGate::new().name(), "in_process");
}

/// The Redis gate takes a customer's shared request budget in the admission's own script
/// call: within the budget the call admits (or answers the holder), over it the answer is
/// `RateLimited` and nothing else changed; the in-process gate keeps no budgets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_gate_takes_the_request_budget_in_the_admission_call() {
    // Arrange: a budget of a burst of 2, one request a minute; a sale of 1 unit.
    let prefix = fresh_prefix();
    let gate = RedisGate::connect(&redis_url(), prefix.clone())
        .await
        .expect("the test Redis answers (is redis-server running on 6379?)");
    assert!(gate.keeps_budgets());
    assert!(!InProcessGate::new().keeps_budgets());
    let now = an_instant();
    let terms = opened(&gate, sale(1, now)).await;
    let (ada, bob) = (CustomerId::new(), CustomerId::new());
    let budget = |customer: CustomerId| RequestBudget {
        key: format!("{prefix}rate:{customer}"),
        interval_ms: 60_000,
        burst: 2,
    };

    // Act: Ada three times, then Bob twice (the sale is Ada's by then).
    let mut adas = Vec::new();
    for _ in 0..3 {
        adas.push(
            gate.admit_within(&terms, ada, now, hold(), &budget(ada))
                .await,
        );
    }
    let bobs = [
        gate.admit_within(&terms, bob, now, hold(), &budget(bob))
            .await,
        gate.admit_within(&terms, bob, now, hold(), &budget(bob))
            .await,
    ];

    // Assert
    let first = adas[0].as_ref().expect("the unit is free");
    assert!(first.newly_granted);
    let again = adas[1]
        .as_ref()
        .expect("within the burst: the holder's answer");
    assert_eq!((again.newly_granted, &again.token), (false, &first.token));
    assert!(
        matches!(adas[2], Err(GateError::RateLimited(wait)) if wait > 0 && wait <= 60_000),
        "{:?}",
        adas[2]
    );
    assert_eq!(
        bobs[0],
        Err(GateError::SoldOut),
        "Bob's own budget is untouched"
    );
    assert_eq!(bobs[1], Err(GateError::SoldOut));
    let after = figures(&gate, &terms, now).await;
    assert_eq!((after.holders, after.held), (1, 1), "{after:?}");
    let over = gate
        .admit_within(&terms, bob, now, hold(), &budget(bob))
        .await;
    assert!(matches!(over, Err(GateError::RateLimited(_))), "{over:?}");
    delete_keys(&prefix).await;
}
