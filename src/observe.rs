//! What the service counts, for Prometheus (`GET /metrics`, DESIGN §9). Every metric name and
//! label set is written down here once; call sites make one-line calls (`observe::checkout`)
//! so the saga, the webhook handler and the workers do not each know the exposition details.
//!
//! The recorder is process-wide (the `metrics` facade has one global recorder): in production
//! one process is one instance, so that is exactly what a scrape should see. Labels are taken
//! from closed sets (enums, the router's matched path), never from ids, so the number of
//! series stays bounded whatever the traffic.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const HTTP_REQUESTS: &str = "holdfast_http_requests_total";
const CHECKOUTS: &str = "holdfast_checkouts_total";
const REFUSALS: &str = "holdfast_reservation_refusals_total";
const SAGA_STEP: &str = "holdfast_saga_step_seconds";
const GATEWAY_CALLS: &str = "holdfast_gateway_calls_total";
const WEBHOOK_EVENTS: &str = "holdfast_webhook_events_total";
const OUTBOX_UNPUBLISHED: &str = "holdfast_outbox_unpublished";
const OUTBOX_OLDEST_AGE: &str = "holdfast_outbox_oldest_unpublished_age_seconds";

const EXPIRY_RELEASED: &str = "holdfast_expiry_released_total";
const RESERVATION_BATCH: &str = "holdfast_reservation_batch_size";

/// Group reservation batches hold 1 to `--group-max-batch` (at most 1000) checkouts.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

/// Saga steps are database phases (milliseconds) or a gateway call (up to the client's
/// timeout), so the buckets span both.
const SAGA_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder once per process and returns the handle that renders it. Safe to
/// call from every `router()` (tests build several apps in one process).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(SAGA_STEP.to_owned()), SAGA_BUCKETS)
            // The only error is an empty bucket list, and the list above is not empty.
            .expect("saga buckets are not empty")
            .set_buckets_for_metric(Matcher::Full(RESERVATION_BATCH.to_owned()), BATCH_BUCKETS)
            .expect("batch buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will stay empty");
        }
        describe();
        register_known_series();
        handle
    })
}

/// The exposition text of everything recorded so far.
pub fn render() -> String {
    install().render()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by matched route, method and status."
    );
    describe_counter!(CHECKOUTS, "Checkout outcomes: reserved, insufficient_stock, completed, payment_failed, requires_action, expired, cancelled.");
    describe_counter!(
        REFUSALS,
        "Checkouts refused for stock (promise 2: only when stock really was short)."
    );
    describe_histogram!(
        SAGA_STEP,
        metrics::Unit::Seconds,
        "Duration of a saga step: reserve, charge, record."
    );
    describe_counter!(
        GATEWAY_CALLS,
        "Charge calls to the payment gateway, by outcome."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Stripe webhook events received, by event type and result."
    );
    describe_gauge!(
        OUTBOX_UNPUBLISHED,
        "Fulfilment events written but not yet published (read at scrape time)."
    );
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest fulfilment event not yet published; 0 when all are (the outbox lag)."
    );
    describe_histogram!(
        RESERVATION_BATCH,
        "Checkouts reserved together in one transaction (group reservation)."
    );
    describe_counter!(
        EXPIRY_RELEASED,
        "Checkouts whose reservation expired and whose units were released."
    );
}

/// Series with a closed label set start at zero, so a dashboard sees them (and a rate of 0)
/// before the first event rather than a gap.
fn register_known_series() {
    for outcome in CheckoutOutcome::ALL {
        counter!(CHECKOUTS, "outcome" => outcome.as_str()).increment(0);
    }
    counter!(REFUSALS).increment(0);
    counter!(EXPIRY_RELEASED).increment(0);
    gauge!(OUTBOX_UNPUBLISHED).set(0.0);
    gauge!(OUTBOX_OLDEST_AGE).set(0.0);
}

/// Where a checkout went (the `outcome` label of `holdfast_checkouts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutOutcome {
    Reserved,
    InsufficientStock,
    Completed,
    PaymentFailed,
    RequiresAction,
    Expired,
    Cancelled,
}

