-- Net terms on a credit limit: a company's buyer may complete a checkout on account. The order
-- is placed at once (units confirmed) and invoiced; the invoice's open balance counts against
-- the company's credit limit (`credit_outstanding`) until it is paid.

ALTER TABLE companies
    ADD COLUMN credit_outstanding BIGINT NOT NULL DEFAULT 0,
    -- The credit promise, enforced by the database as a last line of defence.
    ADD CONSTRAINT companies_credit_within_limit
        CHECK (credit_outstanding >= 0 AND credit_outstanding <= credit_limit);

CREATE TABLE invoices (
    id           UUID PRIMARY KEY,
    number       BIGSERIAL UNIQUE,
    company_id   UUID NOT NULL REFERENCES companies(id),
    order_id     UUID NOT NULL UNIQUE REFERENCES orders(id),
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    currency     TEXT NOT NULL,
    paid_amount  BIGINT NOT NULL DEFAULT 0 CHECK (paid_amount >= 0 AND paid_amount <= amount),
    -- open | paid
    status       TEXT NOT NULL,
    due_at       BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX invoices_company_open ON invoices(company_id, due_at) WHERE status = 'open';

ALTER TABLE orders ADD COLUMN invoice_id UUID;
