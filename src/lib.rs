//! holdfast: a checkout engine that never oversells and never double-charges.
//!
//! Reading order:
//! - [`domain`]: money, SKUs, quantities, ids, products, carts, orders, checkout states, clock.
//! - [`store`]: the `Store` trait (one method per atomic phase) and its PostgreSQL and SQLite
//!   implementations.
//! - [`flash_sale`]: the admission gate in front of a flash sale's stock (Redis or in process).
//! - [`payments`]: the payment gateway (Stripe over HTTP, or the test-mode simulator), webhook
//!   signatures and events.
//! - [`outbox`]: fulfilment events: the relay, the NATS and in-process sinks, the consumers.
//! - [`checkout`]: the saga, one function per arrow of DESIGN §3, and the batcher that groups
//!   concurrent reservations.
//! - [`idempotency`]: `Idempotency-Key` values and request fingerprints.
//! - [`http`]: the router, the error body, extractors and one file per resource.
//! - [`workers`]: background loops (reservation expiry) with a `tick()` tests can drive.
//! - [`audit`]: the promise checks behind `holdfast audit`.
//! - [`loadgen`]: `holdfast loadgen`, a flash sale or steady load against a running server.
//! - [`observe`]: the Prometheus metrics every layer counts into.
//! - [`demo`]: the catalogue `serve --demo` seeds.
//! - [`faults`]: fault points for crash tests, inert unless a test-only setting arms one.
//! - [`brokers`]: starting and serving degraded while Redis or NATS is unreachable.
//! - [`config`], [`startup`], [`telemetry`], [`shutdown`]: flags, wiring, logs, stopping.

pub mod audit;
pub mod brokers;
pub mod checkout;
pub mod config;
pub mod demo;
pub mod domain;
pub mod faults;
pub mod flash_sale;
pub mod http;
pub mod idempotency;
pub mod loadgen;
pub mod observe;
pub mod outbox;
pub mod payments;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod workers;
