//! `/metrics` speaks the Prometheus text format (every line is checked by a strict parser
//! below) and its counters follow what the service does: a checkout paid through the saga
//! moves the checkout, saga, gateway, webhook and request series. The recorder is
//! process-wide and tests run side by side, so movements are asserted as "at least".

use std::collections::BTreeMap;

use holdfast::store::StoreKind;

use crate::both_stores;
use crate::helpers::{eventually, spawn_app, spawn_app_with, Options, TestApp};

both_stores!(
    a_paid_checkout_moves_the_counters,
    a_refusal_and_an_expiry_move_their_counters,
);

/// One sample: metric name and its labels in order of appearance.
type Series = (String, Vec<(String, String)>);

/// Parses the text exposition format 0.0.4 strictly: `# HELP name text`, `# TYPE name kind`,
/// blank lines, and samples `name{label="value",...} number [timestamp]`. Anything else fails.
fn parse_exposition(text: &str) -> BTreeMap<Series, f64> {
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    assert!(is_metric_name(words.next().unwrap_or("")), "{at}");
                }
                Some("TYPE") => {
                    assert!(is_metric_name(words.next().unwrap_or("")), "{at}");
                    let kind = words.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{at}: type {kind}"
                    );
                }
                _ => panic!("{at}: a comment must be HELP or TYPE"),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("{at}: no value"));
        let name = &line[..name_end];
        assert!(is_metric_name(name), "{at}: metric name");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(inner, &at);
            labels = parsed;
            rest = after;
        }
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("{at}: a space before the value"))
            .split(' ');
        let value = fields.next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("{at}: value {v:?}")),
        };
        if let Some(ts) = fields.next() {
            assert!(ts.parse::<i64>().is_ok(), "{at}: timestamp");
        }
        assert!(fields.next().is_none(), "{at}: trailing fields");
        samples.insert((name.to_owned(), labels), value);
    }
    samples
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `a="x",b="y\"z"}` → labels and what follows the closing brace.
fn parse_labels<'a>(mut text: &'a str, at: &str) -> (Vec<(String, String)>, &'a str) {
    let mut labels = Vec::new();
    loop {
        if let Some(after) = text.strip_prefix('}') {
            return (labels, after);
        }
        let eq = text
            .find('=')
            .unwrap_or_else(|| panic!("{at}: label without '='"));
        let name = &text[..eq];
        assert!(
            is_metric_name(name) && !name.contains(':'),
            "{at}: label name {name:?}"
        );
        let mut chars = text[eq + 1..].char_indices();
        assert_eq!(
            chars.next().map(|c| c.1),
            Some('"'),
            "{at}: label value quote"
        );
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("{at}: escape {other:?}"),
                },
                Some((i, '"')) => break eq + 1 + i + 1,
                Some((_, c)) => value.push(c),
                None => panic!("{at}: unterminated label value"),
            }
        };
        labels.push((name.to_owned(), value));
        text = &text[end..];
        if let Some(after) = text.strip_prefix(',') {
            text = after;
        }
    }
}

#[test]
fn the_exposition_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                a_total{x=\"1\",y=\"q\\\"uote\"} 3\nb +Inf\n\nc_bucket{le=\"0.5\"} 2 1700000000\n";

    let samples = parse_exposition(text);

    let key = (
        "a_total".to_owned(),
        vec![("x".into(), "1".into()), ("y".into(), "q\"uote".into())],
    );
    assert_eq!(samples[&key], 3.0);
    assert_eq!(samples[&("b".to_owned(), vec![])], f64::INFINITY);
    assert_eq!(samples.len(), 3);
}

#[test]
#[should_panic(expected = "label value quote")]
fn the_exposition_parser_refuses_an_unquoted_label() {
    parse_exposition("a{x=1} 2\n");
}

async fn scrape(app: &TestApp) -> BTreeMap<Series, f64> {
    let resp = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse_exposition(&resp.text().await.expect("a body"))
}

/// The value of the first series named `name` whose labels include all of `with`.
fn value(samples: &BTreeMap<Series, f64>, name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((n, labels), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| *v)
        .sum()
}

async fn a_paid_checkout_moves_the_counters(kind: StoreKind) {
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let before = scrape(&app).await;
    assert!(
        before.contains_key(&("holdfast_outbox_unpublished".to_owned(), vec![]))
            && before.contains_key(&(
                "holdfast_outbox_oldest_unpublished_age_seconds".to_owned(),
                vec![]
            )),
        "the outbox gauges are always there"
    );

    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;
    let done = app.complete(&ada, &checkout, "pm_card_visa", "key-1").await;
    assert_eq!(done.body["state"], "completed");
    eventually(10, "the simulator's webhook is handled", || async {
        let now = scrape(&app).await;
        value(
            &now,
            "holdfast_webhook_events_total",
            &[("type", "payment_intent.succeeded")],
        ) > value(
            &before,
            "holdfast_webhook_events_total",
            &[("type", "payment_intent.succeeded")],
        )
    })
    .await;

    let after = scrape(&app).await;
    let moved =
        |name: &str, with: &[(&str, &str)]| value(&after, name, with) - value(&before, name, with);
    assert!(moved("holdfast_checkouts_total", &[("outcome", "reserved")]) >= 1.0);
    assert!(moved("holdfast_store_connections_total", &[]) >= 1.0);
    assert!(moved("holdfast_checkouts_total", &[("outcome", "completed")]) >= 1.0);
    assert!(moved("holdfast_gateway_calls_total", &[("outcome", "succeeded")]) >= 1.0);
    for step in ["reserve", "charge", "record"] {
        assert!(
            moved("holdfast_saga_step_seconds_count", &[("step", step)]) >= 1.0,
            "saga step {step}"
        );
    }
    let complete_route = [
        ("route", "/v1/checkouts/{id}/complete"),
        ("method", "POST"),
        ("status", "200"),
    ];
    assert!(moved("holdfast_http_requests_total", &complete_route) >= 1.0);
    // Ids never become labels: the route label is the template.
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("a body");
    assert!(!text.contains(&checkout) && !text.contains(&order));
}

async fn a_refusal_and_an_expiry_move_their_counters(kind: StoreKind) {
    let app = spawn_app_with(
        kind,
        Options {
            ttl_seconds: 1,
            ..Options::default()
        },
    )
    .await;
    app.new_product("one-01", 450, 1).await;
    let before = scrape(&app).await;

    let (_, _, _) = app.reserved_checkout("Ada", &[("one-01", 1)]).await;
    let (bob, cart) = app.buyer_with("Bob", &[("one-01", 1)]).await;
    app.start_checkout(&bob, &cart)
        .await
        .assert_error(409, "insufficient_stock");
    eventually(10, "the reservation expires and is released", || async {
        app.stock_of("one-01").await == (1, 0, 1)
    })
    .await;

    let after = scrape(&app).await;
    let moved =
        |name: &str, with: &[(&str, &str)]| value(&after, name, with) - value(&before, name, with);
    assert!(moved("holdfast_reservation_refusals_total", &[]) >= 1.0);
    assert!(
        moved(
            "holdfast_checkouts_total",
            &[("outcome", "insufficient_stock")]
        ) >= 1.0
    );
    assert!(moved("holdfast_expiry_released_total", &[]) >= 1.0);
    assert!(moved("holdfast_checkouts_total", &[("outcome", "expired")]) >= 1.0);
}
