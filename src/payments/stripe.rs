//! The Stripe HTTP API behind `PaymentGateway`, for the production shape (DESIGN §1, §6).
//!
//! Promise 3 (at most one charge per checkout) is kept here by sending the caller's
//! `Idempotency-Key` on every POST and by mapping every answer whose outcome we cannot know
//! (timeout, dropped connection, 429, 5xx, an unreadable body) to `GatewayError::Unknown`, so
//! the saga retries with the same key and Stripe answers with the original result instead of
//! charging again.
//!
//! This is a small hand-written reqwest client rather than one of the Stripe crates: those
//! generate the whole API and are slow and heavy to build, while we use five endpoints and need
//! exactly three things they make awkward: a configurable base URL (the fake Stripe server in
//! the tests, a proxy in production), an idempotency key on every call that can move money,
//! and an error mapping that distinguishes "declined" from "money may have moved".
//!
//! Stripe reference: <https://docs.stripe.com/api/payment_intents>,
//! <https://docs.stripe.com/api/idempotent_requests>, <https://docs.stripe.com/error-handling>.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{RequestBuilder, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{
    CaptureRequest, ChargeOutcome, ChargeRequest, Decline, GatewayError, PaymentGateway,
    PaymentIntent, Refund, RefundRequest, METADATA_CHECKOUT_ID,
};
use crate::domain::{CaptureMethod, CheckoutId};

/// The API version every request is pinned to, so a change of the account's default version
/// on Stripe's dashboard cannot change the shapes we parse.
pub const STRIPE_VERSION: &str = "2024-06-20";

pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// Search returns at most 100 intents a page; a checkout has a handful, so this bound only
/// stops a misbehaving server from keeping us paging forever.
const MAX_SEARCH_PAGES: usize = 20;

/// How long to wait for Stripe. A request that runs out of time is `Unknown`, not failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// The whole request, from sending to the last byte of the answer.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeConfigError {
    #[error("the Stripe API base must be an http(s) URL, got {0:?}")]
    BadApiBase(String),
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

pub struct StripeGateway {
    http: reqwest::Client,
    secret_key: SecretString,
    /// Without a trailing slash, e.g. `https://api.stripe.com`.
    api_base: String,
}

/// Written by hand so the secret key can never reach a log line through `{:?}`.
impl fmt::Debug for StripeGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeGateway")
            .field("api_base", &self.api_base)
            .field("secret_key", &"[redacted]")
            .finish()
    }
}

impl StripeGateway {
    pub fn new(
        secret_key: SecretString,
        api_base: &str,
        timeouts: Timeouts,
    ) -> Result<Self, StripeConfigError> {
        let parsed = reqwest::Url::parse(api_base)
            .map_err(|_| StripeConfigError::BadApiBase(api_base.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
            return Err(StripeConfigError::BadApiBase(api_base.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .user_agent(concat!("holdfast/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StripeConfigError::Client(e.to_string()))?;
        Ok(Self {
            http,
            secret_key,
            api_base: api_base.trim_end_matches('/').to_owned(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api_base))
            .bearer_auth(self.secret_key.expose_secret())
            .header("Stripe-Version", STRIPE_VERSION)
    }

    /// A form-encoded POST carrying the idempotency key, as Stripe expects every mutation.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<T, Failure> {
        let body = serde_urlencoded::to_string(form).expect("string pairs always form-encode");
        let request = self
            .request(reqwest::Method::POST, path)
            .header("Idempotency-Key", idempotency_key)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        self.execute(request).await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, Failure> {
        let request = self.request(reqwest::Method::GET, path).query(query);
        self.execute(request).await
    }

    async fn execute<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, Failure> {
        // Any transport failure may have happened after Stripe acted on the request.
        let response = request.send().await.map_err(transport_failure)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport_failure)?;
        tracing::debug!(status = status.as_u16(), "stripe answered");
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                Failure::Gateway(GatewayError::Unknown(format!(
                    "unreadable {status} answer from Stripe: {e}"
                )))
            });
        }
        Err(classify_error(status, &body))
    }
}

/// The ways a Stripe call can fail. A decline is kept apart because only a charge turns it
/// into an outcome; for any other call it is just a refused request.
#[derive(Debug)]
enum Failure {
    Declined {
        payment_intent_id: Option<String>,
        decline: Decline,
    },
    Gateway(GatewayError),
}

impl From<Failure> for GatewayError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Declined { decline, .. } => GatewayError::InvalidRequest {
                code: decline.code,
                message: decline.message,
            },
            Failure::Gateway(e) => e,
        }
    }
}

