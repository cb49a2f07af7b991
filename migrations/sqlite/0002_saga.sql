-- SQLite shape of migrations/postgres/0002_saga.sql: same tables, same names.
-- The checkout saga: charge attempts and leases on checkouts, verified webhook events,
-- edge idempotency keys, and the transactional outbox with its two consumers' records.

ALTER TABLE checkouts ADD COLUMN payment_method TEXT;
-- The instance driving a charge holds the checkout until lease_until; the recovery worker
-- takes over checkouts whose lease ran out.
ALTER TABLE checkouts ADD COLUMN lease_owner TEXT;
ALTER TABLE checkouts ADD COLUMN lease_until BIGINT;
ALTER TABLE checkouts ADD COLUMN charge_started_at BIGINT;
-- A success that arrived after the units were given back and could not be re-reserved:
-- the money must go back (promise 4).
ALTER TABLE checkouts ADD COLUMN refund_due BOOLEAN NOT NULL DEFAULT 0;
ALTER TABLE checkouts ADD COLUMN refund_id TEXT;
CREATE INDEX checkouts_in_flight ON checkouts(state, lease_until)
    WHERE state IN ('charging', 'requires_action');

-- Stripe events, deduplicated by id; answered 2xx only once recorded.
CREATE TABLE webhook_events (
    event_id           TEXT PRIMARY KEY,
    event_type         TEXT NOT NULL,
    payment_intent_id  TEXT,
    received_at        BIGINT NOT NULL
);

-- Idempotency-Key at the edge (DESIGN §4): scoped to the customer, 24 h.
CREATE TABLE idempotency_keys (
    customer_id    BLOB NOT NULL,
    idem_key       TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    -- NULL while the first request is in flight.
    status_code    INTEGER,
    response_body  TEXT,
    locked_until   BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (customer_id, idem_key)
);

-- Transactional outbox: the order.paid row is written in the transaction that marks the
-- order paid, and at most one per order and topic (promise 5).
CREATE TABLE outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       BLOB NOT NULL UNIQUE,
    topic          TEXT NOT NULL,
    order_id       BLOB NOT NULL,
    payload        TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    claimed_until  BIGINT,
    published_at   BIGINT,
    CONSTRAINT outbox_one_event_per_order UNIQUE (topic, order_id)
);
CREATE INDEX outbox_unpublished ON outbox(id) WHERE published_at IS NULL;

-- What the two shipped consumers did, each deduplicated by event id.
CREATE TABLE warehouse_allocations (
    event_id    BLOB PRIMARY KEY,
    order_id    BLOB NOT NULL,
    lines       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE notifications (
    event_id     BLOB PRIMARY KEY,
    customer_id  BLOB NOT NULL,
    order_id     BLOB NOT NULL,
    message      TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
