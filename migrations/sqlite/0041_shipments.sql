-- Shipments capture what they ship (manual capture). Per order line: units shipped, units
-- that will not ship (short: released back to stock, never captured).
ALTER TABLE order_lines ADD COLUMN shipped BIGINT NOT NULL DEFAULT 0;
ALTER TABLE order_lines ADD COLUMN short BIGINT NOT NULL DEFAULT 0;

-- One row per shipment, written before its capture call with the capture's idempotency key
-- ('capturing'), and settled after it ('captured', or 'failed' when the gateway refused).
-- A 'capturing' row whose lease ran out is finished by recovery with the same key.
CREATE TABLE shipments (
    id             BLOB PRIMARY KEY,
    order_id       BLOB NOT NULL REFERENCES orders(id),
    seq            INTEGER NOT NULL,
    -- What this shipment captures, in minor units of the order's currency (0: nothing
    -- shipped, only short lines closed: the rest of the authorization is released).
    amount         BIGINT NOT NULL CHECK (amount >= 0),
    -- The last shipment of the order: the rest of the authorization is released.
    final_capture  BOOLEAN NOT NULL,
    status         TEXT NOT NULL,
    capture_key    TEXT NOT NULL UNIQUE,
    -- JSON [{sku, quantity, short}]
    lines          TEXT NOT NULL,
    failure        TEXT,
    lease_until    BIGINT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    UNIQUE (order_id, seq)
);
CREATE INDEX shipments_capturing ON shipments(lease_until) WHERE status = 'capturing';

-- When the card was authorized: the authorization worker settles an order before the card
-- network lets its authorization lapse.
ALTER TABLE orders ADD COLUMN authorized_at BIGINT;
CREATE INDEX orders_authorized ON orders(authorized_at)
    WHERE status IN ('authorized', 'partially_fulfilled');
