-- SQLite shape of migrations/postgres/0033_net_terms.sql: same tables, same names.

ALTER TABLE companies ADD COLUMN credit_outstanding BIGINT NOT NULL DEFAULT 0
    CHECK (credit_outstanding >= 0 AND credit_outstanding <= credit_limit);

CREATE TABLE invoices (
    id           BLOB PRIMARY KEY,
    number       INTEGER NOT NULL UNIQUE, -- set to max(number)+1 by the single writer
    company_id   BLOB NOT NULL REFERENCES companies(id),
    order_id     BLOB NOT NULL UNIQUE REFERENCES orders(id),
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    currency     TEXT NOT NULL,
    paid_amount  BIGINT NOT NULL DEFAULT 0 CHECK (paid_amount >= 0 AND paid_amount <= amount),
    status       TEXT NOT NULL,
    due_at       BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX invoices_company_open ON invoices(company_id, due_at) WHERE status = 'open';

ALTER TABLE orders ADD COLUMN invoice_id BLOB;
