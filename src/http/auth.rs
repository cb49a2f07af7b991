//! Bearer tokens (DESIGN §7, §8). The admin token is compared as a SHA-256 digest in constant
//! time; a customer token is found by its SHA-256 digest, the only form the database keeps.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use crate::domain::Customer;

use super::{ApiError, AppState};

/// A new customer token: 256 random bits, URL-safe.
pub fn new_customer_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!(
        "hfc_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What the database stores for a customer token.
pub fn token_hash(token: &str) -> String {
    hex::encode(token_digest(token))
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= 512)
        .then_some(token)
}

/// The caller presented the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        if bool::from(token_digest(token).ct_eq(&state.admin_token_digest)) {
            return Ok(Admin);
        }
        // A valid customer token is authenticated but not allowed here.
        match state
            .store
            .customer_by_token_hash(&token_hash(token))
            .await?
        {
            Some(_) => Err(ApiError::forbidden()),
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// Customers by the digest of their token. Tokens are never changed or revoked, so an entry can
/// never go stale; the map is bounded by clearing it when full (a std `RwLock` held only for a
/// lookup or an insert, never across await). Written by hand: a map and a bound is all it is.
#[derive(Default)]
pub struct CustomerCache(std::sync::RwLock<std::collections::HashMap<String, Customer>>);

impl CustomerCache {
    const CAPACITY: usize = 200_000;

    fn get(&self, hash: &str) -> Option<Customer> {
        self.0.read().ok()?.get(hash).cloned()
    }

    fn put(&self, hash: String, customer: Customer) {
        if let Ok(mut map) = self.0.write() {
            if map.len() >= Self::CAPACITY {
                map.clear();
            }
            map.insert(hash, customer);
        }
    }
}

/// The caller presented a customer's token.
pub struct CustomerAuth(pub Customer);

impl FromRequestParts<AppState> for CustomerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = token_hash(token);
        if let Some(customer) = state.customers.get(&hash) {
            return Ok(CustomerAuth(customer));
        }
        // The lookup is by digest, which says nothing useful about the token itself.
        let customer = state
            .store
            .customer_by_token_hash(&hash)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        state.customers.put(hash, customer.clone());
        Ok(CustomerAuth(customer))
    }
}

/// A customer's token if one is given: the public routes answer a buyer with that buyer's
/// prices. No token, or the admin's, is the public view; a token nobody has is `401`.
pub struct MaybeCustomer(pub Option<Customer>);

impl FromRequestParts<AppState> for MaybeCustomer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if parts.headers.get(AUTHORIZATION).is_none() {
            return Ok(MaybeCustomer(None));
        }
        if let Some(token) = bearer(parts) {
            if bool::from(token_digest(token).ct_eq(&state.admin_token_digest)) {
                return Ok(MaybeCustomer(None));
            }
        }
        let CustomerAuth(customer) = CustomerAuth::from_request_parts(parts, state).await?;
        Ok(MaybeCustomer(Some(customer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_tokens_are_long_random_and_distinct() {
        let a = new_customer_token();
        let b = new_customer_token();
        assert_ne!(a, b);
        assert!(a.starts_with("hfc_") && a.len() >= 40);
    }

    #[test]
    fn the_stored_hash_is_hex_sha256_of_the_token() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn parts_with(authorization: &[u8]) -> Option<Parts> {
        let value = axum::http::HeaderValue::from_bytes(authorization).ok()?;
        let (parts, ()) = axum::http::Request::builder()
            .header(AUTHORIZATION, value)
            .body(())
            .expect("a request with one header")
            .into_parts();
        Some(parts)
    }

    proptest::proptest! {
        /// Any header bytes at all: reading the credential never panics, and whatever it accepts
        /// is a non-empty, bounded token that came after a `Bearer` scheme.
        #[test]
        fn any_authorization_header_is_read_safely(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Some(parts) = parts_with(&raw) {
                if let Some(token) = bearer(&parts) {
                    proptest::prop_assert!(!token.is_empty() && token.len() <= 512);
                    let text = std::str::from_utf8(&raw).expect("a token was read from text");
                    proptest::prop_assert!(text.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
                }
            }
        }

        #[test]
        fn a_bearer_token_is_read_back_as_sent(token in "[A-Za-z0-9_\\-]{1,512}", scheme in "(?i)bearer") {
            let parts = parts_with(format!("{scheme} {token}").as_bytes()).expect("a valid header");
            proptest::prop_assert_eq!(bearer(&parts), Some(token.as_str()));
        }
    }
}
