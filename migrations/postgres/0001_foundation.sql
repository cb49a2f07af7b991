-- Catalogue, customers, carts, checkouts, orders and reservations.
-- Times are milliseconds since the epoch (BIGINT), the same in both stores.

CREATE TABLE customers (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE products (
    id              BIGSERIAL PRIMARY KEY,
    sku             TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    price_amount    BIGINT NOT NULL CHECK (price_amount >= 0),
    currency        TEXT NOT NULL,
    stock           BIGINT NOT NULL,
    reserved        BIGINT NOT NULL DEFAULT 0,
    version         BIGINT NOT NULL DEFAULT 1,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    -- Promise 1, enforced by the database as a last line of defence.
    CONSTRAINT products_reserved_within_stock CHECK (reserved >= 0 AND reserved <= stock)
);

-- Every change of stock other than a sale: creation, admin edits. The audit adds these up.
CREATE TABLE stock_adjustments (
    id          BIGSERIAL PRIMARY KEY,
    product_id  BIGINT NOT NULL REFERENCES products(id),
    actor       TEXT NOT NULL,
    old_stock   BIGINT NOT NULL,
    new_stock   BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    at          BIGINT NOT NULL
);
CREATE INDEX stock_adjustments_product ON stock_adjustments(product_id);

CREATE TABLE carts (
    id           UUID PRIMARY KEY,
    customer_id  UUID NOT NULL REFERENCES customers(id),
    status       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX carts_customer ON carts(customer_id);

CREATE TABLE cart_lines (
    cart_id     UUID NOT NULL REFERENCES carts(id),
    product_id  BIGINT NOT NULL REFERENCES products(id),
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (cart_id, product_id)
);

CREATE TABLE orders (
    id                 UUID PRIMARY KEY,
    seq                BIGSERIAL UNIQUE,
    customer_id        UUID NOT NULL REFERENCES customers(id),
    checkout_id        UUID NOT NULL UNIQUE,
    status             TEXT NOT NULL,
    total_amount       BIGINT NOT NULL,
    currency           TEXT NOT NULL,
    payment_intent_id  TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX orders_customer ON orders(customer_id, seq);

CREATE TABLE order_lines (
    order_id     UUID NOT NULL REFERENCES orders(id),
    product_id   BIGINT NOT NULL REFERENCES products(id),
    sku          TEXT NOT NULL,
    quantity     BIGINT NOT NULL,
    unit_price   BIGINT NOT NULL,
    line_total   BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

CREATE TABLE checkouts (
    id                 UUID PRIMARY KEY,
    customer_id        UUID NOT NULL REFERENCES customers(id),
    cart_id            UUID NOT NULL REFERENCES carts(id),
    order_id           UUID NOT NULL REFERENCES orders(id),
    state              TEXT NOT NULL,
    total_amount       BIGINT NOT NULL,
    currency           TEXT NOT NULL,
    expires_at         BIGINT NOT NULL,
    max_expires_at     BIGINT NOT NULL,
    attempt            INTEGER NOT NULL DEFAULT 0,
    payment_intent_id  TEXT,
    client_secret      TEXT,
    decline_code       TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX checkouts_reserved_expiry ON checkouts(expires_at) WHERE state = 'reserved';
-- At most one live checkout per cart.
CREATE UNIQUE INDEX checkouts_one_live_per_cart ON checkouts(cart_id)
    WHERE state IN ('reserved', 'charging', 'requires_action');

CREATE TABLE reservations (
    checkout_id  UUID NOT NULL REFERENCES checkouts(id),
    product_id   BIGINT NOT NULL REFERENCES products(id),
    quantity     BIGINT NOT NULL CHECK (quantity > 0),
    -- active | committing | confirmed | released
    status       TEXT NOT NULL,
    PRIMARY KEY (checkout_id, product_id)
);
CREATE INDEX reservations_product_status ON reservations(product_id, status);