fn transport_failure(e: reqwest::Error) -> Failure {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "connection failed"
    };
    // The chain names the URL and the cause (e.g. "connection closed before message
    // completed") but never the headers, so no key leaks through it.
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure::Gateway(GatewayError::Unknown(format!("{what}: {chain}")))
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: StripeErrorBody,
}

/// <https://docs.stripe.com/api/errors>
#[derive(Deserialize)]
struct StripeErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    /// On a card error, the PaymentIntent that was created and failed.
    #[serde(default)]
    payment_intent: Option<IdOnly>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// Maps a non-2xx answer to what it means for the money. The order matters: status codes
/// whose meaning does not depend on the body come first, so a proxy's HTML error page for a
/// 502 is still `Unknown`.
fn classify_error(status: StatusCode, body: &[u8]) -> Failure {
    let parsed = serde_json::from_slice::<ErrorEnvelope>(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|p| p.error.message.clone())
        .unwrap_or_else(|| excerpt(body));
    match status.as_u16() {
        401 => return Failure::Gateway(GatewayError::Authentication(message)),
        409 => return Failure::Gateway(GatewayError::IdempotencyConflict),
        // Stripe's rate limiter and server errors: the request may or may not have run.
        429 | 500..=599 => {
            return Failure::Gateway(GatewayError::Unknown(format!(
                "Stripe answered {status}: {message}"
            )))
        }
        _ => {}
    }
    let Some(ErrorEnvelope { error }) = parsed else {
        // A 402 we cannot read might still be about a charge that moved nothing, but without
        // the body we cannot tell the saga which intent it was; let it ask again.
        return Failure::Gateway(if status.is_client_error() && status.as_u16() != 402 {
            GatewayError::InvalidRequest {
                code: format!("http_{}", status.as_u16()),
                message,
            }
        } else {
            GatewayError::Unknown(format!("Stripe answered {status}: {message}"))
        });
    };
    if status == StatusCode::PAYMENT_REQUIRED || error.kind == "card_error" {
        return Failure::Declined {
            payment_intent_id: error.payment_intent.map(|pi| pi.id),
            decline: Decline {
                code: error.code.unwrap_or_else(|| error.kind.clone()),
                decline_code: error.decline_code,
                message,
            },
        };
    }
    if error.kind == "idempotency_error" {
        return Failure::Gateway(GatewayError::IdempotencyKeyReused(message));
    }
    if !status.is_client_error() {
        return Failure::Gateway(GatewayError::Unknown(format!(
            "unexpected {status} from Stripe: {message}"
        )));
    }
    Failure::Gateway(GatewayError::InvalidRequest {
        code: error.code.unwrap_or(error.kind),
        message,
    })
}

/// Enough of an unreadable body to recognise it in a log, never all of it.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// Ids go into URL paths; Stripe's are `[A-Za-z0-9_]`, anything else is refused before it can
/// change the path.
fn path_id(id: &str) -> Result<&str, GatewayError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(id)
    } else {
        Err(GatewayError::InvalidRequest {
            code: "resource_missing".into(),
            message: format!("{id:?} is not a Stripe id"),
        })
    }
}

fn charge_form(req: &ChargeRequest) -> Vec<(String, String)> {
    let mut form = vec![
        ("amount".to_owned(), req.amount.amount().to_string()),
        ("currency".to_owned(), req.amount.currency().to_lowercase()),
        ("payment_method".to_owned(), req.payment_method.clone()),
        ("confirm".to_owned(), "true".to_owned()),
        // Confirming on creation without a `return_url` is only accepted when redirect-based
        // methods are ruled out; cards authenticate in place with the client secret.
        (
            "automatic_payment_methods[enabled]".to_owned(),
            "true".to_owned(),
        ),
        (
            "automatic_payment_methods[allow_redirects]".to_owned(),
            "never".to_owned(),
        ),
    ];
    if req.capture_method == CaptureMethod::Manual {
        // Authorize only; multicapture, where the card offers it, lets every shipment capture
        // its own part (https://docs.stripe.com/payments/multicapture).
        form.push(("capture_method".to_owned(), "manual".to_owned()));
        form.push((
            "payment_method_options[card][request_multicapture]".to_owned(),
            "if_available".to_owned(),
        ));
    }
    form.extend(
        req.metadata()
            .into_iter()
            .map(|(key, value)| (format!("metadata[{key}]"), value)),
    );
    form
}

