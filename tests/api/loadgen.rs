//! `holdfast loadgen` run in process against the real app on both stores: a flash sale sells
//! exactly its units and refuses nobody while units remain, a steady mix of carts sells
//! without errors, and both runs end with a clean audit (promises 1 and 2 under load).

use std::time::Duration;

use holdfast::loadgen::{
    self, AuditTarget, FlashSaleConfig, RunOptions, SteadyConfig, Summary, Target, UsersConfig,
};
use holdfast::store::StoreKind;
use secrecy::SecretString;

use crate::both_stores;
use crate::helpers::{spawn_app, TestApp, ADMIN_TOKEN};

both_stores!(
    a_flash_sale_sells_exactly_its_units_and_refuses_the_rest,
    a_steady_mix_of_carts_sells_without_errors_or_false_refusals,
    without_the_gate_a_flash_sale_still_sells_exactly_its_units,
    shoppers_on_connections_of_their_own_browse_reserve_and_pay,
);

fn options(app: &TestApp, concurrency: usize) -> RunOptions {
    RunOptions {
        target: Target::parse(&app.base).expect("the test app listens on loopback"),
        admin_token: SecretString::from(ADMIN_TOKEN.to_owned()),
        concurrency,
        seed: 42,
        progress: false,
        audit: Some(AuditTarget {
            store: app.store.clone(),
            gateway: Some(app.gateway.clone()),
        }),
    }
}

#[track_caller]
fn assert_kept_the_promises(summary: &Summary) {
    assert_eq!(
        (
            summary.errors,
            summary.outcome("http_5xx"),
            summary.outcome("transport")
        ),
        (0, 0, 0),
        "errors in the run:\n{summary}"
    );
    assert_eq!(summary.oversold, 0, "oversold:\n{summary}");
    assert_eq!(
        summary.refused_with_stock, 0,
        "refused while stock remained:\n{summary}"
    );
    assert_eq!(
        summary.sold, summary.sold_by_service,
        "buyers and the service disagree on what was sold:\n{summary}"
    );
    assert!(summary.audit.is_clean(), "the audit:\n{summary}");
    assert!(!summary.failed());
}

async fn a_flash_sale_sells_exactly_its_units_and_refuses_the_rest(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let config = FlashSaleConfig {
        buyers: 300,
        units: 20,
        abandon_rate: 0.0,
        decline_rate: 0.1,
        gate: true,
        max_per_buyer: 2,
    };

    let summary = loadgen::run_flash_sale(&options(&app, 16), &config)
        .await
        .expect("the load run completes");

    assert_kept_the_promises(&summary);
    assert_eq!((summary.attempts, summary.units), (300, 20));
    assert_eq!(summary.sold, 20, "every unit sold:\n{summary}");
    assert_eq!(summary.reserved_at_end, 0);
    assert_eq!(summary.outcome("completed"), 20);
    assert_eq!(summary.refused, 280, "everyone else refused:\n{summary}");
    // Through the admission gate, refused buyers hear "sold out" before reaching the
    // database, and no token holder is ever short of stock.
    assert_eq!(summary.admission_gate, Some(true), "{summary}");
    assert_eq!(summary.max_per_buyer, Some(2), "{summary}");
    assert!(
        summary.to_string().contains("per-buyer limit     2 units"),
        "{summary}"
    );
    assert_eq!(summary.outcome("sold_out"), 280, "{summary}");
    assert_eq!(summary.outcome("insufficient_stock"), 0, "{summary}");
    assert!(summary.latency.contains_key("token_sold_out"));
    assert!(summary.notes.is_empty(), "{summary}");
    for call in ["token", "checkout", "complete"] {
        assert!(summary.latency.contains_key(call), "no {call} latency");
    }
    // The server says how often its store was used; the sale's 20 journeys needed it.
    assert!(
        summary.store_connections.is_some_and(|n| n >= 20),
        "{summary}"
    );
    app.stop().await;
}

async fn without_the_gate_a_flash_sale_still_sells_exactly_its_units(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let config = FlashSaleConfig {
        buyers: 200,
        units: 20,
        abandon_rate: 0.0,
        decline_rate: 0.0,
        gate: false,
        max_per_buyer: 1,
    };

    let summary = loadgen::run_flash_sale(&options(&app, 16), &config)
        .await
        .expect("the load run completes");

    assert_kept_the_promises(&summary);
    assert_eq!(summary.admission_gate, Some(false), "{summary}");
    assert_eq!(summary.max_per_buyer, None, "no sale, no limit: {summary}");
    assert_eq!(summary.sold, 20, "{summary}");
    // Every buyer reached the database: the refusals are the guarded reservation's.
    assert_eq!(summary.outcome("insufficient_stock"), 180, "{summary}");
    assert_eq!(summary.outcome("sold_out"), 0, "{summary}");
    assert!(
        summary.store_connections.is_some_and(|n| n >= 200),
        "{summary}"
    );
    app.stop().await;
}

async fn a_steady_mix_of_carts_sells_without_errors_or_false_refusals(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let config = SteadyConfig {
        skus: 20,
        units_per_sku: 100,
        duration: Duration::from_secs(3),
        decline_rate: 0.1,
        abandon_rate: 0.2,
    };

    let summary = loadgen::run_steady(&options(&app, 8), &config)
        .await
        .expect("the load run completes");

    assert_kept_the_promises(&summary);
    assert_eq!(summary.units, 2000);
    assert!(summary.attempts > 0 && summary.sold > 0, "{summary}");
    assert!(summary.outcome("completed") > 0, "{summary}");
    assert!(summary.wall_seconds >= 3.0);
    app.stop().await;
}

async fn shoppers_on_connections_of_their_own_browse_reserve_and_pay(kind: StoreKind) {
    // Arrange: on PostgreSQL two instances on one database, shoppers spread round-robin.
    let app = spawn_app(kind).await;
    let sibling = match kind {
        StoreKind::Postgres => Some(app.spawn_sibling().await),
        StoreKind::Sqlite => None,
    };
    let mut targets = vec![Target::parse(&app.base).expect("loopback")];
    if let Some(sibling) = &sibling {
        targets.push(Target::parse(&sibling.base).expect("loopback"));
    }
    let config = UsersConfig {
        shoppers: 40,
        duration: Duration::from_secs(2),
        skus: 10,
        max_stock: 5,
        abandon_rate: 0.3,
        think: (Duration::from_millis(5), Duration::from_millis(30)),
        targets,
        server_pids: vec![std::process::id()],
    };

    // Act
    let summary = loadgen::run_users(&options(&app, 8), &config)
        .await
        .expect("the load run completes");

    // Assert
    assert_kept_the_promises(&summary);
    let users = summary.users.as_ref().expect("the users figures");
    assert_eq!(users.connections_peak, 40, "{summary}");
    assert_eq!(users.connections_open_at_end, 40, "{summary}");
    assert!(
        users
            .statuses
            .keys()
            .all(|s| s.len() == 3 && !s.starts_with('5')),
        "{summary}"
    );
    for kind in [
        "list",
        "product",
        "cart",
        "cart_line",
        "checkout",
        "heartbeat",
    ] {
        assert!(
            summary.latency.contains_key(kind),
            "no {kind} calls:\n{summary}"
        );
    }
    assert!(summary.outcome("completed") > 0, "{summary}");
    assert!(users.server_peak_rss_mb[&std::process::id()] > 0.0);
    if let Some(sibling) = sibling {
        sibling.stop().await;
    }
    app.stop().await;
}
