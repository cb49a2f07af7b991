-- The capture-method wrapper of migration 0040 over the reservation of migration 0032, which
-- takes each request's purchase-order number: the wrapper takes them too and passes them on.
DROP FUNCTION hf_reserve_checkouts_captured(UUID[], UUID[], UUID[], UUID[], UUID[], BIGINT,
    BIGINT[], BIGINT[], TEXT[], BIGINT[], INT[], UUID[], TEXT[], TEXT[]);

CREATE FUNCTION hf_reserve_checkouts_captured(
    p_ids          UUID[],
    p_order_ids    UUID[],
    p_customers    UUID[],
    p_carts        UUID[],
    p_sales        UUID[],
    p_now          BIGINT,
    p_expires      BIGINT[],
    p_max_expires  BIGINT[],
    p_keys         TEXT[],
    p_sale_units   BIGINT[],
    p_open_req     INT[],
    p_open_ids     UUID[],
    p_open_skus    TEXT[],
    p_po_numbers   TEXT[],
    p_capture      TEXT[]
) RETURNS TABLE (
    idx                INT,
    outcome            TEXT,
    details            TEXT,
    id                 UUID,
    customer_id        UUID,
    cart_id            UUID,
    order_id           UUID,
    state              TEXT,
    total_amount       BIGINT,
    currency           TEXT,
    expires_at         BIGINT,
    max_expires_at     BIGINT,
    created_at         BIGINT,
    attempt            INTEGER,
    payment_intent_id  TEXT,
    client_secret      TEXT,
    decline_code       TEXT,
    payment_method     TEXT,
    refund_due         BOOLEAN,
    flash_sale_id      UUID,
    flash_sale_units   BIGINT
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT * FROM hf_reserve_checkouts(p_ids, p_order_ids, p_customers, p_carts,
        p_sales, p_now, p_expires, p_max_expires, p_keys, p_sale_units, p_open_req, p_open_ids,
        p_open_skus, p_po_numbers);
    -- Ids are fresh per request: a row with one of them exists only if this call reserved it.
    IF 'manual' = ANY(p_capture) THEN
        UPDATE checkouts c SET capture_method = m.method
        FROM unnest(p_ids, p_capture) AS m(checkout, method)
        WHERE c.id = m.checkout AND m.method <> 'automatic';
    END IF;
END
$$;

ALTER FUNCTION hf_reserve_checkouts_captured(
    UUID[], UUID[], UUID[], UUID[], UUID[], BIGINT, BIGINT[], BIGINT[], TEXT[], BIGINT[], INT[],
    UUID[], TEXT[], TEXT[], TEXT[]
) SET plan_cache_mode = force_generic_plan;
