//! The integration suite: the real router over real connections, every case on both stores
//! (and both flash-sale gates; the Stripe client against a fake Stripe server).

#[path = "../support/fake_stripe.rs"]
mod fake_stripe;
mod helpers;

mod audit;
mod authz;
mod binary;
mod browser;
mod capture;
mod carts;
mod catalogue;
mod crash;
mod errors;
mod flash_sale;
mod fuzz;
mod gate;
mod group_reservation;
mod inventory;
mod limits;
mod loadgen;
mod metrics;
mod openapi;
mod ops;
mod outbox;
mod payments;
mod prices;
mod saga;
mod sale_limits;
mod schemathesis;
mod secrets;
mod simulation;
mod webhooks;
mod wholesale;
