//! The integration suite: the real router over real connections, every case on both stores.

mod helpers;

mod binary;
mod carts;
mod catalogue;
mod errors;
mod inventory;
