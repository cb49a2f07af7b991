//! Wholesale selling: companies whose buyers order for them, ordering rules per product
//! (minimum, case pack, maximum), volume tiers and company price lists. Every decision here is
//! pure, so the cart, the reservation of either store and the catalogue all ask the same
//! function (promise 6: the price is the catalogue's, in exact integer minor units).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CompanyId, Currency, Money, MoneyError, Quantity, Sku};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WholesaleError {
    #[error("{0}")]
    Rules(String),
    #[error("{0}")]
    Tiers(String),
    #[error("{0}")]
    Price(String),
}

/// How much of a product one cart line may hold: at least `min_quantity`, a multiple of
/// `increment` (the case pack), at most `max_quantity` when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OrderingRules {
    pub min_quantity: u32,
    pub increment: u32,
    pub max_quantity: Option<u32>,
}

impl Default for OrderingRules {
    fn default() -> Self {
        Self {
            min_quantity: 1,
            increment: 1,
            max_quantity: None,
        }
    }
}

/// One rule a line broke, as shown to the customer: `allowed` is the rule's own figure (the
/// minimum, the case pack or the maximum).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleBreach {
    pub sku: Sku,
    /// `min_quantity`, `increment` or `max_quantity`.
    pub rule: &'static str,
    pub quantity: u32,
    pub allowed: u32,
}

impl OrderingRules {
    /// Rules within the line bounds that some quantity can meet.
    pub fn new(
        min_quantity: u32,
        increment: u32,
        max_quantity: Option<u32>,
    ) -> Result<Self, WholesaleError> {
        let bad = |m: &str| Err(WholesaleError::Rules(m.to_owned()));
        let in_range = |n: u32| (1..=Quantity::MAX).contains(&n);
        if !in_range(min_quantity) {
            return bad("min_quantity must be between 1 and 10000");
        }
        if !in_range(increment) {
            return bad("increment must be between 1 and 10000");
        }
        if let Some(max) = max_quantity {
            if !in_range(max) || max < min_quantity {
                return bad("max_quantity must be between min_quantity and 10000");
            }
        }
        let rules = Self {
            min_quantity,
            increment,
            max_quantity,
        };
        // The smallest multiple of the case pack at or above the minimum must be allowed.
        let first = min_quantity.div_ceil(increment).saturating_mul(increment);
        if first > max_quantity.unwrap_or(Quantity::MAX) {
            return bad("no quantity meets min_quantity, increment and max_quantity together");
        }
        Ok(rules)
    }

    /// The first rule `quantity` breaks, checked minimum, case pack, maximum.
    pub fn breach(&self, sku: &Sku, quantity: u32) -> Option<RuleBreach> {
        let broke = |rule, allowed| {
            Some(RuleBreach {
                sku: sku.clone(),
                rule,
                quantity,
                allowed,
            })
        };
        if quantity < self.min_quantity {
            return broke("min_quantity", self.min_quantity);
        }
        if !quantity.is_multiple_of(self.increment) {
            return broke("increment", self.increment);
        }
        match self.max_quantity {
            Some(max) if quantity > max => broke("max_quantity", max),
            _ => None,
        }
    }
}

/// A volume price: from `min_quantity` units on, each unit costs `amount` (minor units of the
/// product's currency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTier {
    pub min_quantity: u32,
    pub amount: i64,
}

/// Volume tiers in ascending `min_quantity`; the tier with the largest minimum at or below
/// the line's quantity applies, and below the first tier the base price does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PriceTiers(Vec<PriceTier>);

impl PriceTiers {
    pub const MAX_TIERS: usize = 20;

    pub fn new(tiers: Vec<PriceTier>) -> Result<Self, WholesaleError> {
        let bad = |m: &str| Err(WholesaleError::Tiers(m.to_owned()));
        if tiers.len() > Self::MAX_TIERS {
            return bad("at most 20 price tiers");
        }
        for (i, tier) in tiers.iter().enumerate() {
            if !(2..=Quantity::MAX).contains(&tier.min_quantity) {
                return bad("a tier's min_quantity must be between 2 and 10000");
            }
            if tier.amount < 0 {
                return bad("a tier's amount must not be negative");
            }
            if i > 0 && tiers[i - 1].min_quantity >= tier.min_quantity {
                return bad("tiers must be in strictly ascending min_quantity");
            }
        }
        Ok(Self(tiers))
    }

