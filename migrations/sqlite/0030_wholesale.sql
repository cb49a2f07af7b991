-- SQLite shape of migrations/postgres/0030_wholesale.sql: same tables, same names.

CREATE TABLE companies (
    id                  BLOB PRIMARY KEY,
    name                TEXT NOT NULL,
    currency            TEXT NOT NULL,
    -- prepaid | net_15 | net_30 | net_60
    payment_terms       TEXT NOT NULL,
    credit_limit        BIGINT NOT NULL CHECK (credit_limit >= 0),
    po_number_required  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          BIGINT NOT NULL
);

ALTER TABLE customers ADD COLUMN company_id BLOB REFERENCES companies(id);
CREATE INDEX customers_company ON customers(company_id) WHERE company_id IS NOT NULL;

ALTER TABLE products ADD COLUMN min_quantity BIGINT NOT NULL DEFAULT 1 CHECK (min_quantity >= 1);
ALTER TABLE products ADD COLUMN increment BIGINT NOT NULL DEFAULT 1 CHECK (increment >= 1);
ALTER TABLE products ADD COLUMN max_quantity BIGINT
    CHECK (max_quantity IS NULL OR max_quantity >= min_quantity);
ALTER TABLE products ADD COLUMN price_tiers TEXT NOT NULL DEFAULT '[]';

CREATE TABLE company_prices (
    company_id   BLOB NOT NULL REFERENCES companies(id),
    product_id   INTEGER NOT NULL REFERENCES products(id),
    amount       BIGINT CHECK (amount >= 0),
    percent_off  BIGINT CHECK (percent_off BETWEEN 0 AND 100),
    tiers        TEXT NOT NULL DEFAULT '[]',
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (company_id, product_id),
    CHECK ((amount IS NULL) <> (percent_off IS NULL))
);
