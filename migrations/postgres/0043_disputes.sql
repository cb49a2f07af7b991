-- Disputes (chargebacks) tied to orders: the dispute Stripe reported last, where it stands
-- ('open', 'won' or 'lost'), and the status the order had before it was put on hold, so a won
-- dispute gives it back.
ALTER TABLE orders ADD COLUMN dispute_id TEXT;
ALTER TABLE orders ADD COLUMN dispute_status TEXT;
ALTER TABLE orders ADD COLUMN status_before_dispute TEXT;
CREATE INDEX orders_disputed ON orders(updated_at) WHERE status = 'disputed';
