-- SQLite shape of migrations/postgres/0032_purchase_order_numbers.sql: an order keeps the
-- purchase-order number its checkout carried.

ALTER TABLE orders ADD COLUMN po_number TEXT;
