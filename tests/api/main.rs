//! The integration suite: the real router over real connections, every case on both stores
//! (and both flash-sale gates).

mod helpers;

mod binary;
mod carts;
mod catalogue;
mod errors;
mod gate;
mod inventory;
