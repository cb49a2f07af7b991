-- The checkout a start's Idempotency-Key created, written in the reservation's own
-- transaction: a retry after a crash between the commit and the stored answer finds it.
ALTER TABLE idempotency_keys ADD COLUMN checkout_id BLOB;
