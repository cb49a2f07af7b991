-- Every change to products is announced on the `holdfast_products` channel, so each
-- instance's in-memory catalogue reloads within milliseconds of another instance's write.
-- One notification per statement (and PostgreSQL folds equal ones within a transaction).
CREATE FUNCTION holdfast_products_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('holdfast_products', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER products_changed
    AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION holdfast_products_changed();
