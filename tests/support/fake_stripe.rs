//! A fake Stripe HTTP API for the tests of the Stripe client (DESIGN §6).
//!
//! Promise 3 (at most one charge per checkout) is only as good as the client's handling of
//! Stripe's idempotency rules and of failures after money moved, so this server keeps those
//! rules as Stripe documents them (<https://docs.stripe.com/api/idempotent_requests>):
//! the same key with the same parameters replays the stored answer with
//! `Idempotent-Replayed: true`, the same key while the first request runs is a 409, the same
//! key with other parameters is a 400 `idempotency_error`. It shares no code with `src/`
//! (only the public domain types), so the client is tested against an independent reading of
//! Stripe, not against itself.
//!
//! Faults on demand: added latency, 500s, 429s, 401s and 400s that happen before the request
//! reaches the API (nothing stored, nothing charged), a dropped connection after the charge was
//! made, a mangled body, and a gate that holds requests in flight until the test lets them go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use holdfast::domain::CheckoutId;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The only secret key the fake accepts.
pub const SECRET_KEY: &str = "sk_test_holdfast_fake_0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 before the request reaches the API: nothing runs, nothing is stored.
    InternalError,
    /// 429 from the rate limiter: nothing runs, nothing is stored.
    TooManyRequests,
    /// 401 as for a revoked or rolled key: Stripe authenticates before it looks at the
    /// idempotency key, so nothing runs and nothing is stored or replayed.
    Unauthorized,
    /// 400 `invalid_request_error` as for a payment method detached meanwhile. Stripe stores
    /// nothing for a request refused by validation, and replays instead when the key already
    /// holds an answer; so does the fake.
    InvalidRequest,
    /// The request runs (money moves, the answer is stored under its key), then the
    /// connection is cut before the client reads an answer.
    DropAfterCharge,
    /// The request runs, but the client receives a 200 whose body is not JSON.
    MalformedBody,
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub stripe_version: Option<String>,
    pub content_type: Option<String>,
    pub replayed: bool,
}

pub struct FakeStripe {
    base_url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Shared {
    state: Mutex<Ledger>,
    /// `true` while the test holds requests at the gate.
    gate: watch::Sender<bool>,
    /// How many requests wait at the gate right now.
    waiting: watch::Sender<usize>,
}

#[derive(Default)]
struct Ledger {
    intents: Vec<Intent>,
    refunds: Vec<RefundRow>,
    /// What new refunds answer as `status`: `None` is `null`; unset is `succeeded`.
    refund_status: Option<Option<String>>,
    idempotency: HashMap<String, Slot>,
    faults: VecDeque<Fault>,
    latency: Duration,
    log: Vec<RequestRecord>,
    next_id: u64,
}

enum Slot {
    InFlight,
    Done { fingerprint: String, reply: Reply },
}

#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: Value,
}

struct Intent {
    id: String,
    amount: i64,
    currency: String,
    status: &'static str,
    payment_method: String,
    metadata: BTreeMap<String, String>,
    last_payment_error: Option<Value>,
    latest_charge: Option<String>,
    created: i64,
    /// `capture_method=manual`: confirmed intents wait in `requires_capture`.
    manual: bool,
    /// Multicapture was asked for (`request_multicapture=if_available`) and the card offers it.
    multicapture: bool,
    amount_capturable: i64,
    amount_received: i64,
    captures: u32,
    cancellation_reason: Option<&'static str>,
}

struct RefundRow {
    id: String,
    payment_intent: String,
    amount: i64,
    status: Option<String>,
}

impl RefundRow {
    /// As Stripe's refund object, with its nullable fields.
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "currency": "eur",
            "payment_intent": self.payment_intent,
            "status": self.status,
            "failure_reason": holdfast::payments::simulator::failure_reason_of(self.status.as_deref()),
            "reason": null,
            "charge": null,
            "metadata": {},
            "created": 1_700_000_000,
            "destination_details": {"type": "card", "card": {"type": "refund"}},
        })
    }
}

