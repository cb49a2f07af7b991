//! holdfast: a checkout engine that never oversells and never double-charges.

pub mod domain;
pub mod payments;
