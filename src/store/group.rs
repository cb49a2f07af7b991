//! Group reservation: the decision half, shared by both stores. Under one transaction a store
//! locks the batch's open carts and its product rows (in id order), then walks the checkouts
//! in arrival order here, granting each whose every line fits what is still available and
//! refusing the others exactly as the plain path would have at that point (promises 1 and 2:
//! a refusal names the units really left after the checkouts serialised before it).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::domain::{CartId, CartStatus, Checkout, CheckoutId, Money};

use super::{
    governing_sale, order_total, po_number_given, rules_hold, Governed, NewCheckout, PricedLine,
    Shortfall, Store, StoreError,
};

/// One request of a batch as the store found it under the locks.
pub(crate) struct Candidate {
    /// `Ok` when the cart is open and the customer's own, else the plain path's error.
    pub cart: Result<(), StoreError>,
    /// Its lines summed per product in lock order, priced from the locked product rows.
    pub lines: Vec<PricedLine>,
    /// The buyer's company requires a purchase-order number.
    pub po_number_required: bool,
}

/// What the walk decided for one request.
pub(crate) enum Planned {
    Grant {
        lines: Vec<PricedLine>,
        total: Money,
        /// The sale the lines fall under ([`governing_sale`]).
        governed: Governed,
    },
    Refuse(StoreError),
}

/// The decisions in arrival order and the units to add to each product's `reserved`.
pub(crate) struct Plan {
    pub outcomes: Vec<Planned>,
    pub reserve: BTreeMap<i64, i64>,
}

/// Walks the requests in arrival order against `available` (units free per product id when
/// the rows were locked). A cart granted earlier in the batch is no longer open for a later
/// request of the same cart, as it would not be on the plain path.
pub(crate) fn plan(
    batch: &[NewCheckout],
    candidates: Vec<Candidate>,
    available: &HashMap<i64, i64>,
) -> Plan {
    let mut left = available.clone();
    let mut taken: HashSet<CartId> = HashSet::new();
    let mut reserve = BTreeMap::new();
    let outcomes = batch
        .iter()
        .zip(candidates)
        .map(|(new, candidate)| {
            let decided = decide(new, candidate, &left, &taken);
            if let Planned::Grant { lines, .. } = &decided {
                taken.insert(new.cart_id);
                for line in lines {
                    let quantity = i64::from(line.quantity.get());
                    *left.entry(line.product_id).or_default() -= quantity;
                    *reserve.entry(line.product_id).or_default() += quantity;
                }
            }
            decided
        })
        .collect();
    Plan { outcomes, reserve }
}

/// Each request's answer, in batch order: its own checkout as written, or its refusal.
pub(crate) fn answers(
    batch: &[NewCheckout],
    plan: Plan,
    mut written: HashMap<CheckoutId, Checkout>,
) -> Vec<Result<Checkout, StoreError>> {
    batch
        .iter()
        .zip(plan.outcomes)
        .map(|(new, outcome)| match outcome {
            Planned::Grant { .. } => written
                .remove(&new.id)
                .ok_or_else(|| StoreError::Corrupt(format!("checkout {} not written", new.id))),
            Planned::Refuse(e) => Err(e),
        })
        .collect()
}

/// The plain path for every request of a batch that could not run as one transaction: each
/// gets its own answer.
pub(crate) async fn one_by_one<S: Store + ?Sized>(
    store: &S,
    batch: &[NewCheckout],
) -> Vec<Result<Checkout, StoreError>> {
    futures::future::join_all(batch.iter().map(|new| store.reserve_checkout(new))).await
}