impl FakeStripe {
    /// Starts the server on a free local port, in the calling test's runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port is free");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let shared = Arc::new(Shared {
            state: Mutex::new(Ledger::default()),
            gate: watch::channel(false).0,
            waiting: watch::channel(0).0,
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the fake Stripe server runs until aborted");
        });
        Self {
            base_url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Delay every answer by `by` (after the request ran: the money moves, the answer is slow).
    pub fn latency(&self, by: Duration) {
        self.shared.ledger().latency = by;
    }

    /// The next `n` requests meet `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.shared.ledger().faults.extend((0..n).map(|_| fault));
    }

    /// From now on, requests that reach the API wait at a gate until `release`.
    pub fn hold(&self) {
        self.shared.gate.send_replace(true);
    }

    pub fn release(&self) {
        self.shared.gate.send_replace(false);
    }

    /// Waits until `n` requests wait at the gate, or panics after a few seconds.
    pub async fn wait_until_held(&self, n: usize) {
        let mut waiting = self.shared.waiting.subscribe();
        tokio::time::timeout(Duration::from_secs(5), waiting.wait_for(|w| *w >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} requests never reached the gate"))
            .expect("the fake outlives its test");
    }

    /// How many PaymentIntents of this checkout succeeded: money that really moved.
    pub fn charges_for(&self, checkout_id: CheckoutId) -> usize {
        let id = checkout_id.to_string();
        self.shared
            .ledger()
            .intents
            .iter()
            .filter(|i| i.status == "succeeded" && i.metadata.get("checkout_id") == Some(&id))
            .count()
    }

    /// How many refunds were made on PaymentIntents of this checkout.
    pub fn refunds_for(&self, checkout_id: CheckoutId) -> usize {
        let id = checkout_id.to_string();
        let ledger = self.shared.ledger();
        ledger
            .refunds
            .iter()
            .filter(|r| {
                ledger
                    .intents
                    .iter()
                    .any(|i| i.id == r.payment_intent && i.metadata.get("checkout_id") == Some(&id))
            })
            .count()
    }

    /// How many PaymentIntents of this checkout were cancelled.
    pub fn cancellations_for(&self, checkout_id: CheckoutId) -> usize {
        let id = checkout_id.to_string();
        self.shared
            .ledger()
            .intents
            .iter()
            .filter(|i| i.status == "canceled" && i.metadata.get("checkout_id") == Some(&id))
            .count()
    }

    /// The customer completes 3-D Secure: this checkout's PaymentIntents waiting for
    /// authentication succeed (the money moves). Returns how many did.
    pub fn authenticate(&self, checkout_id: CheckoutId) -> usize {
        let id = checkout_id.to_string();
        let mut ledger = self.shared.ledger();
        let waiting: Vec<usize> = ledger
            .intents
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.status == "requires_action" && i.metadata.get("checkout_id") == Some(&id)
            })
            .map(|(at, _)| at)
            .collect();
        for &at in &waiting {
            let charge = ledger.new_id("ch");
            let intent = &mut ledger.intents[at];
            intent.latest_charge = Some(charge);
            intent.card_said_yes();
        }
        waiting.len()
    }

    /// Stripe cancels this checkout's authorizations nobody captured in time (7 days for most
    /// cards): `canceled`, `cancellation_reason: automatic`. Returns how many lapsed.
    pub fn lapse(&self, checkout_id: CheckoutId) -> usize {
        let id = checkout_id.to_string();
        let mut ledger = self.shared.ledger();
        let mut lapsed = 0;
        for intent in &mut ledger.intents {
            if intent.status == "requires_capture"
                && intent.metadata.get("checkout_id") == Some(&id)
            {
                intent.status = "canceled";
                intent.cancellation_reason = Some("automatic");
                intent.amount_capturable = 0;
                lapsed += 1;
            }
        }
        lapsed
    }

    /// What was captured on this checkout's PaymentIntents, in all.
    pub fn captured_for(&self, checkout_id: CheckoutId) -> i64 {
        let id = checkout_id.to_string();
        self.shared
            .ledger()
            .intents
            .iter()
            .filter(|i| i.metadata.get("checkout_id") == Some(&id))
            .map(|i| i.amount_received)
            .sum()
    }

    /// How many captures were made on this checkout's PaymentIntents.
    pub fn captures_for(&self, checkout_id: CheckoutId) -> u32 {
        let id = checkout_id.to_string();
        self.shared
            .ledger()
            .intents
            .iter()
            .filter(|i| i.metadata.get("checkout_id") == Some(&id))
            .map(|i| i.captures)
            .sum()
    }

    /// All PaymentIntents ever created, whatever their status.
    pub fn intent_count(&self) -> usize {
        self.shared.ledger().intents.len()
    }

    /// The total refunded on one PaymentIntent.
    pub fn refunded(&self, payment_intent_id: &str) -> i64 {
        self.shared
            .ledger()
            .refunds
            .iter()
            .filter(|r| r.payment_intent == payment_intent_id)
            .map(|r| r.amount)
            .sum()
    }

    pub fn refund_count(&self) -> usize {
        self.shared.ledger().refunds.len()
    }

    /// New refunds answer with this `status` (`pending`, `failed`, `None` for `null`), as
    /// Stripe may, instead of `succeeded`.
    pub fn answer_refunds_with(&self, status: Option<&str>) {
        self.shared.ledger().refund_status = Some(status.map(str::to_owned));
    }

    /// Stripe settles every refund made so far to `status` (no event is sent: a lost one).
    pub fn settle_refunds(&self, status: &str) {
        for row in &mut self.shared.ledger().refunds {
            row.status = Some(status.to_owned());
        }
    }

    /// Stripe settles refund `id` to `status` (no event is sent: a lost one).
    pub fn settle_refund(&self, id: &str, status: &str) {
        for row in &mut self.shared.ledger().refunds {
            if row.id == id {
                row.status = Some(status.to_owned());
            }
        }
    }

    /// Every request received, including refused and faulted ones.
    pub fn requests(&self) -> usize {
        self.shared.ledger().log.len()
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.ledger().log.clone()
    }
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn stripe_error(status: StatusCode, error: Value) -> Reply {
    Reply {
        status,
        body: json!({ "error": error }),
    }
}