impl CheckoutOutcome {
    pub const ALL: [CheckoutOutcome; 7] = [
        CheckoutOutcome::Reserved,
        CheckoutOutcome::InsufficientStock,
        CheckoutOutcome::Completed,
        CheckoutOutcome::PaymentFailed,
        CheckoutOutcome::RequiresAction,
        CheckoutOutcome::Expired,
        CheckoutOutcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutOutcome::Reserved => "reserved",
            CheckoutOutcome::InsufficientStock => "insufficient_stock",
            CheckoutOutcome::Completed => "completed",
            CheckoutOutcome::PaymentFailed => "payment_failed",
            CheckoutOutcome::RequiresAction => "requires_action",
            CheckoutOutcome::Expired => "expired",
            CheckoutOutcome::Cancelled => "cancelled",
        }
    }
}

pub fn checkout(outcome: CheckoutOutcome) {
    counter!(CHECKOUTS, "outcome" => outcome.as_str()).increment(1);
    if outcome == CheckoutOutcome::InsufficientStock {
        counter!(REFUSALS).increment(1);
    }
}

/// A step of the saga (the `step` label of `holdfast_saga_step_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaStep {
    /// Reserve every line and create the order.
    Reserve,
    /// One gateway call (a retry with the same key is another call).
    Charge,
    /// Record the gateway's answer.
    Record,
}

impl SagaStep {
    fn as_str(self) -> &'static str {
        match self {
            SagaStep::Reserve => "reserve",
            SagaStep::Charge => "charge",
            SagaStep::Record => "record",
        }
    }
}

pub fn saga_step(step: SagaStep, took: Duration) {
    histogram!(SAGA_STEP, "step" => step.as_str()).record(took.as_secs_f64());
}

/// Times `work` as one saga step. The step is recorded whether it succeeded or not: a slow
/// failure is as interesting as a slow success.
pub async fn timed<T>(step: SagaStep, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = work.await;
    saga_step(step, started.elapsed());
    out
}

/// One answer (or failure) of a charge call: `succeeded`, `requires_action`, `declined`,
/// `unknown`, `invalid_request`, ... (the caller names it from the gateway's closed set).
pub fn gateway_call(outcome: &'static str) {
    counter!(GATEWAY_CALLS, "outcome" => outcome).increment(1);
}

/// A webhook delivery: its event type (Stripe's names, limited to the ones we act on so a
/// sender cannot grow the label set) and what we did with it.
pub fn webhook_event(event_type: &str, result: &'static str) {
    let event_type = match event_type {
        "payment_intent.succeeded"
        | "payment_intent.payment_failed"
        | "payment_intent.canceled"
        | "payment_intent.requires_action"
        | "payment_intent.created"
        | "payment_intent.processing"
        | "charge.refunded" => event_type.to_owned(),
        _ => "other".to_owned(),
    };
    counter!(WEBHOOK_EVENTS, "type" => event_type, "result" => result).increment(1);
}

/// One group reservation batch and how many checkouts it carried.
pub fn reservation_batch(size: usize) {
    histogram!(RESERVATION_BATCH).record(size as f64);
}

/// The exposition lines of the store's own count of connections taken. Written by hand beside
/// the recorder's output rather than through it: the count belongs to the store the scraped
/// router serves, and the recorder is process-wide (tests run many apps in one process).
pub fn store_connections(count: u64) -> String {
    format!(
        "# HELP holdfast_store_connections_total Connections the store took from its pool: one \
         per transaction or statement.\n\
         # TYPE holdfast_store_connections_total counter\n\
         holdfast_store_connections_total {count}\n"
    )
}

/// The outbox lag as read at scrape time.
pub fn outbox_lag(unpublished: i64, oldest_age: Option<chrono::Duration>) {
    gauge!(OUTBOX_UNPUBLISHED).set(unpublished as f64);
    let age = oldest_age.map_or(0.0, |age| age.num_milliseconds().max(0) as f64 / 1000.0);
    gauge!(OUTBOX_OLDEST_AGE).set(age);
}

pub fn expiry_released(checkouts: usize) {
    if checkouts > 0 {
        counter!(EXPIRY_RELEASED).increment(checkouts as u64);
        counter!(CHECKOUTS, "outcome" => CheckoutOutcome::Expired.as_str())
            .increment(checkouts as u64);
    }
}

/// One answered HTTP request. `route` is the router's matched template (`/v1/orders/{id}`),
/// or `unmatched` for the fallback, so ids never become labels.
pub fn http_request(route: &str, method: &str, status: u16) {
    counter!(
        HTTP_REQUESTS,
        "route" => route.to_owned(),
        "method" => method.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
}