    pub fn tiers(&self) -> &[PriceTier] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The amount of the tier `quantity` falls in, if any.
    pub fn amount_for(&self, quantity: u32) -> Option<i64> {
        self.0
            .iter()
            .rev()
            .find(|t| t.min_quantity <= quantity)
            .map(|t| t.amount)
    }

    /// The stored form (a JSON array), the same in both stores.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "[]".to_owned())
    }

    pub fn from_json(raw: &str) -> Result<Self, WholesaleError> {
        let tiers: Vec<PriceTier> =
            serde_json::from_str(raw).map_err(|e| WholesaleError::Tiers(e.to_string()))?;
        Self::new(tiers)
    }
}

impl<'de> Deserialize<'de> for PriceTiers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let tiers = Vec::<PriceTier>::deserialize(d)?;
        PriceTiers::new(tiers).map_err(serde::de::Error::custom)
    }
}

/// A company's price of one SKU: a fixed amount or a percentage off the product's price at the
/// line's quantity, and optionally volume tiers of its own, which win where they apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompanyPrice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent_off: Option<u32>,
    pub tiers: PriceTiers,
}

impl CompanyPrice {
    pub fn new(
        amount: Option<i64>,
        percent_off: Option<u32>,
        tiers: PriceTiers,
    ) -> Result<Self, WholesaleError> {
        let bad = |m: &str| Err(WholesaleError::Price(m.to_owned()));
        match (amount, percent_off) {
            (Some(_), Some(_)) | (None, None) => return bad("give either amount or percent_off"),
            (Some(a), None) if a < 0 => return bad("amount must not be negative"),
            (None, Some(p)) if p > 100 => return bad("percent_off must be between 0 and 100"),
            _ => {}
        }
        Ok(Self {
            amount,
            percent_off,
            tiers,
        })
    }
}

/// The unit price a line of `quantity` pays: the company's tier where one applies, else the
/// company's amount, else the product's price at that quantity (its volume tier, or the list
/// price) less the company's percentage. A percentage takes whole minor units off, rounding
/// the discount down, so the figure is exact and never below what the percentage says.
pub fn unit_price(
    list: Money,
    tiers: &PriceTiers,
    company: Option<&CompanyPrice>,
    quantity: u32,
) -> Result<Money, MoneyError> {
    let currency = list.currency();
    if let Some(company) = company {
        if let Some(amount) = company.tiers.amount_for(quantity) {
            return Money::new(amount, currency);
        }
        if let Some(amount) = company.amount {
            return Money::new(amount, currency);
        }
    }
    let base = tiers.amount_for(quantity).unwrap_or(list.amount());
    let off = company.and_then(|c| c.percent_off).unwrap_or(0);
    let discount = i128::from(base) * i128::from(off) / 100;
    let amount = i64::try_from(i128::from(base) - discount).map_err(|_| MoneyError::Overflow)?;
    Money::new(amount, currency)
}

/// What a buyer pays at every quantity, as a base price and volume tiers of the same form
/// as a product's: the unit price is constant between the breakpoints of the product's and
/// the company's tiers, so it is [`unit_price`] at 1 and at each breakpoint (a tier that
/// would repeat the price before it is left out).
pub fn price_schedule(
    list: Money,
    tiers: &PriceTiers,
    company: Option<&CompanyPrice>,
) -> Result<(Money, PriceTiers), MoneyError> {
    let base = unit_price(list, tiers, company, 1)?;
    let mut breaks: Vec<u32> = tiers.tiers().iter().map(|t| t.min_quantity).collect();
    if let Some(company) = company {
        breaks.extend(company.tiers.tiers().iter().map(|t| t.min_quantity));
    }
    breaks.sort_unstable();
    breaks.dedup();
    let mut schedule = Vec::with_capacity(breaks.len());
    let mut last = base.amount();
    for min_quantity in breaks {
        let amount = unit_price(list, tiers, company, min_quantity)?.amount();
        if amount != last {
            schedule.push(PriceTier {
                min_quantity,
                amount,
            });
            last = amount;
        }
    }
    Ok((base, PriceTiers(schedule)))
}