fn invalid(status: StatusCode, code: &str, message: String) -> Reply {
    stripe_error(
        status,
        json!({"type": "invalid_request_error", "code": code, "message": message}),
    )
}

fn send(reply: Reply, replayed: bool) -> Response {
    let mut response = (reply.status, axum::Json(reply.body)).into_response();
    if replayed {
        response.headers_mut().insert(
            "Idempotent-Replayed",
            "true".parse().expect("a valid header"),
        );
    }
    response
}

/// A response whose body fails before its first byte: hyper gives up on the connection, so
/// the client never reads an answer, as when a connection dies after Stripe acted.
fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "connection dropped by the fake",
        ))
    });
    Response::new(Body::from_stream(failing))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = header(&headers, "idempotency-key").filter(|_| method == Method::POST);
    let record = RequestRecord {
        method: method.to_string(),
        path: uri.path().to_owned(),
        idempotency_key: key.clone(),
        stripe_version: header(&headers, "stripe-version"),
        content_type: header(&headers, "content-type"),
        replayed: false,
    };
    let log_at = {
        let mut ledger = shared.ledger();
        ledger.log.push(record);
        ledger.log.len() - 1
    };

    let unauthorized = || {
        send(
            stripe_error(
                StatusCode::UNAUTHORIZED,
                json!({"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****"}),
            ),
            false,
        )
    };
    if header(&headers, "authorization").as_deref() != Some(&format!("Bearer {SECRET_KEY}")) {
        return unauthorized();
    }
    let fault = shared.ledger().faults.pop_front();
    match fault {
        Some(Fault::Unauthorized) => return unauthorized(),
        Some(Fault::InvalidRequest) if !holds_answer(&shared, key.as_deref()) => {
            return send(
                invalid(
                    StatusCode::BAD_REQUEST,
                    "resource_missing",
                    "No such PaymentMethod: it was detached from its customer".into(),
                ),
                false,
            )
        }
        Some(Fault::InternalError) => {
            return send(
                stripe_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"type": "api_error", "message": "An unknown error occurred"}),
                ),
                false,
            )
        }
        Some(Fault::TooManyRequests) => {
            return send(
                invalid(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit",
                    "Request rate limit exceeded.".into(),
                ),
                false,
            )
        }
        _ => {}
    }

    let raw_params = if method == Method::POST {
        String::from_utf8_lossy(&body).into_owned()
    } else {
        uri.query().unwrap_or_default().to_owned()
    };
    let Ok(params) = serde_urlencoded::from_str::<Vec<(String, String)>>(&raw_params) else {
        return send(
            invalid(
                StatusCode::BAD_REQUEST,
                "parameter_invalid",
                "Invalid form body".into(),
            ),
            false,
        );
    };

    let reply = match key {
        Some(key) => {
            let mut sorted = params.clone();
            sorted.sort();
            let fingerprint = format!("{method} {} {sorted:?}", uri.path());
            match begin(&shared, &key, &fingerprint) {
                Begin::Replay(reply) => {
                    shared.ledger().log[log_at].replayed = true;
                    return deliver(reply, true, fault);
                }
                Begin::Refuse(reply) => return send(reply, false),
                Begin::Run => {}
            }
            run_detached(
                shared.clone(),
                method,
                uri.path().to_owned(),
                params,
                Some((key, fingerprint)),
            )
            .await
        }
        None => run_detached(shared.clone(), method, uri.path().to_owned(), params, None).await,
    };
    deliver(reply, false, fault)
}

