//! The audit must be able to fail: promise 3 (at most one charge per checkout) is checked
//! against the gateway's ledger, so a second successful charge made behind the saga's back,
//! with another idempotency key, is reported.

use holdfast::domain::{CheckoutId, Currency, CustomerId, Money, OrderId};
use holdfast::payments::{ChargeOutcome, ChargeRequest};
use holdfast::store::StoreKind;

use crate::both_stores;
use crate::helpers::{spawn_app, AssertClean};

both_stores!(a_second_charge_for_one_checkout_fails_the_audit);

async fn a_second_charge_for_one_checkout_fails_the_audit(kind: StoreKind) {
    // Arrange: a checkout paid once, as the saga does it.
    let app = spawn_app(kind).await;
    app.new_product("tea-01", 450, 5).await;
    let (ada, checkout, order) = app.reserved_checkout("Ada", &[("tea-01", 1)]).await;
    let paid = app
        .complete(&ada, &checkout, "pm_card_visa", "pay-once")
        .await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    app.audit().await.assert_clean();

    // Act: the same checkout charged again with a key of nobody's making.
    let rogue = ChargeRequest {
        amount: Money::new(450, Currency::parse("EUR").expect("EUR")).expect("an amount"),
        payment_method: "pm_card_visa".into(),
        checkout_id: CheckoutId::parse(&checkout).expect("a checkout id"),
        order_id: OrderId::parse(&order).expect("an order id"),
        customer_id: CustomerId::new(),
        idempotency_key: format!("rogue-{checkout}"),
        capture_method: Default::default(),
    };
    let outcome = app
        .gateway
        .create_and_confirm(&rogue)
        .await
        .expect("the gateway charges");
    assert!(
        matches!(outcome, ChargeOutcome::Succeeded(_)),
        "{outcome:?}"
    );

    // Assert
    let report = app.audit().await;
    assert!(
        !report.is_clean(),
        "the audit missed a second charge:\n{report}"
    );
    let violations: Vec<&String> = report.violations().collect();
    assert!(
        violations
            .iter()
            .any(|v| v.contains(&checkout) && v.contains("2 successful charges")),
        "{violations:?}"
    );
}