/// A buyer's purchase-order number, carried from the checkout to the order and its events:
/// 1 to 64 printable characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PoNumber(String);

impl PoNumber {
    pub fn parse(raw: &str) -> Result<Self, WholesaleError> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        if chars == 0 || chars > 64 || trimmed.chars().any(char::is_control) {
            return Err(WholesaleError::Price(
                "po_number must be 1 to 64 characters without control characters".into(),
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PoNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        PoNumber::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// How a company pays: by card at checkout, or on account within 15, 30 or 60 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentTerms {
    #[serde(rename = "prepaid")]
    Prepaid,
    #[serde(rename = "net_15")]
    Net15,
    #[serde(rename = "net_30")]
    Net30,
    #[serde(rename = "net_60")]
    Net60,
}

impl PaymentTerms {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepaid => "prepaid",
            Self::Net15 => "net_15",
            Self::Net30 => "net_30",
            Self::Net60 => "net_60",
        }
    }

    /// Days an invoice on these terms is due in; `None`: no orders on account.
    pub fn days(self) -> Option<i64> {
        match self {
            Self::Prepaid => None,
            Self::Net15 => Some(15),
            Self::Net30 => Some(30),
            Self::Net60 => Some(60),
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Prepaid, Self::Net15, Self::Net30, Self::Net60]
            .into_iter()
            .find(|t| t.as_str() == raw)
    }
}

/// What an admin gives to open a company.
#[derive(Debug, Clone)]
pub struct NewCompany {
    pub name: super::CustomerName,
    pub currency: Currency,
    pub payment_terms: PaymentTerms,
    /// Minor units of `currency` the company may owe at once.
    pub credit_limit: i64,
    /// Every checkout of its buyers must carry a purchase-order number.
    pub po_number_required: bool,
    /// How its buyers' cards are charged; `None`: as the shop's `--capture-method` says.
    pub capture_method: Option<super::CaptureMethod>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Company {
    pub id: CompanyId,
    pub name: String,
    pub currency: Currency,
    pub payment_terms: PaymentTerms,
    pub credit_limit: i64,
    pub po_number_required: bool,
    pub created_at: DateTime<Utc>,
    /// `None`: its buyers' checkouts follow the shop's `--capture-method`.
    pub capture_method: Option<super::CaptureMethod>,
}

/// The invoice of an order placed on account: its open balance counts against the company's
/// credit limit until it is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: super::InvoiceId,
    /// Sequential, for people.
    pub number: i64,
    pub company_id: CompanyId,
    pub order_id: super::OrderId,
    pub amount: Money,
    pub paid: Money,
    /// `open`, `paid`, or `void` (its order refunded: nothing more is owed).
    pub status: String,
    pub due_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl Invoice {
    /// What is still owed: nothing on a void invoice.
    pub fn balance(&self) -> i64 {
        if self.status == "void" {
            return 0;
        }
        self.amount.amount() - self.paid.amount()
    }

    pub fn is_overdue(&self, now: DateTime<Utc>) -> bool {
        self.status == "open" && self.due_at < now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku() -> Sku {
        Sku::parse("case-01").expect("a sku")
    }

    fn eur(amount: i64) -> Money {
        Money::new(amount, Currency::parse("EUR").expect("EUR")).expect("an amount")
    }

    fn tiers(t: &[(u32, i64)]) -> PriceTiers {
        PriceTiers::new(
            t.iter()
                .map(|&(min_quantity, amount)| PriceTier {
                    min_quantity,
                    amount,
                })
                .collect(),
        )
        .expect("valid tiers")
    }

    #[test]
    fn a_case_pack_line_breaks_the_first_rule_it_misses() {
        let rules = OrderingRules::new(12, 6, Some(48)).expect("valid rules");
        let rule = |q| rules.breach(&sku(), q).map(|b| (b.rule, b.allowed));
        assert_eq!(rule(6), Some(("min_quantity", 12)));
        assert_eq!(rule(13), Some(("increment", 6)));
        assert_eq!(rule(54), Some(("max_quantity", 48)));
        assert_eq!(rule(12), None);
        assert_eq!(rule(48), None);
        assert_eq!(OrderingRules::default().breach(&sku(), 1), None);
    }

    #[test]
    fn rules_no_quantity_can_meet_are_refused() {
        assert!(OrderingRules::new(0, 1, None).is_err());
        assert!(OrderingRules::new(1, 0, None).is_err());
        assert!(OrderingRules::new(10, 1, Some(9)).is_err());
        assert!(OrderingRules::new(10, 12, Some(11)).is_err());
        assert!(OrderingRules::new(1, 10_001, None).is_err());
        assert!(OrderingRules::new(10, 12, Some(12)).is_ok());
    }

    #[test]
    fn tiers_must_ascend_and_the_highest_reached_applies() {
        assert!(PriceTiers::new(vec![
            PriceTier {
                min_quantity: 10,
                amount: 5
            },
            PriceTier {
                min_quantity: 10,
                amount: 4
            }
        ])
        .is_err());
        assert!(PriceTiers::new(vec![PriceTier {
            min_quantity: 1,
            amount: 5
        }])
        .is_err());
        let t = tiers(&[(10, 400), (50, 350)]);
        assert_eq!(t.amount_for(9), None);
        assert_eq!(t.amount_for(10), Some(400));
        assert_eq!(t.amount_for(49), Some(400));
        assert_eq!(t.amount_for(500), Some(350));
        assert_eq!(PriceTiers::from_json(&t.to_json()), Ok(t));
    }

    proptest::proptest! {
        /// The schedule a buyer is shown prices every quantity exactly as the reservation does.
        #[test]
        fn a_buyers_schedule_agrees_with_the_unit_price_at_every_quantity(
            list in 0i64..100_000,
            product in proptest::collection::btree_map(2u32..200, 0i64..100_000, 0..4),
            company_tiers in proptest::collection::btree_map(2u32..200, 0i64..100_000, 0..3),
            fixed in proptest::option::of(0i64..100_000),
            percent in 0u32..=100,
        ) {
            let product = tiers(&product.into_iter().collect::<Vec<_>>());
            let company_tiers = tiers(&company_tiers.into_iter().collect::<Vec<_>>());
            let company = match fixed {
                Some(amount) => CompanyPrice::new(Some(amount), None, company_tiers),
                None => CompanyPrice::new(None, Some(percent), company_tiers),
            }
            .expect("a price");
            for company in [None, Some(&company)] {
                let (base, schedule) =
                    price_schedule(eur(list), &product, company).expect("a schedule");
                for q in 1..=220 {
                    let shown = schedule.amount_for(q).unwrap_or(base.amount());
                    let paid = unit_price(eur(list), &product, company, q).expect("a price");
                    proptest::prop_assert_eq!(shown, paid.amount(), "quantity {}", q);
                }
            }
        }
    }

    #[test]
    fn a_company_price_wins_over_the_list_and_a_percentage_rounds_the_discount_down() {
        let product = tiers(&[(10, 400)]);
        let fixed = CompanyPrice::new(Some(300), None, tiers(&[(100, 250)])).expect("a price");
        let off = CompanyPrice::new(None, Some(15), PriceTiers::default()).expect("a price");
        let price = |c: Option<&CompanyPrice>, q| {
            unit_price(eur(450), &product, c, q)
                .expect("a price")
                .amount()
        };
        assert_eq!(price(None, 1), 450);
        assert_eq!(price(None, 10), 400);
        assert_eq!(price(Some(&fixed), 1), 300);
        assert_eq!(price(Some(&fixed), 100), 250);
        // 15 % of 450 is 67.5: 67 off.
        assert_eq!(price(Some(&off), 1), 383);
        assert_eq!(price(Some(&off), 10), 340);
        assert!(CompanyPrice::new(Some(1), Some(1), PriceTiers::default()).is_err());
        assert!(CompanyPrice::new(None, Some(101), PriceTiers::default()).is_err());
    }

    #[test]
    fn a_po_number_is_trimmed_and_bounded() {
        assert_eq!(
            PoNumber::parse("  PO-2026-0042 ").map(|p| p.0),
            Ok("PO-2026-0042".to_owned())
        );
        for bad in ["", "  ", "a\nb", &"x".repeat(65)] {
            assert!(PoNumber::parse(bad).is_err(), "{bad:?}");
        }
    }
}