fn deliver(reply: Reply, replayed: bool, fault: Option<Fault>) -> Response {
    match fault {
        Some(Fault::DropAfterCharge) => dropped_connection(),
        Some(Fault::MalformedBody) => (StatusCode::OK, "{\"id\": \"pi_").into_response(),
        _ => send(reply, replayed),
    }
}

/// Whether an answer is stored under this idempotency key (a replay would send it).
fn holds_answer(shared: &Shared, key: Option<&str>) -> bool {
    key.is_some_and(|key| {
        matches!(
            shared.ledger().idempotency.get(key),
            Some(Slot::Done { .. })
        )
    })
}

enum Begin {
    Run,
    Replay(Reply),
    Refuse(Reply),
}

fn begin(shared: &Shared, key: &str, fingerprint: &str) -> Begin {
    let mut ledger = shared.ledger();
    match ledger.idempotency.get(key) {
        Some(Slot::InFlight) => Begin::Refuse(stripe_error(
            StatusCode::CONFLICT,
            json!({
                "type": "idempotency_error",
                "message": format!("There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): {key}. Please try again later."),
            }),
        )),
        Some(Slot::Done {
            fingerprint: first, ..
        }) if first != fingerprint => Begin::Refuse(stripe_error(
            StatusCode::BAD_REQUEST,
            json!({
                "type": "idempotency_error",
                "message": format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."),
            }),
        )),
        Some(Slot::Done { reply, .. }) => Begin::Replay(reply.clone()),
        None => {
            ledger.idempotency.insert(key.to_owned(), Slot::InFlight);
            Begin::Run
        }
    }
}