/// `POST /v1/payment_intents/{id}/capture`: `amount_to_capture`, and `final_capture=false`
/// when more captures are to follow.
fn capture_form(req: &CaptureRequest) -> Vec<(String, String)> {
    let mut form = vec![(
        "amount_to_capture".to_owned(),
        req.amount_to_capture.to_string(),
    )];
    if !req.final_capture {
        form.push(("final_capture".to_owned(), "false".to_owned()));
    }
    form
}

#[derive(Deserialize)]
struct SearchPage {
    data: Vec<PaymentIntent>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    next_page: Option<String>,
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    fn name(&self) -> &'static str {
        "stripe"
    }

    #[tracing::instrument(skip_all, fields(
        gateway = "stripe",
        checkout_id = %req.checkout_id,
        idempotency_key = %req.idempotency_key,
        amount = req.amount.amount(),
    ))]
    async fn create_and_confirm(&self, req: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        let answer = self
            .post::<PaymentIntent>(
                "/v1/payment_intents",
                &charge_form(req),
                &req.idempotency_key,
            )
            .await;
        let outcome = match answer {
            Ok(intent) => ChargeOutcome::from_confirmed_intent(intent),
            Err(Failure::Declined {
                payment_intent_id,
                decline,
            }) => Ok(ChargeOutcome::Declined {
                payment_intent_id,
                decline,
            }),
            Err(Failure::Gateway(e)) => Err(e),
        };
        match &outcome {
            Ok(o) => {
                tracing::info!(payment_intent_id = ?o.payment_intent_id(), outcome = outcome_name(o), "charge answered")
            }
            Err(e) => tracing::warn!(error = %e, "charge failed"),
        }
        outcome
    }

    #[tracing::instrument(skip_all, fields(gateway = "stripe", payment_intent_id = %payment_intent_id))]
    async fn retrieve(&self, payment_intent_id: &str) -> Result<PaymentIntent, GatewayError> {
        let path = format!("/v1/payment_intents/{}", path_id(payment_intent_id)?);
        Ok(self.get(&path, &[]).await?)
    }

    #[tracing::instrument(skip_all, fields(
        gateway = "stripe",
        payment_intent_id = %req.payment_intent_id,
        idempotency_key = %req.idempotency_key,
        amount_to_capture = req.amount_to_capture,
    ))]
    async fn capture(&self, req: &CaptureRequest) -> Result<PaymentIntent, GatewayError> {
        let path = format!(
            "/v1/payment_intents/{}/capture",
            path_id(&req.payment_intent_id)?
        );
        Ok(self
            .post(&path, &capture_form(req), &req.idempotency_key)
            .await?)
    }

    #[tracing::instrument(skip_all, fields(gateway = "stripe", refund_id = %refund_id))]
    async fn retrieve_refund(&self, refund_id: &str) -> Result<Refund, GatewayError> {
        let path = format!("/v1/refunds/{}", path_id(refund_id)?);
        Ok(self.get(&path, &[]).await?)
    }

    #[tracing::instrument(skip_all, fields(
        gateway = "stripe",
        payment_intent_id = %payment_intent_id,
        idempotency_key = %idempotency_key,
    ))]
    async fn cancel(
        &self,
        payment_intent_id: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, GatewayError> {
        let path = format!("/v1/payment_intents/{}/cancel", path_id(payment_intent_id)?);
        Ok(self.post(&path, &[], idempotency_key).await?)
    }

    #[tracing::instrument(skip_all, fields(
        gateway = "stripe",
        payment_intent_id = %req.payment_intent_id,
        idempotency_key = %req.idempotency_key,
        amount = ?req.amount,
    ))]
    async fn refund(&self, req: &RefundRequest) -> Result<Refund, GatewayError> {
        let mut form = vec![(
            "payment_intent".to_owned(),
            path_id(&req.payment_intent_id)?.to_owned(),
        )];
        if let Some(amount) = req.amount {
            form.push(("amount".to_owned(), amount.to_string()));
        }
        Ok(self
            .post("/v1/refunds", &form, &req.idempotency_key)
            .await?)
    }

    /// Uses Stripe's search, which is eventually consistent (usually under a minute behind):
    /// fit for the audit and the reconciler, which look at checkouts older than that, not for
    /// read-after-write.
    #[tracing::instrument(skip_all, fields(gateway = "stripe", checkout_id = %checkout_id))]
    async fn intents_for_checkout(
        &self,
        checkout_id: CheckoutId,
    ) -> Result<Vec<PaymentIntent>, GatewayError> {
        // A CheckoutId prints as a UUID, so it cannot break out of the quoted query value.
        let query = format!("metadata['{METADATA_CHECKOUT_ID}']:'{checkout_id}'");
        let mut intents = Vec::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_SEARCH_PAGES {
            let mut params = vec![("query", query.as_str()), ("limit", "100")];
            if let Some(cursor) = page.as_deref() {
                params.push(("page", cursor));
            }
            let result: SearchPage = self.get("/v1/payment_intents/search", &params).await?;
            intents.extend(result.data);
            match result.next_page {
                Some(next) if result.has_more => page = Some(next),
                _ => return Ok(intents),
            }
        }
        Err(GatewayError::Unknown(format!(
            "search for checkout {checkout_id} did not end after {MAX_SEARCH_PAGES} pages"
        )))
    }
}

