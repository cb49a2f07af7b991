-- Cart writes, each one round trip. Changing a cart line: the cart lock, the product look-up,
-- the line's upsert or delete, the cart's stamp and the cart as it is now, in one call. Run as
-- separate statements this was eight round trips (BEGIN and COMMIT included) holding a pool
-- connection and the cart's row lock across all of them.
--
-- Cart writes commit without waiting for their WAL to reach the disk (synchronous_commit off
-- for their own transaction only): at the peak they are half of all commits, and a commit that
-- waits for the flush holds its pool connection meanwhile. No promise rests on a cart: what a
-- crash of PostgreSQL itself can lose is the last few hundred milliseconds of cart edits (the
-- shopper sees the cart without them), never a reservation, an order or a payment. Those commit
-- synchronously, and a synchronous commit flushes every earlier commit's WAL with its own, so a
-- checkout never rests on a cart line that could still be lost.
--
-- The cart row is locked (FOR UPDATE) exactly as before: a checkout starting at the same time
-- (hf_reserve_checkouts, which locks carts the same way) sees the lines either before or after
-- the change, never half of it.
--
-- `p_quantity` NULL removes the line (a SKU not in the catalogue removes nothing, as before).
-- Rows answered, `outcome` one of:
--   changed          one row per line of the cart, SKU order (`line_sku` NULL: no lines), with
--                    the cart's `cart_status`
--   cart_missing     no such cart of this customer
--   cart_status      the cart is not open; `cart_status` says what it is
--   product_missing  setting a line of a SKU that is not in the catalogue
-- A refusal changes nothing.
CREATE FUNCTION hf_change_cart_line(
    p_cart      UUID,
    p_customer  UUID,
    p_sku       TEXT,
    p_quantity  BIGINT,
    p_now       BIGINT
) RETURNS TABLE (
    outcome        TEXT,
    cart_status    TEXT,
    line_sku       TEXT,
    line_quantity  BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_status   TEXT;
    v_product  BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT c.status INTO v_status FROM carts c
    WHERE c.id = p_cart AND c.customer_id = p_customer
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'cart_missing'::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
        RETURN;
    END IF;
    IF v_status <> 'open' THEN
        RETURN QUERY SELECT 'cart_status'::TEXT, v_status, NULL::TEXT, NULL::BIGINT;
        RETURN;
    END IF;

    IF p_quantity IS NULL THEN
        DELETE FROM cart_lines l
        WHERE l.cart_id = p_cart
          AND l.product_id = (SELECT p.id FROM products p WHERE p.sku = p_sku);
    ELSE
        SELECT p.id INTO v_product FROM products p WHERE p.sku = p_sku;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'product_missing'::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
            RETURN;
        END IF;
        INSERT INTO cart_lines (cart_id, product_id, quantity)
        VALUES (p_cart, v_product, p_quantity)
        ON CONFLICT (cart_id, product_id) DO UPDATE SET quantity = EXCLUDED.quantity;
    END IF;
    UPDATE carts c SET updated_at = p_now WHERE c.id = p_cart;

    RETURN QUERY
        SELECT 'changed'::TEXT, v_status, p.sku, l.quantity
        FROM (SELECT 1) AS one
        LEFT JOIN (cart_lines l JOIN products p ON p.id = l.product_id) ON l.cart_id = p_cart
        ORDER BY p.sku;
END
$$;

-- A new, empty cart of this customer (its id chosen by the caller).
CREATE FUNCTION hf_create_cart(p_cart UUID, p_customer UUID, p_now BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO carts (id, customer_id, status, created_at, updated_at)
    VALUES (p_cart, p_customer, 'open', p_now, p_now);
END
$$;