/// Runs the request on its own task, so it finishes (and its answer is stored) even when the
/// client hangs up, as a real server would.
async fn run_detached(
    shared: Arc<Shared>,
    method: Method,
    path: String,
    params: Vec<(String, String)>,
    idempotency: Option<(String, String)>,
) -> Reply {
    let task = tokio::spawn(async move {
        wait_at_gate(&shared).await;
        let (reply, remember) = {
            let mut ledger = shared.ledger();
            route(&mut ledger, &method, &path, &params)
        };
        let latency = shared.ledger().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some((key, fingerprint)) = idempotency {
            let mut ledger = shared.ledger();
            if remember {
                ledger.idempotency.insert(
                    key,
                    Slot::Done {
                        fingerprint,
                        reply: reply.clone(),
                    },
                );
            } else {
                // Stripe stores nothing for a request refused before it ran.
                ledger.idempotency.remove(&key);
            }
        }
        reply
    });
    task.await.unwrap_or_else(|e| {
        stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"type": "api_error", "message": format!("fake crashed: {e}")}),
        )
    })
}

async fn wait_at_gate(shared: &Shared) {
    let mut gate = shared.gate.subscribe();
    if !*gate.borrow_and_update() {
        return;
    }
    shared.waiting.send_modify(|n| *n += 1);
    // An error means the fake is gone; either way the request proceeds.
    let _ = gate.wait_for(|held| !*held).await;
    shared.waiting.send_modify(|n| *n -= 1);
}