fn outcome_name(outcome: &ChargeOutcome) -> &'static str {
    match outcome {
        ChargeOutcome::Succeeded(_) => "succeeded",
        ChargeOutcome::Authorized(_) => "authorized",
        ChargeOutcome::RequiresAction(_) => "requires_action",
        ChargeOutcome::Declined { .. } => "declined",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, body: &str) -> GatewayError {
        match classify_error(StatusCode::from_u16(status).unwrap(), body.as_bytes()) {
            Failure::Gateway(e) => e,
            Failure::Declined { decline, .. } => panic!("unexpected decline {decline:?}"),
        }
    }

    #[test]
    fn a_card_error_is_a_decline_with_its_intent() {
        let body = r#"{"error":{"type":"card_error","code":"card_declined","decline_code":"generic_decline",
            "message":"Your card was declined.","payment_intent":{"id":"pi_9","object":"payment_intent"}}}"#;
        let Failure::Declined {
            payment_intent_id,
            decline,
        } = classify_error(StatusCode::PAYMENT_REQUIRED, body.as_bytes())
        else {
            panic!("expected a decline");
        };
        assert_eq!(payment_intent_id.as_deref(), Some("pi_9"));
        assert_eq!(decline.code, "card_declined");
        assert_eq!(decline.decline_code.as_deref(), Some("generic_decline"));
        assert_eq!(decline.message, "Your card was declined.");
    }

    #[test]
    fn server_errors_and_rate_limits_are_unknown_whatever_the_body() {
        for status in [429, 500, 502, 503, 504] {
            for body in [
                "<html>bad gateway</html>",
                r#"{"error":{"type":"api_error"}}"#,
            ] {
                assert!(
                    matches!(failure(status, body), GatewayError::Unknown(_)),
                    "{status} {body}"
                );
            }
        }
    }

    #[test]
    fn idempotency_errors_are_told_apart_by_status() {
        let body = r#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters"}}"#;
        assert_eq!(failure(409, body), GatewayError::IdempotencyConflict);
        assert!(matches!(
            failure(400, body),
            GatewayError::IdempotencyKeyReused(m) if m.contains("same parameters")
        ));
    }

    #[test]
    fn an_unreadable_402_is_unknown_not_a_decline() {
        assert!(matches!(failure(402, "<html>"), GatewayError::Unknown(_)));
    }

    #[test]
    fn other_client_errors_are_invalid_requests() {
        let body = r#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such PaymentMethod: 'pm_x'"}}"#;
        assert_eq!(
            failure(400, body),
            GatewayError::InvalidRequest {
                code: "resource_missing".into(),
                message: "No such PaymentMethod: 'pm_x'".into()
            }
        );
        assert!(matches!(
            failure(404, "not found"),
            GatewayError::InvalidRequest { code, .. } if code == "http_404"
        ));
        assert!(matches!(
            failure(401, "{}"),
            GatewayError::Authentication(_)
        ));
    }

    #[test]
    fn an_id_that_could_change_the_path_is_refused() {
        for bad in ["", "pi_1/cancel", "../v1/refunds", "pi 1", "pi_1?x=1"] {
            assert!(path_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            path_id("pi_3MtwBwLkdIwHu7ix28a3tqPa"),
            Ok("pi_3MtwBwLkdIwHu7ix28a3tqPa")
        );
    }

    #[test]
    fn the_debug_output_never_shows_the_secret_key() {
        let gateway = StripeGateway::new(
            SecretString::from("sk_test_very_secret"),
            "http://127.0.0.1:1",
            Timeouts::default(),
        )
        .unwrap();
        let shown = format!("{gateway:?}");
        assert!(!shown.contains("sk_test_very_secret"), "{shown}");
        assert!(shown.contains("127.0.0.1"));
    }

    #[test]
    fn a_base_url_must_be_http() {
        for bad in ["", "api.stripe.com", "ftp://api.stripe.com", "mailto:x@y"] {
            assert!(
                StripeGateway::new(SecretString::from("sk"), bad, Timeouts::default()).is_err(),
                "{bad}"
            );
        }
    }
}
