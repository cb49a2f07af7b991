//! Crash tests with the real binary: promises 3, 4 and 5 across a SIGKILL.
//!
//! Each test runs `holdfast serve` as a child process on a PostgreSQL database of its own,
//! charging through the fake Stripe server in the test process and relaying events to a NATS
//! stream of its own. It kills the process with SIGKILL, starts it again on the same database
//! and proves that recovery finishes every checkout: one charge per paid checkout and one
//! refund per refunded one in the gateway's ledger, stock that adds up with nothing left
//! reserved, one `order.paid` message per paid order on the stream, and a clean audit (in
//! process and `holdfast audit`).
//!
//! The fault-point tests stop the process at one phase boundary (`HOLDFAST_FAULT_POINT`),
//! reached by the scenario that leads there (a card that succeeds, declines or needs
//! authentication, an abandoned authentication, an admin refund, a late payment for an expired
//! checkout), and kill it once every checkout stands where that point leaves it. Every point of
//! `FaultPoint::ALL` has at least one such test. The last tests kill a process at a random
//! moment of a burst, and then round after round at random points and moments (the soak).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use holdfast::audit::AuditOptions;
use holdfast::domain::{CheckoutId, Currency, CustomerId, Money, OrderId};
use holdfast::faults::{self, FaultPoint};
use holdfast::payments::{
    signature, ChargeOutcome, ChargeRequest, PaymentGateway as _, StripeGateway, Timeouts,
};
use holdfast::store::{OutboxStore as _, PgStore};
use rand::Rng as _;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::Row as _;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::helpers::{
    fresh_postgres_database, nats_url, AssertClean as _, ADMIN_TOKEN, WEBHOOK_SECRET,
};

const SKU: &str = "crash-01";
const PRICE: i64 = 1250;
const BUYERS: usize = 5;

/// How long an instance owns a checkout it is charging: recovery takes over this long after
/// the kill.
const LEASE_SECONDS: u64 = 2;

/// How long a checkout waits for authentication before the reconciler asks the gateway.
const RECONCILE_AFTER_SECONDS: u64 = 1;

/// Events claimed by the killed process's relay are published again once this runs out.
const RELAY_LEASE_SECONDS: u64 = 2;

/// Every checkout must stand where the fault point leaves it this long after the first marker.
const REACH_WITHIN: Duration = Duration::from_secs(20);

/// Every checkout must be settled this long after the restart.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// Every event must be published this long after the checkouts settled.
const PUBLISH_WITHIN: Duration = Duration::from_secs(30);

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    request: Duration::from_secs(10),
};

/// One test per `(fault point, scenario)`, and the list of them, which
/// `every_fault_point_has_a_crash_test` checks against `FaultPoint::ALL`.
macro_rules! crash_at {
    ($($name:ident => $point:expr, $scenario:expr);+ $(;)?) => {
        const CASES: &[(FaultPoint, Scenario)] = &[$(($point, $scenario)),+];
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                a_process_killed_at_a_fault_point_is_finished_by_its_successor($point, $scenario)
                    .await
            }
        )+
    };
}

crash_at!(
    a_process_killed_after_reserving_and_before_answering_leaves_reservations_that_expire_and_carts_that_check_out_again
        => FaultPoint::AfterReserve, Scenario::Reserve;
    a_process_killed_after_charging_is_recorded_and_before_the_gateway_call_charges_each_checkout_once_after_restart
        => FaultPoint::AfterBeginCharge, Scenario::Visa;
    a_process_killed_after_the_gateway_charged_and_before_the_outcome_is_recorded_completes_each_checkout_without_a_second_charge
        => FaultPoint::AfterGatewayCall, Scenario::Visa;
    a_process_killed_after_the_success_is_recorded_publishes_one_order_paid_event_per_order_after_restart
        => FaultPoint::AfterRecordSuccess, Scenario::Visa;
    a_process_killed_after_a_decline_is_recorded_leaves_every_unit_released_and_nothing_charged
        => FaultPoint::AfterRecordDecline, Scenario::Decline;
    a_process_killed_after_requires_action_is_recorded_completes_authenticated_payments_and_cancels_abandoned_ones
        => FaultPoint::AfterRecordRequiresAction, Scenario::Authenticate;
    a_process_killed_after_cancelling_an_abandoned_authentication_at_the_gateway_releases_its_units_after_restart
        => FaultPoint::AfterCancelCall, Scenario::AbandonAuthentication;
    a_process_killed_after_a_cancelled_authentication_is_recorded_cancels_the_other_abandoned_ones_after_restart
        => FaultPoint::AfterRecordCancel, Scenario::AbandonAuthentication;
    a_process_killed_before_an_admin_refund_reaches_the_gateway_refunds_each_order_once_after_restart
        => FaultPoint::BeforeRefundCall, Scenario::AdminRefund;
    a_process_killed_after_the_gateway_made_an_admin_refund_records_it_without_a_second_refund
        => FaultPoint::AfterRefundCall, Scenario::AdminRefund;
    a_process_killed_after_an_admin_refund_is_recorded_leaves_each_order_refunded_once
        => FaultPoint::AfterRecordRefund, Scenario::AdminRefund;
    a_process_killed_before_a_late_payment_is_refunded_refunds_it_once_after_restart
        => FaultPoint::BeforeRefundCall, Scenario::LateSuccess;
    a_process_killed_after_the_gateway_refunded_a_late_payment_records_it_without_a_second_refund
        => FaultPoint::AfterRefundCall, Scenario::LateSuccess;
    a_process_killed_after_a_late_payment_refund_is_recorded_leaves_it_refunded_once
        => FaultPoint::AfterRecordRefund, Scenario::LateSuccess;
    a_process_killed_between_publishing_events_and_marking_them_leaves_one_order_paid_message_per_order
        => FaultPoint::AfterPublish, Scenario::Visa;
    a_process_killed_before_a_partial_refund_reaches_the_gateway_refunds_it_once_after_restart
        => FaultPoint::BeforeRefundCall, Scenario::PartialRefund;
    a_process_killed_after_the_gateway_made_a_partial_refund_records_it_without_a_second_refund
        => FaultPoint::AfterRefundCall, Scenario::PartialRefund;
    a_process_killed_after_a_partial_refund_is_recorded_leaves_each_order_refunded_once_and_restocked_once
        => FaultPoint::AfterRecordRefund, Scenario::PartialRefund;
    a_process_killed_after_a_shipment_is_recorded_and_before_its_capture_captures_it_once_after_restart
        => FaultPoint::BeforeCaptureCall, Scenario::ManualShipment;
    a_process_killed_after_the_gateway_captured_a_shipment_records_it_without_a_second_capture
        => FaultPoint::AfterCaptureCall, Scenario::ManualShipment;
    a_process_killed_after_a_capture_is_recorded_leaves_each_shipment_captured_once
        => FaultPoint::AfterRecordCapture, Scenario::ManualShipment;
);

#[test]
fn every_fault_point_has_a_crash_test() {
    for point in FaultPoint::ALL {
        assert!(
            CASES.iter().any(|(p, _)| *p == point),
            "no crash test stops at {}",
            point.as_str()
        );
    }
}