/// Returns the reply and whether Stripe would store it under the idempotency key (it does
/// not for requests refused before they ran).
fn route(
    ledger: &mut Ledger,
    method: &Method,
    path: &str,
    params: &[(String, String)],
) -> (Reply, bool) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "payment_intents"]) => ledger.create_intent(params),
        (&Method::GET, ["v1", "payment_intents", "search"]) => (ledger.search(params), true),
        (&Method::GET, ["v1", "payment_intents", id]) => (ledger.retrieve(id), true),
        (&Method::POST, ["v1", "payment_intents", id, "cancel"]) => ledger.cancel(id),
        (&Method::POST, ["v1", "payment_intents", id, "capture"]) => ledger.capture(id, params),
        (&Method::POST, ["v1", "refunds"]) => ledger.refund(params),
        (&Method::GET, ["v1", "refunds", id]) => (ledger.retrieve_refund(id), true),
        _ => (
            invalid(
                StatusCode::NOT_FOUND,
                "resource_missing",
                format!("Unrecognized request URL ({method}: {path})."),
            ),
            false,
        ),
    }
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Ledger {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_fake{:016}", self.next_id)
    }

    fn create_intent(&mut self, params: &[(String, String)]) -> (Reply, bool) {
        let refuse = |code: &str, message: &str| {
            (
                invalid(StatusCode::BAD_REQUEST, code, message.to_owned()),
                false,
            )
        };
        let Some(amount) = param(params, "amount").and_then(|a| a.parse::<i64>().ok()) else {
            return refuse("parameter_invalid_integer", "Invalid integer: amount");
        };
        let currency = param(params, "currency").unwrap_or_default();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return refuse("parameter_invalid", "Invalid currency");
        }
        // Stripe's minimum charge (EUR 0.50, ...): 400 amount_too_small, nothing created.
        let minimum = holdfast::payments::minimum_charge(currency).unwrap_or(1);
        if amount < minimum {
            return refuse(
                "amount_too_small",
                &format!("Amount must be at least {minimum} {currency} minor units"),
            );
        }
        if param(params, "confirm") != Some("true") {
            return refuse(
                "parameter_missing",
                "This fake only creates PaymentIntents with confirm=true.",
            );
        }
        let redirects_ruled_out = param(params, "automatic_payment_methods[allow_redirects]")
            == Some("never")
            || param(params, "payment_method_types[]").is_some()
            || param(params, "payment_method_types[0]").is_some();
        if param(params, "return_url").is_none() && !redirects_ruled_out {
            return refuse(
                "parameter_missing",
                "A `return_url` must be specified because this Payment Intent is configured to automatically accept the payment methods enabled in the Dashboard, some of which may require a full page redirect to succeed. If you do not want to accept redirect-based payment methods, set `automatic_payment_methods[enabled]` to `true` and `automatic_payment_methods[allow_redirects]` to `never`.",
            );
        }
        let payment_method = param(params, "payment_method").unwrap_or_default();
        let outcome = match payment_method {
            "pm_card_visa" | "pm_card_mastercard" | "pm_card_amex" | "pm_card_discover"
            | "pm_card_jcb" => Ok("succeeded"),
            "pm_card_authenticationRequired" => Ok("requires_action"),
            "pm_card_chargeDeclined" => Err(("generic_decline", "Your card was declined.")),
            "pm_card_chargeDeclinedInsufficientFunds" => {
                Err(("insufficient_funds", "Your card has insufficient funds."))
            }
            other => {
                return refuse(
                    "resource_missing",
                    &format!("No such PaymentMethod: '{other}'"),
                )
            }
        };
        let metadata = params
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((key.to_owned(), v.clone()))
            })
            .collect();
        let manual = match param(params, "capture_method") {
            None | Some("automatic" | "automatic_async") => false,
            Some("manual") => true,
            Some(other) => {
                return refuse(
                    "parameter_invalid",
                    &format!("Invalid capture_method: {other}"),
                )
            }
        };
        // Multicapture: online Visa / Mastercard payments, asked for at creation.
        let multicapture = manual
            && param(params, "payment_method_options[card][request_multicapture]")
                == Some("if_available")
            && holdfast::payments::simulator::offers_multicapture(payment_method);
        let id = self.new_id("pi");
        let mut intent = Intent {
            id,
            amount,
            currency: currency.to_owned(),
            status: "requires_confirmation",
            payment_method: payment_method.to_owned(),
            metadata,
            last_payment_error: None,
            latest_charge: None,
            created: 1_700_000_000 + i64::try_from(self.next_id).unwrap_or_default(),
            manual,
            multicapture,
            amount_capturable: 0,
            amount_received: 0,
            captures: 0,
            cancellation_reason: None,
        };
        let reply = match outcome {
            Ok(status) => {
                if status == "succeeded" {
                    intent.latest_charge = Some(self.new_id("ch"));
                    intent.card_said_yes();
                } else {
                    intent.status = status;
                }
                Reply {
                    status: StatusCode::OK,
                    body: intent.to_json(),
                }
            }
            Err((decline_code, message)) => {
                let error = json!({
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": decline_code,
                    "message": message,
                    "charge": self.new_id("ch"),
                });
                intent.status = "requires_payment_method";
                intent.last_payment_error = Some(error.clone());
                let mut error = error;
                error["payment_intent"] = intent.to_json();
                stripe_error(StatusCode::PAYMENT_REQUIRED, error)
            }
        };
        self.intents.push(intent);
        (reply, true)
    }

    fn find(&mut self, id: &str) -> Result<&mut Intent, Reply> {
        self.intents.iter_mut().find(|i| i.id == id).ok_or_else(|| {
            invalid(
                StatusCode::NOT_FOUND,
                "resource_missing",
                format!("No such payment_intent: '{id}'"),
            )
        })
    }

    fn retrieve(&mut self, id: &str) -> Reply {
        match self.find(id) {
            Ok(intent) => Reply {
                status: StatusCode::OK,
                body: intent.to_json(),
            },
            Err(reply) => reply,
        }
    }

    fn cancel(&mut self, id: &str) -> (Reply, bool) {
        let intent = match self.find(id) {
            Ok(intent) => intent,
            Err(reply) => return (reply, false),
        };
        if matches!(intent.status, "succeeded" | "canceled") {
            let message = format!(
                "You cannot cancel this PaymentIntent because it has a status of {}.",
                intent.status
            );
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "payment_intent_unexpected_state",
                    message,
                ),
                true,
            );
        }
        intent.status = "canceled";
        intent.cancellation_reason = Some("requested_by_customer");
        // Cancelling an authorization releases what was still held.
        intent.amount_capturable = 0;
        (
            Reply {
                status: StatusCode::OK,
                body: intent.to_json(),
            },
            true,
        )
    }

    /// `POST /v1/payment_intents/{id}/capture` (<https://docs.stripe.com/api/payment_intents/capture>):
    /// only `requires_capture`; `amount_to_capture` defaults to everything capturable and may
    /// not exceed it; `final_capture=false` needs multicapture and keeps the rest capturable,
    /// at most 50 captures; a final capture releases the rest and the intent `succeeded`.
    fn capture(&mut self, id: &str, params: &[(String, String)]) -> (Reply, bool) {
        let intent = match self.find(id) {
            Ok(intent) => intent,
            Err(reply) => return (reply, false),
        };
        if intent.status != "requires_capture" {
            let message = format!(
                "This PaymentIntent could not be captured because it has a status of {}. Only a PaymentIntent with one of the following statuses may be captured: requires_capture.",
                intent.status
            );
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "payment_intent_unexpected_state",
                    message,
                ),
                true,
            );
        }
        let amount = match param(params, "amount_to_capture").map(str::parse::<i64>) {
            None => intent.amount_capturable,
            Some(Ok(amount)) if amount >= 1 => amount,
            Some(_) => {
                return (
                    invalid(
                        StatusCode::BAD_REQUEST,
                        "parameter_invalid_integer",
                        "Invalid integer: amount_to_capture".into(),
                    ),
                    false,
                )
            }
        };
        if amount > intent.amount_capturable {
            let message = format!(
                "The amount to capture ({amount}) is greater than the amount capturable ({}).",
                intent.amount_capturable
            );
            return (
                invalid(StatusCode::BAD_REQUEST, "amount_too_large", message),
                false,
            );
        }
        let final_capture = match param(params, "final_capture") {
            None | Some("true") => true,
            Some("false") => false,
            Some(_) => {
                return (
                    invalid(
                        StatusCode::BAD_REQUEST,
                        "parameter_invalid_boolean",
                        "Invalid boolean: final_capture".into(),
                    ),
                    false,
                )
            }
        };
        if !final_capture && (!intent.multicapture || intent.captures + 1 >= 50) {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "payment_intent_multicapture_not_available",
                    "Multicapture is not available for this PaymentIntent.".into(),
                ),
                false,
            );
        }
        intent.captures += 1;
        intent.amount_received += amount;
        intent.amount_capturable -= amount;
        if final_capture || intent.amount_capturable == 0 {
            intent.amount_capturable = 0;
            intent.status = "succeeded";
        }
        (
            Reply {
                status: StatusCode::OK,
                body: intent.to_json(),
            },
            true,
        )
    }

    fn retrieve_refund(&self, id: &str) -> Reply {
        match self.refunds.iter().find(|r| r.id == id) {
            Some(row) => Reply {
                status: StatusCode::OK,
                body: row.to_json(),
            },
            None => invalid(
                StatusCode::NOT_FOUND,
                "resource_missing",
                format!("No such refund: '{id}'"),
            ),
        }
    }

    fn refund(&mut self, params: &[(String, String)]) -> (Reply, bool) {
        let Some(pi) = param(params, "payment_intent") else {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "parameter_missing",
                    "Missing required param: payment_intent.".into(),
                ),
                false,
            );
        };
        let (amount_charged, status) = match self.find(pi) {
            Ok(intent) => (intent.amount_received, intent.status),
            Err(reply) => return (reply, false),
        };
        // Refunds take back captured money only; a multicaptured intent has some before its
        // final capture.
        if status != "succeeded" && amount_charged == 0 {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "payment_intent_unexpected_state",
                    format!(
                        "This PaymentIntent ({pi}) does not have a successful charge to refund."
                    ),
                ),
                true,
            );
        }
        let already: i64 = self
            .refunds
            .iter()
            .filter(|r| r.payment_intent == pi)
            .filter(|r| !matches!(r.status.as_deref(), Some("failed" | "canceled")))
            .map(|r| r.amount)
            .sum();
        let remaining = amount_charged - already;
        let amount = match param(params, "amount").map(str::parse::<i64>) {
            None => remaining,
            Some(Ok(amount)) => amount,
            Some(Err(_)) => {
                return (
                    invalid(
                        StatusCode::BAD_REQUEST,
                        "parameter_invalid_integer",
                        "Invalid integer: amount".into(),
                    ),
                    false,
                )
            }
        };
        if remaining == 0 {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "charge_already_refunded",
                    format!("Charge for {pi} has already been refunded."),
                ),
                true,
            );
        }
        if amount < 1 {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "amount_too_small",
                    "Refund amount must be positive.".into(),
                ),
                false,
            );
        }
        if amount > remaining {
            return (
                invalid(
                    StatusCode::BAD_REQUEST,
                    "amount_too_large",
                    format!("Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})."),
                ),
                true,
            );
        }
        let id = self.new_id("re");
        let status = self
            .refund_status
            .clone()
            .unwrap_or_else(|| Some("succeeded".to_owned()));
        self.refunds.push(RefundRow {
            id: id.clone(),
            payment_intent: pi.to_owned(),
            amount,
            status,
        });
        let row = self.refunds.last().expect("just pushed");
        (
            Reply {
                status: StatusCode::OK,
                body: row.to_json(),
            },
            true,
        )
    }

    /// Understands only the query the client sends: `metadata['checkout_id']:'<id>'`.
    fn search(&self, params: &[(String, String)]) -> Reply {
        let query = param(params, "query").unwrap_or_default();
        let Some(wanted) = query
            .strip_prefix("metadata['checkout_id']:'")
            .and_then(|rest| rest.strip_suffix('\''))
        else {
            return invalid(
                StatusCode::BAD_REQUEST,
                "parameter_invalid",
                format!("The fake cannot search for {query:?}"),
            );
        };
        let data: Vec<Value> = self
            .intents
            .iter()
            .filter(|i| i.metadata.get("checkout_id").map(String::as_str) == Some(wanted))
            .map(Intent::to_json)
            .collect();
        Reply {
            status: StatusCode::OK,
            body: json!({
                "object": "search_result",
                "url": "/v1/payment_intents/search",
                "has_more": false,
                "next_page": null,
                "data": data,
            }),
        }
    }
}

