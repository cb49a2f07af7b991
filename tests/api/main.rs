//! The integration test binary: one binary for every API-level test, so the crate is linked
//! once (STYLE §4).

#[path = "../support/fake_stripe.rs"]
mod fake_stripe;
mod payments;
