-- Where the order's refund stands as Stripe reports it: NULL (none asked), 'pending' (asked,
-- not settled: the order stays paid), 'failed' (Stripe did not give the money back: the order
-- stays paid, flagged for an operator) or 'succeeded'.
ALTER TABLE orders ADD COLUMN refund_status TEXT;
