-- Authorize at checkout, capture at shipment. The capture method is decided once per checkout
-- when it starts and kept with it ('automatic': charged at checkout; 'manual': authorized at
-- checkout, captured by the shipments).
ALTER TABLE checkouts ADD COLUMN capture_method TEXT NOT NULL DEFAULT 'automatic';
-- The order's money in minor units: authorized_amount stays NULL for an order charged at
-- checkout; captured_amount is what shipments captured; refunded_amount what partial refunds
-- gave back.
ALTER TABLE orders ADD COLUMN authorized_amount BIGINT;
ALTER TABLE orders ADD COLUMN captured_amount BIGINT NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN refunded_amount BIGINT NOT NULL DEFAULT 0;