impl Intent {
    /// The card accepted the payment: captured at once, or authorized under manual capture.
    fn card_said_yes(&mut self) {
        if self.manual {
            self.status = "requires_capture";
            self.amount_capturable = self.amount;
        } else {
            self.status = "succeeded";
            self.amount_received = self.amount;
        }
    }

    /// The PaymentIntent as Stripe serialises it, extra fields included, so the client is
    /// tested against the real shape and not only the fields it reads.
    fn to_json(&self) -> Value {
        let next_action = (self.status == "requires_action").then(|| {
            json!({"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}})
        });
        json!({
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_received": self.amount_received,
            "automatic_payment_methods": {"allow_redirects": "never", "enabled": true},
            "canceled_at": null,
            "cancellation_reason": self.cancellation_reason,
            "capture_method": if self.manual { "manual" } else { "automatic_async" },
            "client_secret": format!("{}_secret_fake", self.id),
            "confirmation_method": "automatic",
            "created": self.created,
            "currency": self.currency,
            "last_payment_error": self.last_payment_error,
            "latest_charge": self.latest_charge,
            "livemode": false,
            "metadata": self.metadata,
            "next_action": next_action,
            "payment_method": self.payment_method,
            "payment_method_options": {"card": {"request_multicapture": if self.multicapture { "if_available" } else { "never" }}},
            "payment_method_types": ["card"],
            "status": self.status,
        })
    }
}
