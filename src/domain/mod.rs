//! The checkout vocabulary: money, SKUs, quantities, ids, products, carts, orders and the
//! checkout state machine. Depends on nothing else in the crate and on no I/O library, so
//! every rule here (promise 6: prices are integer minor units; promise 7: parse, don't
//! validate) is checked the same way whichever store or transport carries the data.

mod cart;
mod checkout;
mod clock;
mod customer;
mod flash_sale;
mod ids;
mod money;
mod order;
mod product;
mod quantity;
mod sku;
mod wholesale;

pub use cart::{Cart, CartLine, CartStatus};
pub use checkout::{Checkout, CheckoutState, TransitionError};
pub use clock::{Clock, ManualClock, SystemClock};
pub use customer::{Customer, CustomerName, CustomerNameError};
pub use flash_sale::{FlashSale, NewFlashSale};
pub use ids::{
    CartId, CheckoutId, CompanyId, CustomerId, EventId, FlashSaleId, IdError, InvoiceId, OrderId,
};
pub use money::{Currency, Money, MoneyError};
pub use order::{CaptureMethod, Order, OrderLine, OrderStatus, PaymentAmounts};
pub use product::{NewProduct, Product, ProductName, ProductNameError, ProductPatch};
pub use quantity::{Quantity, QuantityError, StockLevel};
pub use sku::{Sku, SkuError};
pub use wholesale::{
    price_schedule, unit_price, Company, CompanyPrice, Invoice, NewCompany, OrderingRules,
    PaymentTerms, PoNumber, PriceTier, PriceTiers, RuleBreach, WholesaleError,
};
