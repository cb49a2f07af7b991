//! Stripe's webhook signature scheme, so `POST /webhooks/stripe` only acts on events Stripe
//! really sent (DESIGN §6) and the simulator signs its events exactly the same way.
//!
//! Promise 4 (no lost payments) depends on webhooks moving checkouts on; a forged event must
//! not be able to mark an order paid. The scheme, as documented by Stripe
//! (<https://docs.stripe.com/webhooks#verify-manually>): the `Stripe-Signature` header is
//! `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each `v1` being HMAC-SHA256 over
//! `"{t}.{raw body}"` keyed with the endpoint secret exactly as configured (`whsec_` prefix
//! included). Several `v1` values appear while Stripe rolls a secret; other schemes (`v0`) are
//! ignored.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's own libraries default to five minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    MissingHeader,
    #[error("the Stripe-Signature header is malformed")]
    MalformedHeader,
    #[error("the Stripe-Signature header carries no v1 signature")]
    NoSignatures,
    #[error("the signature's timestamp is outside the tolerance")]
    TimestampOutsideTolerance,
    #[error("no signature matches the payload")]
    NoMatch,
}

/// The full `Stripe-Signature` header value for `payload` signed at `timestamp`.
pub fn sign(payload: &[u8], secret: &str, timestamp: i64) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(tag(payload, secret, timestamp))
    )
}

/// Accepts the event if any `v1` signature in `header` was made over `payload` with any of
/// `secrets` (several while a secret is rotated), at a timestamp within `tolerance` of `now`
/// in either direction.
pub fn verify(
    header: &str,
    payload: &[u8],
    secrets: &[&str],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let parsed = parse_header(header)?;
    let matches = secrets.iter().any(|secret| {
        let expected = tag(payload, secret, parsed.timestamp);
        // Every candidate is compared, and each comparison takes the same time whatever the
        // bytes: an attacker learns nothing from how long a rejection took.
        parsed
            .signatures
            .iter()
            .fold(subtle::Choice::from(0), |found, candidate| {
                found | expected.as_slice().ct_eq(candidate.as_slice())
            })
            .into()
    });
    if !matches {
        return Err(SignatureError::NoMatch);
    }
    // Checked after the signature, so only an authentic (possibly replayed) event learns that
    // its timestamp was the problem. Stripe's libraries reject only old timestamps; one from
    // the future is rejected too, as nothing legitimate produces it beyond clock skew.
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(parsed.timestamp) > tolerance.unsigned_abs() {
        return Err(SignatureError::TimestampOutsideTolerance);
    }
    Ok(())
}

struct ParsedHeader {
    timestamp: i64,
    signatures: Vec<Vec<u8>>,
}

fn parse_header(header: &str) -> Result<ParsedHeader, SignatureError> {
    if header.trim().is_empty() {
        return Err(SignatureError::MissingHeader);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let (scheme, value) = item
            .trim()
            .split_once('=')
            .ok_or(SignatureError::MalformedHeader)?;
        match scheme {
            "t" => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::MalformedHeader)?;
                if timestamp.replace(t).is_some() {
                    return Err(SignatureError::MalformedHeader);
                }
            }
            // A v1 value that is not hex cannot match any HMAC; skipping it keeps one bad
            // value from hiding a good one next to it.
            "v1" => signatures.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::MalformedHeader)?;
    if signatures.is_empty() {
        return Err(SignatureError::NoSignatures);
    }
    Ok(ParsedHeader {
        timestamp,
        signatures,
    })
}

