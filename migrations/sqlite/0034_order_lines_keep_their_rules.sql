-- SQLite shape of migrations/postgres/0034_order_lines_keep_their_rules.sql: each order line
-- keeps the ordering rules its product had when it was reserved (the single writer makes the
-- trigger's read the reservation's own).

ALTER TABLE order_lines ADD COLUMN min_quantity BIGINT;
ALTER TABLE order_lines ADD COLUMN increment BIGINT;
ALTER TABLE order_lines ADD COLUMN max_quantity BIGINT;

CREATE TRIGGER order_lines_keep_rules AFTER INSERT ON order_lines
BEGIN
    UPDATE order_lines SET
        min_quantity = (SELECT min_quantity FROM products WHERE id = NEW.product_id),
        increment = (SELECT increment FROM products WHERE id = NEW.product_id),
        max_quantity = (SELECT max_quantity FROM products WHERE id = NEW.product_id)
    WHERE order_id = NEW.order_id AND product_id = NEW.product_id;
END;
