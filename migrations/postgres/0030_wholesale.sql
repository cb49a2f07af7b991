-- Wholesale: companies and their buyers, ordering rules and volume tiers per product, and
-- company price lists. A customer without a company buys as a retail customer; a product
-- without rules or tiers sells one unit at a time at its list price, as before.

CREATE TABLE companies (
    id                  UUID PRIMARY KEY,
    name                TEXT NOT NULL,
    currency            TEXT NOT NULL,
    -- prepaid | net_15 | net_30 | net_60
    payment_terms       TEXT NOT NULL,
    credit_limit        BIGINT NOT NULL CHECK (credit_limit >= 0),
    po_number_required  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          BIGINT NOT NULL
);

ALTER TABLE customers ADD COLUMN company_id UUID REFERENCES companies(id);
CREATE INDEX customers_company ON customers(company_id) WHERE company_id IS NOT NULL;

-- A cart line holds at least min_quantity, a multiple of increment (the case pack) and at
-- most max_quantity units; price_tiers is a JSON array [{min_quantity, amount}] ascending.
ALTER TABLE products
    ADD COLUMN min_quantity BIGINT NOT NULL DEFAULT 1 CHECK (min_quantity >= 1),
    ADD COLUMN increment BIGINT NOT NULL DEFAULT 1 CHECK (increment >= 1),
    ADD COLUMN max_quantity BIGINT CHECK (max_quantity IS NULL OR max_quantity >= min_quantity),
    ADD COLUMN price_tiers TEXT NOT NULL DEFAULT '[]';

-- A company's price of a product: a fixed amount or a percentage off, with optional tiers of
-- its own (JSON, as on products).
CREATE TABLE company_prices (
    company_id   UUID NOT NULL REFERENCES companies(id),
    product_id   BIGINT NOT NULL REFERENCES products(id),
    amount       BIGINT CHECK (amount >= 0),
    percent_off  BIGINT CHECK (percent_off BETWEEN 0 AND 100),
    tiers        TEXT NOT NULL DEFAULT '[]',
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (company_id, product_id),
    CHECK ((amount IS NULL) <> (percent_off IS NULL))
);