fn tag(payload: &[u8], secret: &str, timestamp: i64) -> Vec<u8> {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_test_secret";
    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}"#;

    fn check(header: &str, body: &[u8], secrets: &[&str]) -> Result<(), SignatureError> {
        verify(header, body, secrets, NOW, DEFAULT_TOLERANCE)
    }

    #[test]
    fn a_signature_made_with_the_secret_is_accepted() {
        let header = sign(BODY, SECRET, NOW);
        assert!(header.starts_with(&format!("t={NOW},v1=")));
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(()));
    }

    #[test]
    fn the_signature_matches_a_known_vector() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test_secret
        let header = sign(b"{}", SECRET, NOW);
        assert_eq!(
            header,
            "t=1700000000,v1=ceb8863f7208fa249a6cd8f951e993c7563412aca65866f6272283debe143ab3"
        );
    }

    #[test]
    fn a_tampered_body_is_rejected() {
        let header = sign(BODY, SECRET, NOW);
        let tampered = br#"{"id":"evt_1","object":"event","type":"payment_intent.canceled"}"#;
        assert_eq!(
            check(&header, tampered, &[SECRET]),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn a_signature_made_with_another_secret_is_rejected() {
        let header = sign(BODY, "whsec_someone_else", NOW);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn the_whsec_prefix_is_part_of_the_key() {
        let header = sign(BODY, "test_secret", NOW);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn a_timestamp_older_than_the_tolerance_is_rejected() {
        let header = sign(BODY, SECRET, NOW - 301);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::TimestampOutsideTolerance)
        );
        let at_the_edge = sign(BODY, SECRET, NOW - 300);
        assert_eq!(check(&at_the_edge, BODY, &[SECRET]), Ok(()));
    }

    #[test]
    fn a_timestamp_too_far_in_the_future_is_rejected() {
        let header = sign(BODY, SECRET, NOW + 301);
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::TimestampOutsideTolerance)
        );
    }

    #[test]
    fn one_valid_signature_among_several_is_enough() {
        let valid = sign(BODY, SECRET, NOW);
        let v1 = valid.split_once(",v1=").unwrap().1;
        let header = format!(
            "t={NOW},v1={},v0=abcdef,v1=not-hex,v1={v1}",
            "00".repeat(32)
        );
        assert_eq!(check(&header, BODY, &[SECRET]), Ok(()));
    }

    #[test]
    fn a_missing_header_is_reported_as_missing() {
        assert_eq!(
            check("", BODY, &[SECRET]),
            Err(SignatureError::MissingHeader)
        );
        assert_eq!(
            check("   ", BODY, &[SECRET]),
            Err(SignatureError::MissingHeader)
        );
    }

    #[test]
    fn a_garbage_header_is_malformed() {
        for garbage in [
            "garbage",
            "t=,v1=00",
            "t=yesterday,v1=00",
            "v1=00",
            "t=1,t=2,v1=00",
        ] {
            assert_eq!(
                check(garbage, BODY, &[SECRET]),
                Err(SignatureError::MalformedHeader),
                "{garbage}"
            );
        }
    }

    #[test]
    fn a_header_without_a_v1_signature_has_no_signatures() {
        let header = format!("t={NOW},v0=abcdef");
        assert_eq!(
            check(&header, BODY, &[SECRET]),
            Err(SignatureError::NoSignatures)
        );
    }

    #[test]
    fn during_rotation_either_secret_is_accepted() {
        let old = "whsec_old";
        let new = "whsec_new";
        for signed_with in [old, new] {
            let header = sign(BODY, signed_with, NOW);
            assert_eq!(check(&header, BODY, &[new, old]), Ok(()), "{signed_with}");
        }
        let header = sign(BODY, "whsec_retired", NOW);
        assert_eq!(
            check(&header, BODY, &[new, old]),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn no_secret_configured_matches_nothing() {
        let header = sign(BODY, SECRET, NOW);
        assert_eq!(check(&header, BODY, &[]), Err(SignatureError::NoMatch));
    }

    proptest! {
        #[test]
        fn the_header_parser_never_panics(header in ".*", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = verify(&header, &body, &[SECRET], NOW, DEFAULT_TOLERANCE);
        }

        /// Whatever header an attacker writes, without the secret it verifies nothing.
        #[test]
        fn no_header_made_without_the_secret_is_accepted(
            header in "(?s).{0,200}",
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assert!(verify(&header, &body, &[SECRET], NOW, DEFAULT_TOLERANCE).is_err());
        }

        /// Well-formed headers with a fresh timestamp and random 32-byte signatures: rejected.
        #[test]
        fn random_signatures_with_a_fresh_timestamp_are_rejected(
            skew in -300i64..=300,
            tags in proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 1..4),
        ) {
            let mut header = format!("t={}", NOW + skew);
            for tag in &tags {
                header.push_str(&format!(",v1={}", hex::encode(tag)));
            }
            prop_assert_eq!(check(&header, BODY, &[SECRET]), Err(SignatureError::NoMatch));
        }

        /// A genuine signature covers its body, its timestamp and its secret: change any one and
        /// it is rejected.
        #[test]
        fn a_genuine_signature_fails_for_any_other_body_time_or_secret(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            other in proptest::collection::vec(any::<u8>(), 0..64),
            shift in 1i64..=300,
            secret in "whsec_[a-zA-Z0-9]{1,20}",
        ) {
            let header = sign(&body, SECRET, NOW);
            prop_assert_eq!(check(&header, &body, &[SECRET]), Ok(()));
            if other != body {
                prop_assert_eq!(check(&header, &other, &[SECRET]), Err(SignatureError::NoMatch));
            }
            let moved = header.replacen(&format!("t={NOW}"), &format!("t={}", NOW - shift), 1);
            prop_assert_eq!(check(&moved, &body, &[SECRET]), Err(SignatureError::NoMatch));
            if secret != SECRET {
                prop_assert_eq!(check(&header, &body, &[&secret]), Err(SignatureError::NoMatch));
            }
        }

        #[test]
        fn structured_garbage_never_panics(
            t in proptest::option::of(any::<i64>()),
            items in proptest::collection::vec("[a-z0-9]{0,3}=[a-f0-9=,]{0,70}", 0..5),
        ) {
            let mut header = t.map(|t| format!("t={t}")).unwrap_or_default();
            for item in items {
                header.push(',');
                header.push_str(&item);
            }
            let _ = verify(&header, b"{}", &[SECRET], NOW, DEFAULT_TOLERANCE);
        }
    }
}
