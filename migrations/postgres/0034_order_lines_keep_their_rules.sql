-- Every order line keeps the ordering rules its product had when the line was reserved, so the
-- audit can check that no line was ever sold outside the rules in force at that moment (rules
-- change later without making old orders wrong). The reservation holds the product row locked
-- while it inserts the line, so the rules read here are the ones it judged the line by.
-- Lines written before this migration keep NULL rules (not known, not audited).

ALTER TABLE order_lines
    ADD COLUMN min_quantity BIGINT,
    ADD COLUMN increment BIGINT,
    ADD COLUMN max_quantity BIGINT;

CREATE FUNCTION holdfast_order_line_rules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT p.min_quantity, p.increment, p.max_quantity
    INTO NEW.min_quantity, NEW.increment, NEW.max_quantity
    FROM products p WHERE p.id = NEW.product_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER order_lines_keep_rules
    BEFORE INSERT ON order_lines
    FOR EACH ROW EXECUTE FUNCTION holdfast_order_line_rules();
