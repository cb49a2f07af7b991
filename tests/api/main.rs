//! The integration test binary: every API-level test lives in this one binary, so the crate
//! and its dependencies are linked once rather than once per test file.

#[path = "../support/fake_stripe.rs"]
mod fake_stripe;
mod payments;