/// How a crash test leads every checkout to its fault point, and what the customers and the
/// gateway do after the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Checkouts are started and their answers lost with the process; after the restart the
    /// reservations expire and every buyer checks out again with `pm_card_visa`.
    Reserve,
    /// Every buyer completes with `pm_card_visa`.
    Visa,
    /// Every buyer completes with `pm_card_chargeDeclined`.
    Decline,
    /// Every buyer completes with `pm_card_authenticationRequired`; after the restart the first
    /// ones authenticate, the others never do.
    Authenticate,
    /// Every buyer completes with `pm_card_authenticationRequired` and never authenticates: the
    /// reconciler cancels each payment once its checkout's lifetime is over.
    AbandonAuthentication,
    /// Every buyer pays with `pm_card_visa`, then the admin refunds every order.
    AdminRefund,
    /// Every buyer pays with `pm_card_visa`, then the admin refunds one unit of every order by
    /// line (`POST /v1/admin/orders/{id}/refunds`), putting it back in stock.
    PartialRefund,
    /// Every checkout expires and another buyer takes all the units; then a payment for each
    /// expired checkout succeeds after all and its webhook arrives: the money goes back.
    LateSuccess,
    /// Manual capture: every buyer's card is authorized with `pm_card_visa`, then the admin
    /// ships every order whole, each shipment capturing the order's amount.
    ManualShipment,
}

/// Buyers who authenticate after the restart in [`Scenario::Authenticate`].
const AUTHENTICATING: usize = 3;

impl Scenario {
    /// `(reservation TTL, maximum lifetime)` in seconds: short where the scenario waits for
    /// reservations to expire or for an authentication's lifetime to end.
    fn windows(self) -> (u64, u64) {
        match self {
            Scenario::Reserve => (4, 1800),
            Scenario::LateSuccess => (1, 1800),
            Scenario::Authenticate | Scenario::AbandonAuthentication => (3, 5),
            Scenario::Visa
            | Scenario::Decline
            | Scenario::AdminRefund
            | Scenario::PartialRefund
            | Scenario::ManualShipment => (180, 1800),
        }
    }

    fn payment_method(self) -> &'static str {
        match self {
            Scenario::Decline => "pm_card_chargeDeclined",
            Scenario::Authenticate | Scenario::AbandonAuthentication => {
                "pm_card_authenticationRequired"
            }
            _ => "pm_card_visa",
        }
    }
}

/// How many markers the test waits for before it looks at the checkouts: one per request for
/// points a customer's request reaches; one for points a background worker reaches (the worker
/// stops at the first) or that a request and recovery may race to (whole refunds). Every
/// partial refund is a request of its own, recorded before it reaches the point.
fn markers(point: FaultPoint, scenario: Scenario) -> usize {
    if scenario == Scenario::PartialRefund {
        return BUYERS;
    }
    match point {
        FaultPoint::AfterReserve
        | FaultPoint::AfterBeginCharge
        | FaultPoint::AfterGatewayCall
        | FaultPoint::AfterRecordSuccess
        | FaultPoint::AfterRecordDecline
        | FaultPoint::AfterRecordRequiresAction
        | FaultPoint::BeforeCaptureCall
        | FaultPoint::AfterCaptureCall
        | FaultPoint::AfterRecordCapture => BUYERS,
        FaultPoint::AfterCancelCall
        | FaultPoint::AfterRecordCancel
        | FaultPoint::BeforeRefundCall
        | FaultPoint::AfterRefundCall
        | FaultPoint::AfterRecordRefund
        | FaultPoint::AfterPublish => 1,
    }
}

/// One checkout as the database and the gateway's ledger see it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    state: String,
    refund_due: bool,
    /// Succeeded PaymentIntents: money that moved.
    charges: usize,
    refunds: usize,
    /// Cancelled PaymentIntents.
    cancellations: usize,
}

impl Seen {
    fn new(state: &str, charges: usize, refunds: usize) -> Self {
        Self {
            state: state.to_owned(),
            refund_due: false,
            charges,
            refunds,
            cancellations: 0,
        }
    }

    fn refund_due(self) -> Self {
        Self {
            refund_due: true,
            ..self
        }
    }

    fn cancelled(self) -> Self {
        Self {
            cancellations: 1,
            ..self
        }
    }
}

/// `n` checkouts seen the same way.
fn times(n: usize, seen: Seen) -> Vec<Seen> {
    vec![seen; n]
}

/// Where `point` leaves every checkout of `scenario` when the process dies.
fn at_kill(point: FaultPoint, scenario: Scenario) -> Vec<Seen> {
    let expired = |charges, refunds| Seen::new("expired", charges, refunds);
    let carol = Seen::new("completed", 1, 0);
    let mut seen = match (point, scenario) {
        (FaultPoint::AfterReserve, _) => times(BUYERS, Seen::new("reserved", 0, 0)),
        (FaultPoint::AfterBeginCharge, _) => times(BUYERS, Seen::new("charging", 0, 0)),
        (FaultPoint::AfterGatewayCall, _) => times(BUYERS, Seen::new("charging", 1, 0)),
        (FaultPoint::AfterRecordSuccess | FaultPoint::AfterPublish, _) => {
            times(BUYERS, Seen::new("completed", 1, 0))
        }
        (FaultPoint::AfterRecordDecline, _) => times(BUYERS, Seen::new("payment_failed", 0, 0)),
        (FaultPoint::AfterRecordRequiresAction, _) => {
            times(BUYERS, Seen::new("requires_action", 0, 0))
        }
        // The reconciler stops at the first checkout whose lifetime ended.
        (FaultPoint::AfterCancelCall, _) => {
            let mut seen = times(BUYERS - 1, Seen::new("requires_action", 0, 0));
            seen.push(Seen::new("requires_action", 0, 0).cancelled());
            seen
        }
        (FaultPoint::AfterRecordCancel, _) => {
            let mut seen = times(BUYERS - 1, Seen::new("requires_action", 0, 0));
            seen.push(Seen::new("cancelled", 0, 0).cancelled());
            seen
        }
        (FaultPoint::BeforeRefundCall, Scenario::LateSuccess) => {
            let mut seen = times(BUYERS, expired(1, 0).refund_due());
            seen.push(carol);
            seen
        }
        (FaultPoint::AfterRefundCall, Scenario::LateSuccess) => {
            let mut seen = times(BUYERS, expired(1, 1).refund_due());
            seen.push(carol);
            seen
        }
        (FaultPoint::AfterRecordRefund, Scenario::LateSuccess) => {
            let mut seen = times(BUYERS, Seen::new("refunded", 1, 1));
            seen.push(carol);
            seen
        }
        // A partial refund leaves the checkout completed; its own row says it is due.
        (FaultPoint::BeforeRefundCall, Scenario::PartialRefund) => {
            times(BUYERS, Seen::new("completed", 1, 0))
        }
        (FaultPoint::AfterRefundCall | FaultPoint::AfterRecordRefund, Scenario::PartialRefund) => {
            times(BUYERS, Seen::new("completed", 1, 1))
        }
        (FaultPoint::BeforeRefundCall, _) => {
            times(BUYERS, Seen::new("completed", 1, 0).refund_due())
        }
        (FaultPoint::AfterRefundCall, _) => {
            times(BUYERS, Seen::new("completed", 1, 1).refund_due())
        }
        (FaultPoint::AfterRecordRefund, _) => times(BUYERS, Seen::new("refunded", 1, 1)),
        // Authorized, not captured: the intents wait in `requires_capture`.
        (FaultPoint::BeforeCaptureCall, _) => times(BUYERS, Seen::new("completed", 0, 0)),
        (FaultPoint::AfterCaptureCall | FaultPoint::AfterRecordCapture, _) => {
            times(BUYERS, Seen::new("completed", 1, 0))
        }
    };
    seen.sort();
    seen
}

