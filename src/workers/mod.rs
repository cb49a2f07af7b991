//! Background work. Each worker has a `tick()` that does one batch and says what it did (tests
//! drive it directly), and `run_until_stopped` that loops it until shutdown. All coordination
//! goes through the store, so any number of instances may run the same workers.

mod expiry;
mod recovery;

pub use expiry::ExpiryWorker;
pub use recovery::RecoveryWorker;