fn decide(
    new: &NewCheckout,
    candidate: Candidate,
    left: &HashMap<i64, i64>,
    taken: &HashSet<CartId>,
) -> Planned {
    if let Err(e) = candidate.cart {
        return Planned::Refuse(e);
    }
    if taken.contains(&new.cart_id) {
        return Planned::Refuse(StoreError::CartNotOpen(CartStatus::CheckingOut));
    }
    if candidate.lines.is_empty() {
        return Planned::Refuse(StoreError::CartEmpty);
    }
    if let Err(e) = po_number_given(new, candidate.po_number_required) {
        return Planned::Refuse(e);
    }
    if let Err(e) = rules_hold(&candidate.lines) {
        return Planned::Refuse(e);
    }
    let total = match order_total(&candidate.lines) {
        Ok(total) => total,
        Err(e) => return Planned::Refuse(e),
    };
    let governed = match governing_sale(new, &candidate.lines) {
        Ok(governed) => governed,
        Err(e) => return Planned::Refuse(e),
    };
    let short: Vec<Shortfall> = candidate
        .lines
        .iter()
        .filter_map(|line| {
            let free = left.get(&line.product_id).copied().unwrap_or(0);
            (free < i64::from(line.quantity.get())).then(|| Shortfall {
                sku: line.sku.clone(),
                requested: line.quantity.get(),
                available: free,
            })
        })
        .collect();
    if short.is_empty() {
        Planned::Grant {
            lines: candidate.lines,
            total,
            governed,
        }
    } else {
        Planned::Refuse(StoreError::InsufficientStock(short))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CheckoutId, Currency, CustomerId, OrderId, Quantity, Sku};

    fn request(cart: CartId) -> NewCheckout {
        NewCheckout {
            capture_method: Default::default(),
            id: CheckoutId::new(),
            order_id: OrderId::new(),
            customer_id: CustomerId::new(),
            cart_id: cart,
            now: chrono::Utc::now(),
            ttl: chrono::Duration::seconds(60),
            max_lifetime: chrono::Duration::seconds(600),
            flash_sale: None,
            idempotency_key: None,
            flash_sale_units: 0,
            po_number: None,
            open_sales: Vec::new(),
        }
    }

    fn lines(wanted: &[(i64, i64)]) -> Vec<PricedLine> {
        let eur = Currency::parse("EUR").expect("a currency");
        wanted
            .iter()
            .map(|&(product_id, quantity)| PricedLine {
                product_id,
                sku: Sku::parse(&format!("p{product_id}")).expect("a sku"),
                quantity: Quantity::new(quantity).expect("a quantity"),
                unit_price: Money::new(100, eur).expect("a price"),
                list_price: Money::new(100, eur).expect("a price"),
                rules: crate::domain::OrderingRules::default(),
            })
            .collect()
    }

    fn open(wanted: &[(i64, i64)]) -> Candidate {
        Candidate {
            cart: Ok(()),
            lines: lines(wanted),
            po_number_required: false,
        }
    }

    fn verdicts(plan: &Plan) -> Vec<String> {
        plan.outcomes
            .iter()
            .map(|o| match o {
                Planned::Grant { .. } => "grant".to_owned(),
                Planned::Refuse(StoreError::InsufficientStock(short)) => format!(
                    "short {}",
                    short
                        .iter()
                        .map(|s| format!("{}:{}/{}", s.sku, s.requested, s.available))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Planned::Refuse(e) => format!("refused: {e}"),
            })
            .collect()
    }

    #[test]
    fn checkouts_are_granted_in_arrival_order_until_a_line_no_longer_fits() {
        let batch: Vec<_> = (0..4).map(|_| request(CartId::new())).collect();
        let candidates = vec![
            open(&[(1, 2)]),
            open(&[(1, 2), (2, 1)]),
            open(&[(1, 1), (2, 1)]),
            open(&[(2, 1)]),
        ];
        let available = HashMap::from([(1, 3), (2, 1)]);

        let plan = plan(&batch, candidates, &available);

        assert_eq!(
            verdicts(&plan),
            vec!["grant", "short p1:2/1", "grant", "short p2:1/0"]
        );
        assert_eq!(plan.reserve, BTreeMap::from([(1, 3), (2, 1)]));
    }

    #[test]
    fn a_refused_checkout_takes_nothing_from_the_ones_after_it() {
        let batch: Vec<_> = (0..2).map(|_| request(CartId::new())).collect();
        let candidates = vec![open(&[(1, 1), (2, 5)]), open(&[(1, 1)])];
        let available = HashMap::from([(1, 1), (2, 1)]);

        let plan = plan(&batch, candidates, &available);

        assert_eq!(verdicts(&plan), vec!["short p2:5/1", "grant"]);
        assert_eq!(plan.reserve, BTreeMap::from([(1, 1)]));
    }

    #[test]
    fn the_same_cart_twice_in_a_batch_is_granted_once_and_then_not_open() {
        let cart = CartId::new();
        let batch = vec![request(cart), request(cart)];
        let candidates = vec![open(&[(1, 1)]), open(&[(1, 1)])];

        let plan = plan(&batch, candidates, &HashMap::from([(1, 5)]));

        assert_eq!(
            verdicts(&plan),
            vec!["grant", "refused: the cart is CheckingOut"]
        );
    }

    #[test]
    fn cart_errors_and_empty_carts_are_refused_without_taking_stock() {
        let batch: Vec<_> = (0..3).map(|_| request(CartId::new())).collect();
        let candidates = vec![
            Candidate {
                cart: Err(StoreError::NotFound("cart")),
                lines: Vec::new(),
                po_number_required: false,
            },
            open(&[]),
            open(&[(1, 1)]),
        ];

        let plan = plan(&batch, candidates, &HashMap::from([(1, 1)]));

        assert_eq!(
            verdicts(&plan),
            vec![
                "refused: cart not found",
                "refused: the cart is empty",
                "grant"
            ]
        );
    }
}