/// Where every checkout of `scenario` ends once the successor has recovered.
fn at_end(scenario: Scenario) -> Vec<Seen> {
    let mut seen = match scenario {
        Scenario::Reserve => {
            let mut seen = times(BUYERS, Seen::new("expired", 0, 0));
            seen.extend(times(BUYERS, Seen::new("completed", 1, 0)));
            seen
        }
        Scenario::Visa => times(BUYERS, Seen::new("completed", 1, 0)),
        Scenario::Decline => times(BUYERS, Seen::new("payment_failed", 0, 0)),
        Scenario::Authenticate => {
            let mut seen = times(AUTHENTICATING, Seen::new("completed", 1, 0));
            seen.extend(times(
                BUYERS - AUTHENTICATING,
                Seen::new("cancelled", 0, 0).cancelled(),
            ));
            seen
        }
        Scenario::AbandonAuthentication => times(BUYERS, Seen::new("cancelled", 0, 0).cancelled()),
        Scenario::AdminRefund => times(BUYERS, Seen::new("refunded", 1, 1)),
        Scenario::PartialRefund => times(BUYERS, Seen::new("completed", 1, 1)),
        Scenario::ManualShipment => times(BUYERS, Seen::new("completed", 1, 0)),
        Scenario::LateSuccess => {
            let mut seen = times(BUYERS, Seen::new("refunded", 1, 1));
            seen.push(Seen::new("completed", 1, 0));
            seen
        }
    };
    seen.sort();
    seen
}

