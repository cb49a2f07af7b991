-- Every admin change to a product (a new product, or a change to its name, price or stock,
-- which always bumps `version`) is announced on the `holdfast_products` channel, so each
-- instance's in-memory catalogue reloads within milliseconds of another instance's edit.
-- One notification per statement (and PostgreSQL folds equal ones within a transaction).
--
-- Reservations, releases and confirmations (`reserved`, and `stock` at payment) do not
-- notify: a transaction that has sent NOTIFY takes a database-wide lock while it commits,
-- which would serialise every reservation's commit. Availability they move reaches other
-- instances through the catalogue's periodic reload (its staleness bound), and this
-- instance's own writes reload it directly.
CREATE FUNCTION holdfast_products_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('holdfast_products', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER products_changed
    AFTER INSERT OR DELETE OR UPDATE OF version ON products
    FOR EACH STATEMENT EXECUTE FUNCTION holdfast_products_changed();
