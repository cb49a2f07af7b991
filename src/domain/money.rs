//! Money is integer minor units plus an ISO-4217 currency (promise 6): no floating point,
//! every arithmetic step checked, so a total can fail loudly but never wrap or round.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currency must be three upper-case ISO-4217 letters, e.g. EUR")]
    BadCurrency,
    #[error("amount must not be negative")]
    Negative,
    #[error("amount overflows")]
    Overflow,
    #[error("cannot combine {0} with {1}")]
    CurrencyMismatch(Currency, Currency),
}

/// An ISO-4217 alphabetic code, stored as its three ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        let bytes: [u8; 3] = code
            .as_bytes()
            .try_into()
            .map_err(|_| MoneyError::BadCurrency)?;
        if bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self(bytes))
        } else {
            Err(MoneyError::BadCurrency)
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a currency holds only ASCII letters")
    }

    /// Stripe wants currencies in lower case.
    pub fn to_lowercase(self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A non-negative amount of minor units in one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Money {
    amount: i64,
    currency: Currency,
}

impl Money {
    pub fn new(amount: i64, currency: Currency) -> Result<Self, MoneyError> {
        if amount < 0 {
            return Err(MoneyError::Negative);
        }
        Ok(Self { amount, currency })
    }

    pub fn zero(currency: Currency) -> Self {
        Self {
            amount: 0,
            currency,
        }
    }

    pub fn amount(&self) -> i64 {
        self.amount
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money { amount, ..self })
    }

    pub fn checked_mul(self, factor: u32) -> Result<Money, MoneyError> {
        let amount = self
            .amount
            .checked_mul(i64::from(factor))
            .ok_or(MoneyError::Overflow)?;
        Ok(Money { amount, ..self })
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            amount: i64,
            currency: Currency,
        }
        let raw = Raw::deserialize(d)?;
        Money::new(raw.amount, raw.currency).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eur(amount: i64) -> Money {
        Money::new(amount, Currency::parse("EUR").unwrap()).unwrap()
    }

    #[test]
    fn a_currency_must_be_three_upper_case_letters() {
        for bad in ["", "eur", "EU", "EURO", "E1R", "ÉUR"] {
            assert_eq!(Currency::parse(bad), Err(MoneyError::BadCurrency), "{bad}");
        }
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
    }

    #[test]
    fn a_negative_amount_is_rejected() {
        assert_eq!(
            Money::new(-1, Currency::parse("EUR").unwrap()),
            Err(MoneyError::Negative)
        );
    }

    #[test]
    fn adding_different_currencies_is_an_error() {
        let usd = Money::new(1, Currency::parse("USD").unwrap()).unwrap();
        assert!(matches!(
            eur(1).checked_add(usd),
            Err(MoneyError::CurrencyMismatch(..))
        ));
    }

    #[test]
    fn money_serialises_as_amount_and_currency() {
        let json = serde_json::to_value(eur(1999)).unwrap();
        assert_eq!(json, serde_json::json!({"amount": 1999, "currency": "EUR"}));
        let back: Money = serde_json::from_value(json).unwrap();
        assert_eq!(back, eur(1999));
    }

    #[test]
    fn money_rejects_fractions_strings_and_unknown_fields() {
        for bad in [
            r#"{"amount": 1.5, "currency": "EUR"}"#,
            r#"{"amount": "15", "currency": "EUR"}"#,
            r#"{"amount": 15, "currency": "EUR", "tax": 1}"#,
            r#"{"amount": -15, "currency": "EUR"}"#,
        ] {
            assert!(serde_json::from_str::<Money>(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// Any amount and any currency text in a body: money exactly when the amount is a
        /// non-negative integer and the currency three upper-case ASCII letters.
        #[test]
        fn any_amount_and_currency_deserialise_only_when_valid(
            amount in proptest::num::i128::ANY,
            currency in "(?s).{0,5}|[A-Z]{3}",
        ) {
            let body = serde_json::json!({"amount": 0, "currency": currency}).to_string()
                .replacen("\"amount\":0", &format!("\"amount\":{amount}"), 1);
            let parsed = serde_json::from_str::<Money>(&body);
            let valid = (0..=i128::from(i64::MAX)).contains(&amount)
                && currency.len() == 3
                && currency.bytes().all(|b| b.is_ascii_uppercase());
            proptest::prop_assert_eq!(parsed.is_ok(), valid, "{}", body);
            if let Ok(money) = parsed {
                proptest::prop_assert_eq!(i128::from(money.amount()), amount);
                proptest::prop_assert_eq!(money.currency(), crate::domain::Currency::parse(&currency).expect("valid"));
            }
        }

        /// Arbitrary text where money belongs never panics and never yields a negative amount.
        #[test]
        fn any_text_where_money_belongs_never_yields_a_negative_amount(raw in "(?s).{0,64}") {
            if let Ok(money) = serde_json::from_str::<Money>(&raw) {
                proptest::prop_assert!(money.amount() >= 0);
            }
        }

        #[test]
        fn addition_is_exact_or_reports_overflow(a in 0i64..=i64::MAX, b in 0i64..=i64::MAX) {
            match eur(a).checked_add(eur(b)) {
                Ok(sum) => prop_assert_eq!(i128::from(sum.amount()), i128::from(a) + i128::from(b)),
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::Overflow);
                    prop_assert!(i128::from(a) + i128::from(b) > i128::from(i64::MAX));
                }
            }
        }

        #[test]
        fn multiplication_is_exact_or_reports_overflow(a in 0i64..=i64::MAX, q in 0u32..=u32::MAX) {
            match eur(a).checked_mul(q) {
                Ok(p) => prop_assert_eq!(i128::from(p.amount()), i128::from(a) * i128::from(q)),
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::Overflow);
                    prop_assert!(i128::from(a) * i128::from(q) > i128::from(i64::MAX));
                }
            }
        }
    }
}
