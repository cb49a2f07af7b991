//! holdfast: a checkout engine that never oversells and never double-charges.
//!
//! Read in this order:
//! - [`domain`]: the vocabulary (money, SKUs, ids, checkout states, the clock). No I/O.
//! - [`flash_sale`]: the admission gate in front of a flash sale's stock (DESIGN §5).

pub mod domain;
pub mod flash_sale;
