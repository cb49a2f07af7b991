-- Partial refunds by line. Per order line: units refunded (held as soon as the refund is
-- asked for, given back if Stripe fails it) and units restocked (at most the refunded ones).
ALTER TABLE order_lines ADD COLUMN refunded BIGINT NOT NULL DEFAULT 0;
ALTER TABLE order_lines ADD COLUMN restocked BIGINT NOT NULL DEFAULT 0;

-- One row per partial refund, written before its gateway call with its idempotency key
-- ('requested'), then 'pending', 'succeeded' or 'failed' as Stripe answers; recovery repeats
-- a 'requested' one whose lease ran out. A succeeded one counts in orders.refunded_amount.
CREATE TABLE order_refunds (
    id                 BLOB PRIMARY KEY,
    order_id           BLOB NOT NULL REFERENCES orders(id),
    amount             BIGINT NOT NULL CHECK (amount > 0),
    -- JSON [{sku, quantity}] with each line's product id
    lines              TEXT NOT NULL,
    restock            BOOLEAN NOT NULL,
    status             TEXT NOT NULL,
    refund_key         TEXT NOT NULL UNIQUE,
    gateway_refund_id  TEXT UNIQUE,
    lease_until        BIGINT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX order_refunds_order ON order_refunds(order_id, created_at);
CREATE INDEX order_refunds_requested ON order_refunds(lease_until) WHERE status = 'requested';