async fn a_process_killed_at_a_fault_point_is_finished_by_its_successor(
    point: FaultPoint,
    scenario: Scenario,
) {
    // Arrange: a process that stops at `point`, a product and five buyers with carts.
    let mut deployment = Deployment::new(scenario.windows()).await;
    deployment.manual_capture = scenario == Scenario::ManualShipment;
    let mut first = deployment.start(Some(point)).await;
    let quantities: Vec<i64> = (0..BUYERS).map(|i| i as i64 % 3 + 1).collect();
    // A late payment is refunded only when its units are gone: another buyer takes them all.
    let stock = match scenario {
        Scenario::LateSuccess => quantities.iter().sum(),
        _ => 40,
    };
    deployment.new_product(stock).await;
    let mut buyers = Vec::with_capacity(BUYERS);
    for (i, quantity) in quantities.into_iter().enumerate() {
        buyers.push(deployment.buyer(&format!("Buyer {i}"), quantity).await);
    }

    // Act: lead every checkout to the fault point; kill the process once every checkout stands
    // where the point leaves it; start it again without one.
    let in_flight = deployment.lead_to_fault(scenario, &mut buyers).await;
    first
        .wait_for_line(
            &faults::marker(point),
            markers(point, scenario),
            REACH_WITHIN,
        )
        .await;
    let db = deployment.db().await;
    let expected = at_kill(point, scenario);
    deployment
        .wait_until_seen(&db, &expected, REACH_WITHIN, &first)
        .await;
    let status = first.kill();
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "the process died of SIGKILL"
    );
    for request in in_flight {
        // The requests fail with the connection; their answers are lost, as a client's are.
        let _ = request.await;
    }
    assert_eq!(
        deployment.seen(&db).await,
        expected,
        "at the kill, every checkout is where {} leaves it",
        point.as_str()
    );
    if point == FaultPoint::AfterPublish {
        deployment.assert_published_but_not_marked(&db).await;
    }
    if scenario == Scenario::PartialRefund {
        assert_eq!(
            deployment.partial_refunds(&db).await.len(),
            BUYERS,
            "every partial refund was recorded before the kill"
        );
    }
    let second = deployment.start(None).await;
    deployment.after_restart(scenario, &mut buyers, &db).await;

    // Assert
    let checkouts = deployment.wait_until_terminal(&db, &second).await;
    assert_eq!(
        deployment.seen(&db).await,
        at_end(scenario),
        "after recovery: terminal, one charge per paid checkout, one refund per refunded one"
    );
    let sold: i64 = checkouts
        .iter()
        .filter(|c| c.state == "completed")
        .map(|c| c.units)
        .sum();
    // A partial refund puts its one unit back, once.
    let restocked = match scenario {
        Scenario::PartialRefund => BUYERS as i64,
        _ => 0,
    };
    assert_eq!(
        deployment.inventory().await,
        (stock - sold + restocked, 0),
        "(stock, reserved): units of completed checkouts are sold, every other unit is back"
    );
    let paid: Vec<Uuid> = checkouts
        .iter()
        .filter(|c| {
            c.state == "completed" || (scenario == Scenario::AdminRefund && c.state == "refunded")
        })
        .map(|c| c.order_id)
        .collect();
    if scenario == Scenario::ManualShipment {
        // Each captured exactly its order's amount, in one capture.
        for checkout in &checkouts {
            assert_eq!(deployment.fake.captures_for(checkout.id), 1);
            assert_eq!(
                deployment.fake.captured_for(checkout.id),
                PRICE * checkout.units
            );
        }
        deployment
            .assert_one_event_per_order(&db, "order.authorized", &paid)
            .await;
        deployment
            .assert_one_event_per_order(&db, "order.shipment_captured", &paid)
            .await;
    } else {
        deployment.assert_one_event_per_paid_order(&db, &paid).await;
    }
    if scenario == Scenario::PartialRefund {
        // One refund per request, of one unit, settled once.
        assert_eq!(
            deployment.partial_refunds(&db).await,
            vec![("succeeded".to_owned(), PRICE); BUYERS]
        );
        let refunded: Vec<i64> = sqlx::query_scalar("SELECT refunded_amount FROM orders")
            .fetch_all(&db.pool)
            .await
            .expect("read the orders");
        assert_eq!(refunded, vec![PRICE; BUYERS]);
        deployment
            .assert_one_event_per_order(&db, "order.refunded", &paid)
            .await;
    }
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_at_a_random_moment_of_a_burst_leaves_every_checkout_paid_once_or_released(
) {
    // Arrange: a plain process (no fault point), reservations that expire after 5 s, sixteen
    // buyers with carts of one to three units.
    let deployment = Deployment::new((5, 1800)).await;
    let first = deployment.start(None).await;
    let stock = 100;
    deployment.new_product(stock).await;
    let (quantities, kill_after) = {
        let mut rng = rand::thread_rng();
        let quantities: Vec<i64> = (0..16).map(|_| rng.gen_range(1..=3)).collect();
        let kill_after = rng.gen_range(1..quantities.len());
        (quantities, kill_after)
    };
    let mut buyers = Vec::with_capacity(quantities.len());
    for (i, quantity) in quantities.into_iter().enumerate() {
        buyers.push(
            deployment
                .buyer(&format!("Burst buyer {i}"), quantity)
                .await,
        );
    }
    eprintln!("the process is killed once the gateway has seen {kill_after} requests");

    // Act: every buyer checks out and completes at once; the process dies once the gateway
    // has seen `kill_after` requests, whatever else is in flight.
    let burst: Vec<JoinHandle<()>> = buyers
        .iter()
        .map(|buyer| deployment.check_out_in_background(buyer))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while deployment.fake.requests() < kill_after {
        assert!(
            Instant::now() < deadline,
            "the burst never reached the gateway {kill_after} times\n{}",
            first.tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = first.kill();
    assert_eq!(status.signal(), Some(SIGKILL));
    for buyer in burst {
        let _ = buyer.await;
    }
    let db = deployment.db().await;
    let mut at_kill: HashMap<String, usize> = HashMap::new();
    for checkout in db.checkouts().await {
        *at_kill.entry(checkout.state).or_default() += 1;
    }
    eprintln!("checkouts by state at the kill: {at_kill:?}");
    let second = deployment.start(None).await;

    // Assert: every checkout that exists is terminal (recovered or expired), whatever the
    // clients heard.
    let checkouts = deployment.wait_until_terminal(&db, &second).await;
    assert!(!checkouts.is_empty(), "the burst created checkouts");
    let mut sold = 0;
    let mut paid = Vec::new();
    for checkout in &checkouts {
        let charges = deployment.fake.charges_for(checkout.id);
        match checkout.state.as_str() {
            "completed" => {
                assert_eq!(charges, 1, "checkout {} charged once", checkout.id);
                sold += checkout.units;
                paid.push(checkout.order_id);
            }
            "expired" => assert_eq!(
                charges, 0,
                "an expired checkout {} never moved money",
                checkout.id
            ),
            other => panic!("checkout {} ended {other}", checkout.id),
        }
    }
    eprintln!(
        "{} checkouts: {} completed, {} expired",
        checkouts.len(),
        paid.len(),
        checkouts.len() - paid.len()
    );
    assert_eq!(
        deployment.inventory().await,
        (stock - sold, 0),
        "(stock, reserved): units of paid checkouts sold, every other unit back"
    );
    deployment.assert_one_event_per_paid_order(&db, &paid).await;
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

/// How long a retry keeps honouring `Retry-After` before the test gives up: a key whose owner
/// died must be free again within a few seconds, not after a minute.
const TAKEN_OVER_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_retried_with_its_key_after_a_kill_after_reserving_answers_the_checkout_it_created()
{
    // Arrange: a process that stops right after the reservation commits.
    let deployment = Deployment::new((180, 1800)).await;
    let mut first = deployment.start(Some(FaultPoint::AfterReserve)).await;
    let stock = 10;
    deployment.new_product(stock).await;
    let mut buyer = deployment.buyer("Keyed starter", 2).await;
    let start = |client: &reqwest::Client| {
        client
            .post(format!("{}/v1/checkouts", deployment.base))
            .bearer_auth(&buyer.token)
            .header("Idempotency-Key", "start-after-kill")
            .json(&json!({ "cart_id": buyer.cart }))
    };

    // Act: the start reserves, the process dies before answering; the client retries its
    // start with the same key against the successor.
    let lost = {
        let request = start(&deployment.client);
        tokio::spawn(async move {
            let _ = request.send().await;
        })
    };
    first
        .wait_for_line(&faults::marker(FaultPoint::AfterReserve), 1, REACH_WITHIN)
        .await;
    assert_eq!(first.kill().signal(), Some(SIGKILL));
    let _ = lost.await;
    let db = deployment.db().await;
    let created = db.checkouts().await;
    assert_eq!(created.len(), 1, "the first start reserved one checkout");
    let second = deployment.start(None).await;
    let (status, answer) = deployment
        .retry_honouring_retry_after(|| start(&deployment.client), &second)
        .await;

    // Assert: the retry answers the checkout the first request created, not a second one and
    // not `cart_not_open`; it can be paid, and nothing else was reserved.
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    assert_eq!(answer["id"], created[0].id.to_string(), "{answer}");
    assert_eq!(answer["state"], "reserved", "{answer}");
    let (again, replayed) = deployment
        .retry_honouring_retry_after(|| start(&deployment.client), &second)
        .await;
    assert_eq!(
        (again, &replayed),
        (status, &answer),
        "a further retry replays it"
    );
    assert_eq!(db.checkouts().await.len(), 1, "no second checkout");
    buyer.checkout = Some(StartedCheckout {
        id: created[0].id,
        order_id: created[0].order_id,
    });
    let paid = deployment
        .call_with(
            complete_request(
                &deployment.client,
                &deployment.base,
                &buyer.token,
                created[0].id,
                "pm_card_visa",
            ),
            "complete",
        )
        .await;
    assert_eq!(paid["state"], "completed", "{paid}");
    assert_eq!(deployment.inventory().await, (stock - 2, 0));
    deployment
        .assert_one_event_per_paid_order(&db, &[created[0].order_id])
        .await;
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_retried_with_its_key_after_its_process_died_is_taken_over_within_seconds() {
    // Arrange: a process that stops once `charging` is recorded, before the gateway call.
    let deployment = Deployment::new((180, 1800)).await;
    let mut first = deployment.start(Some(FaultPoint::AfterBeginCharge)).await;
    let stock = 10;
    deployment.new_product(stock).await;
    let mut buyer = deployment.buyer("Keyed payer", 1).await;
    buyer.checkout = Some(deployment.start_checkout(&buyer).await);
    let id = buyer.checkout().id;

    // Act: the keyed complete dies with its process; the client retries it with the same key.
    let lost = deployment.complete_in_background(&buyer, "pm_card_visa");
    first
        .wait_for_line(
            &faults::marker(FaultPoint::AfterBeginCharge),
            1,
            REACH_WITHIN,
        )
        .await;
    assert_eq!(first.kill().signal(), Some(SIGKILL));
    let _ = lost.await;
    let second = deployment.start(None).await;
    let (status, answer) = deployment
        .retry_honouring_retry_after(
            || {
                complete_request(
                    &deployment.client,
                    &deployment.base,
                    &buyer.token,
                    id,
                    "pm_card_visa",
                )
            },
            &second,
        )
        .await;

    // Assert: the retry took the dead request's key over and answers the paid checkout,
    // charged once.
    assert_eq!(status, reqwest::StatusCode::OK, "{answer}");
    assert_eq!(answer["state"], "completed", "{answer}");
    assert_eq!(deployment.fake.charges_for(id), 1, "charged once");
    let db = deployment.db().await;
    deployment
        .assert_one_event_per_paid_order(&db, &[buyer.checkout().order_id])
        .await;
    deployment.assert_audit_clean(&db).await;
    drop(second);
    deployment.finish().await;
}

/// Rounds of the soak in CI; `HOLDFAST_SOAK_ROUNDS` runs more, `HOLDFAST_SOAK_SEED` replays one.
const SOAK_ROUNDS: u64 = 3;

/// Where a card that succeeds passes: the fault points a soak round may stop a process at.
const SOAK_POINTS: [FaultPoint; 5] = [
    FaultPoint::AfterReserve,
    FaultPoint::AfterBeginCharge,
    FaultPoint::AfterGatewayCall,
    FaultPoint::AfterRecordSuccess,
    FaultPoint::AfterPublish,
];

/// How a soak round kills its process.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Once the first checkout reaches the point.
    AtFaultPoint(FaultPoint),
    /// Once the gateway has seen this many more requests, whatever else is in flight.
    AfterGatewayRequests(usize),
}

fn env_number(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    Some(
        raw.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {raw:?}")),
    )
}

/// The randomized kill-and-audit soak: every round starts a process (armed with a random fault
/// point, or not), sends a burst of buyers at it, SIGKILLs it at that point or at a random
/// moment of the burst, starts a successor, and checks every promise over everything so far
/// (one charge per completed checkout, none for an expired one, stock adding up, one
/// `order.paid` per paid order, both audits). The seed is printed first: a failing run replays
/// with `HOLDFAST_SOAK_SEED=<seed>`, and `HOLDFAST_SOAK_ROUNDS=<n>` makes it longer
/// (docs/crash-search.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_random_kills_keeps_every_promise_after_each_restart() {
    use rand::SeedableRng as _;
    let seed = env_number("HOLDFAST_SOAK_SEED").unwrap_or_else(|| rand::thread_rng().gen());
    let rounds = env_number("HOLDFAST_SOAK_ROUNDS").unwrap_or(SOAK_ROUNDS);
    eprintln!("kill soak: seed {seed}, {rounds} rounds (replay: HOLDFAST_SOAK_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let deployment = Deployment::new((5, 1800)).await;
    let stock = 10_000;
    let mut survivor = Some(deployment.start(None).await);
    deployment.new_product(stock).await;
    let db = deployment.db().await;
    for round in 0..rounds {
        let kill = if rng.gen_bool(0.5) {
            Kill::AtFaultPoint(SOAK_POINTS[rng.gen_range(0..SOAK_POINTS.len())])
        } else {
            Kill::AfterGatewayRequests(rng.gen_range(1..=6))
        };
        let quantities: Vec<i64> = (0..rng.gen_range(4..=8))
            .map(|_| rng.gen_range(1..=3))
            .collect();
        eprintln!("round {round}: {} buyers, kill {kill:?}", quantities.len());
        // The previous round's successor dies too, idle: no checkout may be lost with it.
        if let Some(previous) = survivor.take() {
            previous.kill();
        }
        let fault = match kill {
            Kill::AtFaultPoint(point) => Some(point),
            Kill::AfterGatewayRequests(_) => None,
        };
        let mut victim = deployment.start(fault).await;
        let mut buyers = Vec::with_capacity(quantities.len());
        for (i, quantity) in quantities.into_iter().enumerate() {
            buyers.push(
                deployment
                    .buyer(&format!("Soak buyer {round}.{i}"), quantity)
                    .await,
            );
        }
        let requests_before = deployment.fake.requests();
        let burst: Vec<JoinHandle<()>> = buyers
            .iter()
            .map(|buyer| deployment.check_out_in_background(buyer))
            .collect();
        match kill {
            Kill::AtFaultPoint(point) => {
                victim
                    .wait_for_line(&faults::marker(point), 1, REACH_WITHIN)
                    .await
            }
            Kill::AfterGatewayRequests(n) => {
                let deadline = Instant::now() + REACH_WITHIN;
                // A burst that settles first is killed idle, which must be safe as well.
                while deployment.fake.requests() < requests_before + n
                    && burst.iter().any(|b| !b.is_finished())
                {
                    assert!(Instant::now() < deadline, "seed {seed}: the burst stalled");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        assert_eq!(victim.kill().signal(), Some(SIGKILL), "seed {seed}");
        for buyer in burst {
            let _ = buyer.await;
        }
        let successor = deployment.start(None).await;

        let checkouts = deployment.wait_until_terminal(&db, &successor).await;
        let mut sold = 0;
        let mut paid = Vec::new();
        for checkout in &checkouts {
            let charges = deployment.fake.charges_for(checkout.id);
            match checkout.state.as_str() {
                "completed" => {
                    assert_eq!(
                        charges, 1,
                        "seed {seed}, round {round}: {} charged once",
                        checkout.id
                    );
                    sold += checkout.units;
                    paid.push(checkout.order_id);
                }
                "expired" => assert_eq!(
                    charges, 0,
                    "seed {seed}, round {round}: expired {} moved no money",
                    checkout.id
                ),
                other => panic!(
                    "seed {seed}, round {round}: checkout {} ended {other}",
                    checkout.id
                ),
            }
        }
        assert_eq!(
            deployment.inventory().await,
            (stock - sold, 0),
            "seed {seed}, round {round}: (stock, reserved)"
        );
        deployment.assert_one_event_per_paid_order(&db, &paid).await;
        deployment.assert_audit_clean(&db).await;
        eprintln!(
            "round {round}: {} checkouts so far, {} completed, audit clean",
            checkouts.len(),
            paid.len()
        );
        survivor = Some(successor);
    }
    drop(survivor);
    deployment.finish().await;
}

/// The signal number of SIGKILL.
const SIGKILL: i32 = 9;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A buyer as the test drives it over HTTP.
struct Buyer {
    token: String,
    cart: String,
    quantity: i64,
    checkout: Option<StartedCheckout>,
    /// The `payment_intent.succeeded` event of a late payment, delivered again (signed anew)
    /// after the restart.
    late_success: Option<String>,
}

impl Buyer {
    fn checkout(&self) -> &StartedCheckout {
        self.checkout
            .as_ref()
            .expect("the buyer started a checkout")
    }
}

struct StartedCheckout {
    id: CheckoutId,
    order_id: Uuid,
}

/// What both lives of the service share: database, gateway, NATS stream, address, data
/// directory and flags.
struct Deployment {
    database_url: String,
    fake: FakeStripe,
    stream: TestStream,
    listen: String,
    base: String,
    data_dir: TempDir,
    /// `(reservation TTL, maximum lifetime)` in seconds.
    windows: (u64, u64),
    client: reqwest::Client,
    /// `--capture-method manual`.
    manual_capture: bool,
}

impl Deployment {
    async fn new(windows: (u64, u64)) -> Self {
        let port = free_port();
        Self {
            database_url: fresh_postgres_database().await,
            fake: FakeStripe::start().await,
            stream: TestStream::new(),
            listen: format!("127.0.0.1:{port}"),
            base: format!("http://127.0.0.1:{port}"),
            data_dir: TempDir::new().expect("temp dir"),
            windows,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            manual_capture: false,
        }
    }

    /// `holdfast serve` with this deployment's flags; `fault` arms a fault point.
    fn command(&self, fault: Option<FaultPoint>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOLDFAST_") {
                command.env_remove(name);
            }
        }
        command
            .arg("serve")
            .args(["--database-url", &self.database_url])
            .args(["--stripe-api-base", &self.fake.base_url()])
            .args(["--stripe-secret-key", SECRET_KEY])
            .args(["--nats-url", &nats_url()])
            .args(["--nats-stream", &self.stream.name])
            .args(["--nats-subject-prefix", &self.stream.name])
            .args(["--lease-seconds", &LEASE_SECONDS.to_string()])
            .args([
                "--reconcile-after-seconds",
                &RECONCILE_AFTER_SECONDS.to_string(),
            ])
            .args(["--relay-lease-seconds", &RELAY_LEASE_SECONDS.to_string()])
            .args(["--recovery-interval-ms", "200"])
            .args(["--expiry-interval-ms", "200"])
            .args(["--reservation-ttl-seconds", &self.windows.0.to_string()])
            .args([
                "--reservation-max-lifetime-seconds",
                &self.windows.1.to_string(),
            ])
            .args(["--stripe-webhook-secret", WEBHOOK_SECRET])
            .args(["--admin-token", ADMIN_TOKEN])
            .args(["--listen", &self.listen])
            .arg("--data-dir")
            .arg(self.data_dir.path());
        if let Some(point) = fault {
            command.env("HOLDFAST_FAULT_POINT", point.as_str());
        }
        if self.manual_capture {
            command.args(["--capture-method", "manual"]);
        }
        command
    }

    /// Starts the service and waits until it answers `/readyz`.
    async fn start(&self, fault: Option<FaultPoint>) -> Server {
        let mut server = Server::spawn(self.command(fault));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
            {
                if resp.status().is_success() {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "holdfast exited before it was ready ({status})\n{}",
                    server.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "holdfast did not become ready\n{}",
                server.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.call_with(request, &format!("{method} {path}")).await
    }

    /// Sends `request` and answers its JSON body, which must come with a 2xx.
    async fn call_with(&self, request: reqwest::RequestBuilder, what: &str) -> Value {
        let response = request.send().await.expect("the service answers");
        let status = response.status();
        let body: Value = response.json().await.expect("a JSON body");
        assert!(status.is_success(), "{what}: {status} {body}");
        body
    }

    async fn new_product(&self, stock: i64) {
        let body = json!({"sku": SKU, "name": "Crash-tested kettle",
                          "price": {"amount": PRICE, "currency": "EUR"}, "stock": stock});
        self.call(Method::POST, "/v1/admin/products", ADMIN_TOKEN, Some(body))
            .await;
    }

    /// A customer with a cart of `quantity` units of the product.
    async fn buyer(&self, name: &str, quantity: i64) -> Buyer {
        let customer = self
            .call(
                Method::POST,
                "/v1/admin/customers",
                ADMIN_TOKEN,
                Some(json!({ "name": name })),
            )
            .await;
        let token = customer["token"].as_str().expect("a token").to_owned();
        let cart = self.call(Method::POST, "/v1/carts", &token, None).await;
        let cart = cart["id"].as_str().expect("a cart id").to_owned();
        self.call(
            Method::PUT,
            &format!("/v1/carts/{cart}/lines/{SKU}"),
            &token,
            Some(json!({ "quantity": quantity })),
        )
        .await;
        Buyer {
            token,
            cart,
            quantity,
            checkout: None,
            late_success: None,
        }
    }

    async fn start_checkout(&self, buyer: &Buyer) -> StartedCheckout {
        let started = self
            .call(
                Method::POST,
                "/v1/checkouts",
                &buyer.token,
                Some(json!({ "cart_id": buyer.cart })),
            )
            .await;
        let id = started["id"].as_str().expect("a checkout id");
        let order_id = started["order_id"].as_str().expect("an order id");
        StartedCheckout {
            id: CheckoutId::parse(id).expect("a checkout id"),
            order_id: Uuid::parse_str(order_id).expect("an order id"),
        }
    }

    /// `complete` with `payment_method`, sent and left to its fate: the answer is lost with
    /// the process.
    fn complete_in_background(&self, buyer: &Buyer, payment_method: &str) -> JoinHandle<()> {
        let request = complete_request(
            &self.client,
            &self.base,
            &buyer.token,
            buyer.checkout().id,
            payment_method,
        );
        tokio::spawn(async move {
            let _ = request.send().await;
        })
    }

    /// Starts a checkout and completes it, as a browser does, ignoring what goes wrong.
    fn check_out_in_background(&self, buyer: &Buyer) -> JoinHandle<()> {
        let (client, base) = (self.client.clone(), self.base.clone());
        let (token, cart) = (buyer.token.clone(), buyer.cart.clone());
        tokio::spawn(async move {
            let started = client
                .post(format!("{base}/v1/checkouts"))
                .bearer_auth(&token)
                .json(&json!({ "cart_id": cart }))
                .send()
                .await;
            let Ok(started) = started else { return };
            let Ok(started) = started.json::<Value>().await else {
                return;
            };
            let Some(id) = started["id"]
                .as_str()
                .and_then(|id| CheckoutId::parse(id).ok())
            else {
                return;
            };
            let _ = complete_request(&client, &base, &token, id, "pm_card_visa")
                .send()
                .await;
        })
    }

    /// Starts a checkout and sends its `complete`, waiting for the answer.
    async fn check_out_now(&self, buyer: &mut Buyer, payment_method: &str) -> Value {
        buyer.checkout = Some(self.start_checkout(buyer).await);
        let id = buyer.checkout().id;
        self.call_with(
            complete_request(&self.client, &self.base, &buyer.token, id, payment_method),
            "complete",
        )
        .await
    }

    /// Sends what leads each checkout of `scenario` to the fault point; returns the requests
    /// still in flight (they hang at the point until the process dies).
    async fn lead_to_fault(&self, scenario: Scenario, buyers: &mut [Buyer]) -> Vec<JoinHandle<()>> {
        match scenario {
            Scenario::ManualShipment => {
                let mut shipments = Vec::with_capacity(buyers.len());
                for buyer in buyers.iter_mut() {
                    let authorized = self.check_out_now(buyer, "pm_card_visa").await;
                    assert_eq!(authorized["state"], "completed", "{authorized}");
                }
                for buyer in buyers.iter() {
                    let request = self
                        .client
                        .post(format!(
                            "{}/v1/admin/orders/{}/shipments",
                            self.base,
                            buyer.checkout().order_id
                        ))
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&json!({"lines": [{"sku": SKU, "quantity": buyer.quantity}]}));
                    shipments.push(tokio::spawn(async move {
                        let _ = request.send().await;
                    }));
                }
                shipments
            }
            Scenario::Reserve => buyers
                .iter()
                .map(|buyer| {
                    let request = self
                        .client
                        .post(format!("{}/v1/checkouts", self.base))
                        .bearer_auth(&buyer.token)
                        .json(&json!({ "cart_id": buyer.cart }));
                    tokio::spawn(async move {
                        let _ = request.send().await;
                    })
                })
                .collect(),
            Scenario::Visa
            | Scenario::Decline
            | Scenario::Authenticate
            | Scenario::AbandonAuthentication => {
                for buyer in buyers.iter_mut() {
                    buyer.checkout = Some(self.start_checkout(buyer).await);
                }
                buyers
                    .iter()
                    .map(|buyer| self.complete_in_background(buyer, scenario.payment_method()))
                    .collect()
            }
            Scenario::PartialRefund | Scenario::AdminRefund => {
                for buyer in buyers.iter_mut() {
                    let paid = self.check_out_now(buyer, "pm_card_visa").await;
                    assert_eq!(paid["state"], "completed", "{paid}");
                }
                // One unit of each order by line, put back in stock; or each order whole.
                let (action, body) = match scenario {
                    Scenario::PartialRefund => (
                        "refunds",
                        json!({"lines": [{"sku": SKU, "quantity": 1}], "restock": true}),
                    ),
                    _ => ("refund", json!({})),
                };
                buyers
                    .iter()
                    .map(|buyer| {
                        let order = buyer.checkout().order_id;
                        let request = self
                            .client
                            .post(format!("{}/v1/admin/orders/{order}/{action}", self.base))
                            .bearer_auth(ADMIN_TOKEN)
                            .json(&body);
                        tokio::spawn(async move {
                            let _ = request.send().await;
                        })
                    })
                    .collect()
            }
            Scenario::LateSuccess => self.pay_late_for_expired_checkouts(buyers).await,
        }
    }

    /// Every buyer's reservation expires and Carol buys every unit; then each buyer's payment
    /// succeeds at the gateway after all and its webhook is delivered.
    async fn pay_late_for_expired_checkouts(&self, buyers: &mut [Buyer]) -> Vec<JoinHandle<()>> {
        for buyer in buyers.iter_mut() {
            buyer.checkout = Some(self.start_checkout(buyer).await);
        }
        let db = self.db().await;
        let expired = times(buyers.len(), Seen::new("expired", 0, 0));
        let deadline = Instant::now() + SETTLE_WITHIN;
        while self.seen(&db).await != expired {
            assert!(Instant::now() < deadline, "the reservations never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let units = buyers.iter().map(|b| b.quantity).sum();
        let mut carol = self.buyer("Carol", units).await;
        let paid = self.check_out_now(&mut carol, "pm_card_visa").await;
        assert_eq!(paid["state"], "completed", "Carol takes every unit: {paid}");
        let gateway = self.gateway();
        for buyer in buyers.iter_mut() {
            let checkout = buyer.checkout();
            let late = gateway
                .create_and_confirm(&ChargeRequest {
                    amount: Money::new(
                        PRICE * buyer.quantity,
                        Currency::parse("EUR").expect("a currency"),
                    )
                    .expect("an amount"),
                    payment_method: "pm_card_visa".into(),
                    checkout_id: checkout.id,
                    order_id: OrderId::from_uuid(checkout.order_id),
                    customer_id: CustomerId::new(),
                    idempotency_key: format!("late-{}", checkout.id),
                    capture_method: Default::default(),
                })
                .await
                .expect("the fake charges");
            let ChargeOutcome::Succeeded(intent) = late else {
                panic!("a late success: {late:?}")
            };
            buyer.late_success = Some(
                json!({
                    "id": format!("evt_late_{}", checkout.id), "object": "event",
                    "type": "payment_intent.succeeded", "created": chrono::Utc::now().timestamp(),
                    "data": {"object": {
                        "id": intent.id, "object": "payment_intent",
                        "amount": PRICE * buyer.quantity, "currency": "eur",
                        "status": "succeeded", "client_secret": null, "created": 0,
                        "metadata": {"checkout_id": checkout.id.to_string(),
                                     "order_id": checkout.order_id.to_string()},
                        "last_payment_error": null
                    }}
                })
                .to_string(),
            );
        }
        buyers
            .iter()
            .map(|buyer| {
                let request = self.webhook(buyer.late_success.as_deref().expect("an event"));
                tokio::spawn(async move {
                    let _ = request.send().await;
                })
            })
            .collect()
    }

    /// What the customers and the gateway do once the successor runs.
    async fn after_restart(&self, scenario: Scenario, buyers: &mut [Buyer], db: &Db) {
        match scenario {
            Scenario::Reserve => {
                // The lost reservations run out and hand the carts back; each buyer checks out
                // again.
                let expired = times(buyers.len(), Seen::new("expired", 0, 0));
                let deadline = Instant::now() + SETTLE_WITHIN;
                while self.seen(db).await != expired {
                    assert!(
                        Instant::now() < deadline,
                        "the lost reservations never expired"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for buyer in buyers.iter_mut() {
                    let paid = self.check_out_now(buyer, "pm_card_visa").await;
                    assert_eq!(paid["state"], "completed", "{paid}");
                }
            }
            Scenario::Authenticate => {
                for buyer in &buyers[..AUTHENTICATING] {
                    assert_eq!(self.fake.authenticate(buyer.checkout().id), 1);
                }
            }
            Scenario::LateSuccess => {
                // Stripe delivers again what was not answered 2xx; a repeat changes nothing.
                for buyer in buyers.iter() {
                    let event = buyer.late_success.as_deref().expect("an event");
                    let response = self.webhook(event).send().await.expect("an answer");
                    assert!(
                        response.status().is_success(),
                        "a redelivered webhook is accepted: {}",
                        response.status()
                    );
                }
            }
            Scenario::PartialRefund => {
                // Recovery sends again, under their keys, the refunds the killed process left.
                let deadline = Instant::now() + SETTLE_WITHIN;
                while self
                    .partial_refunds(db)
                    .await
                    .iter()
                    .any(|(status, _)| status != "succeeded")
                {
                    assert!(
                        Instant::now() < deadline,
                        "partial refunds never settled: {:?}",
                        self.partial_refunds(db).await
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Scenario::ManualShipment => {
                // Recovery captures what the killed process left capturing.
                let deadline = Instant::now() + SETTLE_WITHIN;
                loop {
                    let open: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM orders WHERE status <> 'fulfilled'",
                    )
                    .fetch_one(&db.pool)
                    .await
                    .expect("count the orders");
                    if open == 0 {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{open} orders never fulfilled");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Scenario::Visa
            | Scenario::Decline
            | Scenario::AbandonAuthentication
            | Scenario::AdminRefund => {}
        }
    }

    /// Sends `request()` until it is answered with anything but `409 idempotency_conflict`,
    /// waiting as each conflict's `Retry-After` says (which it must carry); gives up after
    /// [`TAKEN_OVER_WITHIN`].
    async fn retry_honouring_retry_after(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
        server: &Server,
    ) -> (reqwest::StatusCode, Value) {
        let deadline = Instant::now() + TAKEN_OVER_WITHIN;
        loop {
            let response = request().send().await.expect("the service answers");
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body: Value = response.json().await.expect("a JSON body");
            if status != reqwest::StatusCode::CONFLICT
                || body["error"]["code"] != "idempotency_conflict"
            {
                return (status, body);
            }
            let seconds = retry_after.unwrap_or_else(|| {
                panic!("a 409 idempotency_conflict carries Retry-After: {body}")
            });
            assert!(
                Instant::now() < deadline,
                "the dead request's key was still locked after {TAKEN_OVER_WITHIN:?}: {body}\n{}",
                server.tail()
            );
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        }
    }

    /// A signed delivery of `payload` to the webhook endpoint.
    fn webhook(&self, payload: &str) -> reqwest::RequestBuilder {
        let now = chrono::Utc::now().timestamp();
        self.client
            .post(format!("{}/webhooks/stripe", self.base))
            .header("Content-Type", "application/json")
            .header(
                "Stripe-Signature",
                signature::sign(payload.as_bytes(), WEBHOOK_SECRET, now),
            )
            .body(payload.to_owned())
    }

    /// Every checkout as the database and the fake's ledger see it, sorted.
    async fn seen(&self, db: &Db) -> Vec<Seen> {
        let mut seen: Vec<Seen> = db
            .checkouts()
            .await
            .iter()
            .map(|c| Seen {
                state: c.state.clone(),
                refund_due: c.refund_due,
                charges: self.fake.charges_for(c.id),
                refunds: self.fake.refunds_for(c.id),
                cancellations: self.fake.cancellations_for(c.id),
            })
            .collect();
        seen.sort();
        seen
    }

    /// `(status, amount)` of every partial refund, in order.
    async fn partial_refunds(&self, db: &Db) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT status, amount FROM order_refunds ORDER BY status, amount")
            .fetch_all(&db.pool)
            .await
            .expect("read the partial refunds")
    }

    /// Waits until the checkouts are seen as `expected`.
    async fn wait_until_seen(&self, db: &Db, expected: &[Seen], within: Duration, server: &Server) {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.seen(db).await;
            if seen == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "checkouts seen as {seen:#?}\nwanted {expected:#?}\n{}",
                server.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every checkout is terminal; returns them.
    async fn wait_until_terminal(&self, db: &Db, server: &Server) -> Vec<CheckoutRow> {
        let deadline = Instant::now() + SETTLE_WITHIN;
        loop {
            let checkouts = db.checkouts().await;
            if checkouts.iter().all(|c| c.is_terminal()) {
                return checkouts;
            }
            assert!(
                Instant::now() < deadline,
                "checkouts still open after the restart: {:?}\n{}",
                checkouts
                    .iter()
                    .filter(|c| !c.is_terminal())
                    .collect::<Vec<_>>(),
                server.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The killed relay published events but marked none: the broker holds messages whose
    /// rows the successor will publish again.
    async fn assert_published_but_not_marked(&self, db: &Db) {
        let lag = db
            .store
            .outbox_lag(chrono::Utc::now())
            .await
            .expect("outbox lag");
        assert_eq!(
            lag.unpublished, BUYERS as i64,
            "no event was marked published"
        );
        let on_stream: usize = self.stream.messages_of("order.paid").await.values().sum();
        assert!(
            on_stream >= 1,
            "the relay published before it stopped: {on_stream} messages"
        );
    }

    /// A client of the fake, as the service and `holdfast audit` use it.
    fn gateway(&self) -> StripeGateway {
        StripeGateway::new(
            SecretString::from(SECRET_KEY),
            &self.fake.base_url(),
            TIMEOUTS,
        )
        .expect("a gateway for the fake")
    }

    /// `(stock, reserved)` of the product, from `GET /v1/admin/inventory`.
    async fn inventory(&self) -> (i64, i64) {
        let inventory = self
            .call(Method::GET, "/v1/admin/inventory", ADMIN_TOKEN, None)
            .await;
        let product = inventory["data"]
            .as_array()
            .and_then(|rows| rows.iter().find(|p| p["sku"] == SKU))
            .unwrap_or_else(|| panic!("{SKU} in the inventory: {inventory}"));
        let number = |field: &str| product[field].as_i64().expect("a number");
        (number("stock"), number("reserved"))
    }

    async fn db(&self) -> Db {
        let store = PgStore::connect(&self.database_url, 4)
            .await
            .expect("open the database");
        let pool = sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("connect");
        Db { store, pool }
    }

    /// Waits until the outbox has published everything, then reads the whole stream: one
    /// `order.paid` message for each paid order, none for any other.
    async fn assert_one_event_per_paid_order(&self, db: &Db, paid: &[Uuid]) {
        let deadline = Instant::now() + PUBLISH_WITHIN;
        loop {
            let lag = db
                .store
                .outbox_lag(chrono::Utc::now())
                .await
                .expect("outbox lag");
            if lag.unpublished == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} events still unpublished",
                lag.unpublished
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let per_order = self.stream.messages_of("order.paid").await;
        let expected: HashMap<String, usize> = paid.iter().map(|o| (o.to_string(), 1)).collect();
        assert_eq!(
            per_order, expected,
            "order.paid messages per order on the stream"
        );
    }

    /// Once everything is published: exactly one `topic` message per order of `orders` on the
    /// stream, none for any other order.
    async fn assert_one_event_per_order(&self, db: &Db, topic: &str, orders: &[Uuid]) {
        let deadline = Instant::now() + PUBLISH_WITHIN;
        while db
            .store
            .outbox_lag(chrono::Utc::now())
            .await
            .expect("outbox lag")
            .unpublished
            > 0
        {
            assert!(Instant::now() < deadline, "events still unpublished");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected: HashMap<String, usize> = orders.iter().map(|o| (o.to_string(), 1)).collect();
        assert_eq!(
            self.stream.messages_of(topic).await,
            expected,
            "{topic} messages per order on the stream"
        );
    }

    /// The in-process audit against the fake's ledger with no grace at all, and the
    /// `holdfast audit` command an operator runs.
    async fn assert_audit_clean(&self, db: &Db) {
        let gateway = self.gateway();
        let report = holdfast::audit::run_with(
            &db.store,
            AuditOptions {
                gateway: Some(&gateway),
                now: chrono::Utc::now(),
                grace: chrono::Duration::zero(),
            },
        )
        .await
        .expect("the audit reads the store");
        report.assert_clean();
        assert!(
            report.checks.iter().all(|c| c.skipped.is_none()),
            "every promise was checked:\n{report}"
        );

        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOLDFAST_") {
                command.env_remove(name);
            }
        }
        let output = command
            .arg("audit")
            .args(["--database-url", &self.database_url])
            .args(["--stripe-api-base", &self.fake.base_url()])
            .args(["--stripe-secret-key", SECRET_KEY])
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .output()
            .await
            .expect("run holdfast audit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "holdfast audit exits 0: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 8, "one line per promise:\n{stdout}");
        assert!(
            lines.iter().all(|l| l.starts_with("ok ")),
            "every promise checked and kept:\n{stdout}"
        );
    }

    /// Deletes the test's stream; the process must be gone by now.
    async fn finish(self) {
        self.stream.delete().await;
    }
}

fn complete_request(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    checkout: CheckoutId,
    payment_method: &str,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/checkouts/{checkout}/complete"))
        .bearer_auth(token)
        .header("Idempotency-Key", format!("complete-{checkout}"))
        .json(&json!({ "payment_method": payment_method }))
}

/// The test's own view of the database.
struct Db {
    store: PgStore,
    pool: sqlx::PgPool,
}

#[derive(Debug)]
struct CheckoutRow {
    id: CheckoutId,
    order_id: Uuid,
    state: String,
    refund_due: bool,
    units: i64,
}

impl CheckoutRow {
    /// Money still due back is work left, whatever the state says.
    fn is_terminal(&self) -> bool {
        !self.refund_due
            && !matches!(
                self.state.as_str(),
                "reserved" | "charging" | "requires_action"
            )
    }
}

impl Db {
    /// Every checkout with its state and the units of its order.
    async fn checkouts(&self) -> Vec<CheckoutRow> {
        sqlx::query(
            "SELECT c.id, c.order_id, c.state, c.refund_due, \
             (SELECT COALESCE(SUM(ol.quantity), 0) FROM order_lines ol \
              WHERE ol.order_id = c.order_id)::BIGINT AS units \
             FROM checkouts c ORDER BY c.created_at",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read the checkouts")
        .iter()
        .map(|row| CheckoutRow {
            id: CheckoutId::from_uuid(row.get("id")),
            order_id: row.get("order_id"),
            state: row.get("state"),
            refund_due: row.get("refund_due"),
            units: row.get("units"),
        })
        .collect()
    }
}

/// A NATS stream and subject prefix of this test's own, deleted at the end (or, when the test
/// failed first, when dropped).
struct TestStream {
    name: String,
    deleted: bool,
}

impl TestStream {
    fn new() -> Self {
        Self {
            name: format!("hf_test_{}", Uuid::new_v4().simple()),
            deleted: false,
        }
    }

    async fn jetstream() -> jetstream::Context {
        let client = async_nats::connect(nats_url())
            .await
            .expect("NATS must be reachable for the test suite (see README)");
        jetstream::new(client)
    }

    /// How many `order.paid` messages the stream holds per `order_id` of their payload.
    /// Messages of one topic on the stream, per order their payload names. Every message is
    /// one of the known topics.
    async fn messages_of(&self, topic: &str) -> HashMap<String, usize> {
        let js = Self::jetstream().await;
        let mut stream = js.get_stream(&self.name).await.expect("the stream exists");
        let state = stream.info().await.expect("stream info").state.clone();
        let known: Vec<String> = [
            "order.paid",
            "order.authorized",
            "order.shipment_captured",
            "order.refunded",
        ]
        .iter()
        .map(|t| format!("{}.{t}", self.name))
        .collect();
        let subject = format!("{}.{topic}", self.name);
        let mut per_order = HashMap::new();
        if state.messages == 0 {
            return per_order;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            let message = stream
                .get_raw_message(sequence)
                .await
                .expect("a stored message");
            assert!(
                known.iter().any(|k| k == message.subject.as_str()),
                "an unknown event {}",
                message.subject
            );
            if message.subject.as_str() != subject {
                continue;
            }
            let payload: Value = serde_json::from_slice(&message.payload).expect("a JSON payload");
            let order = payload["order_id"]
                .as_str()
                .expect("an order_id")
                .to_owned();
            *per_order.entry(order).or_default() += 1;
        }
        per_order
    }

    async fn delete(mut self) {
        Self::jetstream()
            .await
            .delete_stream(&self.name)
            .await
            .expect("delete the test stream");
        self.deleted = true;
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Dropped during a panic, possibly inside the test's runtime: delete from a thread
        // with a runtime of its own, best effort.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// A running `holdfast` child process. Its stderr is read line by line on a thread of its own
/// (so the pipe never fills), kept for failure messages and forwarded to the test; dropping it
/// kills and reaps the process, so none outlives its test.
struct Server {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        let echo = std::env::var_os("TEST_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("holdfast: {line}");
                }
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.clone());
                // The test may have stopped listening; the log still keeps the line.
                let _ = tx.send(line);
            }
        });
        Self { child, lines, log }
    }

    /// Waits until `count` lines equal to `wanted` have appeared on stderr.
    async fn wait_for_line(&mut self, wanted: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let mut found = 0;
        while found < count {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => found += usize::from(line == wanted),
                Ok(None) => panic!(
                    "holdfast closed stderr after {found} of {count} {wanted:?}\n{}",
                    self.tail()
                ),
                Err(_) => panic!(
                    "only {found} of {count} {wanted:?} within {within:?}\n{}",
                    self.tail()
                ),
            }
        }
    }

    /// The last lines of stderr, for failure messages.
    fn tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let from = log.len().saturating_sub(40);
        format!("--- holdfast stderr ---\n{}", log[from..].join("\n"))
    }

    /// SIGKILL, then wait for the process to be gone.
    fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("send SIGKILL");
        self.child.wait().expect("holdfast is reaped")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
