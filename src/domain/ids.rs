//! Public identifiers are random UUIDs wrapped in one type per entity, so a cart id can never be
//! passed where a checkout id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id")]
pub struct IdError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn parse(raw: &str) -> Result<Self, IdError> {
                Uuid::parse_str(raw).map(Self).map_err(|_| IdError)
            }

            pub fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A customer of the shop.
    CustomerId
);
id_type!(
    /// A customer's cart.
    CartId
);
id_type!(
    /// One checkout attempt of a cart: the saga's row.
    CheckoutId
);
id_type!(
    /// The order created together with a checkout's reservation.
    OrderId
);
id_type!(
    /// A flash sale of one SKU.
    FlashSaleId
);
id_type!(
    /// A wholesale buyer's company: its buyers share its prices, terms and credit.
    CompanyId
);
id_type!(
    /// An invoice of an order placed on account.
    InvoiceId
);
id_type!(
    /// One outbox event: consumers deduplicate deliveries by it (promise 5).
    EventId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_round_trips_through_its_text() {
        let id = CartId::new();
        assert_eq!(CartId::parse(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn garbage_is_not_an_id() {
        for bad in ["", "1", "not-a-uuid", "'; drop table carts; --"] {
            assert_eq!(CheckoutId::parse(bad), Err(IdError));
        }
    }

    proptest::proptest! {
        /// Any text at all: parsing never panics, and what it accepts prints back as the same id.
        #[test]
        fn parsing_any_text_never_panics_and_accepted_ids_round_trip(raw in "\\PC{0,60}") {
            if let Ok(id) = OrderId::parse(&raw) {
                proptest::prop_assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
            }
        }

        #[test]
        fn every_uuid_is_an_id(bits in proptest::prelude::any::<u128>()) {
            let uuid = Uuid::from_u128(bits);
            proptest::prop_assert_eq!(CartId::parse(&uuid.to_string()), Ok(CartId::from_uuid(uuid)));
        }
    }
}
