//! `Idempotency-Key` at the edge (DESIGN §4, Stripe's semantics): a key is scoped to the
//! customer and stored with a fingerprint of the request and its final response for 24 h. A
//! replay gets the stored response; a concurrent duplicate gets 409; the same key with
//! different parameters gets 422. Only definitive outcomes are stored, so a request that failed
//! transiently may be retried with the same key.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct KeyError;

/// A validated `Idempotency-Key` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What makes two requests "the same": method, path and body bytes.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(path.as_bytes());
    hash.update([0]);
    hash.update(body);
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_must_be_visible_ascii_of_reasonable_length() {
        assert!(IdempotencyKey::parse("order-7f3a").is_ok());
        for bad in ["", " ", "a b", "é", &"k".repeat(256), "tab\t"] {
            assert_eq!(IdempotencyKey::parse(bad), Err(KeyError), "{bad:?}");
        }
    }

    #[test]
    fn a_different_body_or_path_is_a_different_fingerprint() {
        let a = fingerprint(
            "POST",
            "/v1/checkouts/1/complete",
            br#"{"payment_method":"pm_card_visa"}"#,
        );
        assert_eq!(
            a,
            fingerprint(
                "POST",
                "/v1/checkouts/1/complete",
                br#"{"payment_method":"pm_card_visa"}"#
            )
        );
        assert_ne!(
            a,
            fingerprint(
                "POST",
                "/v1/checkouts/2/complete",
                br#"{"payment_method":"pm_card_visa"}"#
            )
        );
        assert_ne!(
            a,
            fingerprint(
                "POST",
                "/v1/checkouts/1/complete",
                br#"{"payment_method":"pm_card_mastercard"}"#
            )
        );
    }

    proptest::proptest! {
        /// Any header value at all: accepted exactly when it is 1–255 visible ASCII bytes.
        #[test]
        fn parsing_any_key_accepts_exactly_visible_ascii_up_to_255(raw in "(?s).{0,300}") {
            let allowed =
                (1..=255).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
            match IdempotencyKey::parse(&raw) {
                Ok(key) => {
                    proptest::prop_assert!(allowed);
                    proptest::prop_assert_eq!(key.as_str(), raw.as_str());
                }
                Err(_) => proptest::prop_assert!(!allowed),
            }
        }
    }
}
