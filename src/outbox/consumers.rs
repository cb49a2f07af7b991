//! The two consumers of `order.paid` that ship with the product: the warehouse allocates the
//! order's lines, the notification tells the customer. Delivery is at least once, so each
//! records its effect keyed by the event id and a repeat changes nothing (promise 5). Both
//! the in-process sink and the NATS consumers call them, so the embedded and the production
//! shape deduplicate the same way.

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{Clock, Currency, Money};
use crate::store::{Store, StoreError};

use super::OrderPaid;

#[async_trait]
pub trait Consumer: Send + Sync {
    /// A stable name: the durable consumer's name on NATS, and a log field.
    fn name(&self) -> &'static str;

    /// Records the event's effect; `Ok(false)` when this event was already handled.
    async fn handle(&self, event: &OrderPaid) -> Result<bool, StoreError>;
}

/// Allocates a paid order's lines in the warehouse.
pub struct Warehouse {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Warehouse {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }
}

#[async_trait]
impl Consumer for Warehouse {
    fn name(&self) -> &'static str {
        "warehouse"
    }

    #[tracing::instrument(skip_all, fields(event_id = %event.event_id, order_id = %event.order_id))]
    async fn handle(&self, event: &OrderPaid) -> Result<bool, StoreError> {
        let lines = serde_json::to_string(&event.lines)
            .expect("order lines have only string keys and plain values");
        self.store
            .record_allocation(event.event_id, event.order_id, &lines, self.clock.now())
            .await
    }
}

/// Tells the customer their order is paid.
pub struct Notification {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Notification {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }
}

#[async_trait]
impl Consumer for Notification {
    fn name(&self) -> &'static str {
        "notification"
    }

    #[tracing::instrument(skip_all, fields(event_id = %event.event_id, order_id = %event.order_id))]
    async fn handle(&self, event: &OrderPaid) -> Result<bool, StoreError> {
        self.store
            .record_notification(
                event.event_id,
                event.customer_id,
                event.order_id,
                &paid_message(event),
                self.clock.now(),
            )
            .await
    }
}

/// "Your order <id> is paid: 2 items, 9.00 EUR".
pub fn paid_message(event: &OrderPaid) -> String {
    let items: u64 = event
        .lines
        .iter()
        .map(|l| u64::from(l.quantity.get()))
        .sum();
    let noun = if items == 1 { "item" } else { "items" };
    format!(
        "Your order {} is paid: {items} {noun}, {}",
        event.order_id,
        format_money(event.total)
    )
}

/// Minor units shown in major units with integer arithmetic only (promise 6: no floating
/// point near money).
pub fn format_money(money: Money) -> String {
    let currency = money.currency();
    let exponent = minor_unit_exponent(currency);
    if exponent == 0 {
        return format!("{} {currency}", money.amount());
    }
    let per_major = 10_i64.pow(exponent);
    format!(
        "{}.{:0width$} {currency}",
        money.amount() / per_major,
        money.amount() % per_major,
        width = exponent as usize
    )
}

/// Decimal places of a currency's minor unit (ISO 4217). Most have two; these are the ones
/// Stripe lists as zero-decimal, and the three-decimal dinars.
fn minor_unit_exponent(currency: Currency) -> u32 {
    const ZERO: [&str; 16] = [
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
        "XAF", "XOF", "XPF",
    ];
    const THREE: [&str; 5] = ["BHD", "JOD", "KWD", "OMR", "TND"];
    if ZERO.contains(&currency.as_str()) {
        0
    } else if THREE.contains(&currency.as_str()) {
        3
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CheckoutId, CustomerId, EventId, OrderId, OrderLine, Quantity, Sku};

    fn money(amount: i64, currency: &str) -> Money {
        Money::new(amount, Currency::parse(currency).unwrap()).unwrap()
    }

    #[test]
    fn minor_units_are_shown_with_the_currency_s_decimal_places() {
        assert_eq!(format_money(money(900, "EUR")), "9.00 EUR");
        assert_eq!(format_money(money(5, "EUR")), "0.05 EUR");
        assert_eq!(format_money(money(123_456, "USD")), "1234.56 USD");
        assert_eq!(format_money(money(500, "JPY")), "500 JPY");
        assert_eq!(format_money(money(1_005, "KWD")), "1.005 KWD");
        assert_eq!(
            format_money(money(i64::MAX, "EUR")),
            "92233720368547758.07 EUR"
        );
    }

    #[test]
    fn the_message_counts_units_and_shows_the_total() {
        let eur = |a| money(a, "EUR");
        let line = |sku: &str, q: i64, price: i64| OrderLine {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(q).unwrap(),
            unit_price: eur(price),
            line_total: eur(price * q),
        };
        let mut event = OrderPaid {
            event_id: EventId::new(),
            order_id: OrderId::new(),
            customer_id: CustomerId::new(),
            checkout_id: CheckoutId::new(),
            total: eur(900),
            lines: vec![line("tea-01", 1, 450), line("mug-02", 1, 450)],
            payment_intent_id: "pi_1".into(),
            po_number: None,
            on_account: false,
            invoice_id: None,
            paid_at: chrono::Utc::now(),
        };
        assert_eq!(
            paid_message(&event),
            format!("Your order {} is paid: 2 items, 9.00 EUR", event.order_id)
        );
        event.lines.truncate(1);
        event.total = eur(450);
        assert!(paid_message(&event).ends_with("is paid: 1 item, 4.50 EUR"));
    }

    #[test]
    fn an_order_paid_round_trips_through_its_payload() {
        let event = OrderPaid {
            event_id: EventId::new(),
            order_id: OrderId::new(),
            customer_id: CustomerId::new(),
            checkout_id: CheckoutId::new(),
            total: money(450, "EUR"),
            lines: vec![OrderLine {
                sku: Sku::parse("tea-01").unwrap(),
                quantity: Quantity::new(1).unwrap(),
                unit_price: money(450, "EUR"),
                line_total: money(450, "EUR"),
            }],
            payment_intent_id: "pi_1".into(),
            po_number: None,
            on_account: false,
            invoice_id: None,
            paid_at: chrono::DateTime::parse_from_rfc3339("2030-01-01T12:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        };
        let payload = event.to_payload();
        let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(json["paid_at"], "2030-01-01T12:00:00Z");
        assert_eq!(json["lines"][0]["unit_price"]["amount"], 450);
        assert_eq!(OrderPaid::from_payload(payload.as_bytes()).unwrap(), event);
        assert!(matches!(
            OrderPaid::from_payload(b"{\"event_id\": 1}"),
            Err(super::super::SinkError::Malformed(_))
        ));
    }
}
