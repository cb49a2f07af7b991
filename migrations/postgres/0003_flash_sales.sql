-- Flash sales: a number of units of one SKU behind an admission gate, with a short
-- reservation window. Checkouts remember the sale they were admitted to, so the gate's hold
-- can be consumed on payment or handed back when the checkout ends without one.
CREATE TABLE flash_sales (
    id                  UUID PRIMARY KEY,
    product_id          BIGINT NOT NULL REFERENCES products(id),
    sku                 TEXT NOT NULL,
    units               BIGINT NOT NULL CHECK (units > 0),
    starts_at           BIGINT NOT NULL,
    ends_at             BIGINT,
    reservation_ttl_ms  BIGINT NOT NULL,
    created_at          BIGINT NOT NULL
);
CREATE INDEX flash_sales_product ON flash_sales(product_id);

ALTER TABLE checkouts ADD COLUMN flash_sale_id UUID;
-- One admission buys one checkout: a customer holds at most one live checkout per sale.
CREATE UNIQUE INDEX checkouts_one_live_per_admission ON checkouts(flash_sale_id, customer_id)
    WHERE flash_sale_id IS NOT NULL AND state IN ('reserved', 'charging', 'requires_action');
