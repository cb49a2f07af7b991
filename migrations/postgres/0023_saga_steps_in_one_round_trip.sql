-- Every other step a buyer waits on in one round trip: cancelling a checkout, starting its
-- charge and recording the charge's outcome (success, decline, requires_action). Each is one
-- server-side function run in autocommit: the checkout row is locked, its state decides, and
-- every write of the step follows inside the server, so the row (and a success's product rows)
-- is locked for a few statements and the commit, not for client round trips.
--
-- The functions answer the checkout row as it stands after the step (`checkouts`' columns).
-- A step that cannot run raises, writing nothing:
--   HF010  no such checkout (of this customer, where one is named)
--   HF011  the checkout's reservation expired
--   HF012  the checkout is in a state the step does not start from; message: that state
--   HF013  a charge of this checkout is in progress (its lease has not run out)

-- Ends these checkouts' active reservations, products in id order: `released` gives their
-- units back, `confirmed` sells them (they leave `reserved` and `stock` together). Answers the
-- units.
CREATE FUNCTION hf_end_reservations(p_checkouts UUID[], p_status TEXT)
RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    v_products BIGINT[];
    v_units    BIGINT[];
BEGIN
    WITH released AS (
        UPDATE reservations SET status = p_status
        WHERE checkout_id = ANY(p_checkouts) AND status = 'active'
        RETURNING product_id, quantity
    ), per_product AS (
        SELECT product_id, sum(quantity)::BIGINT AS units FROM released GROUP BY product_id
    )
    SELECT array_agg(product_id ORDER BY product_id), array_agg(units ORDER BY product_id)
    INTO v_products, v_units FROM per_product;
    FOR i IN 1 .. coalesce(cardinality(v_products), 0) LOOP
        IF p_status = 'confirmed' THEN
            UPDATE products SET stock = stock - v_units[i], reserved = reserved - v_units[i]
            WHERE id = v_products[i];
        ELSE
            UPDATE products SET reserved = reserved - v_units[i] WHERE id = v_products[i];
        END IF;
    END LOOP;
    RETURN coalesce((SELECT sum(u) FROM unnest(v_units) u), 0);
END
$$;

-- A late success for units already given back: takes them again if every line is still
-- available (locked in product-id order), else leaves everything as it was.
CREATE FUNCTION hf_reserve_again_and_confirm(p_checkout UUID)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    v_short BIGINT;
    v_line  RECORD;
BEGIN
    PERFORM 1 FROM products p
    WHERE p.id IN (SELECT r.product_id FROM reservations r
                   WHERE r.checkout_id = p_checkout AND r.status = 'released')
    ORDER BY p.id FOR UPDATE;
    SELECT count(*) INTO v_short
    FROM (SELECT product_id, sum(quantity) AS wanted FROM reservations
          WHERE checkout_id = p_checkout AND status = 'released' GROUP BY product_id) w
    JOIN products p ON p.id = w.product_id
    WHERE w.wanted > p.stock - p.reserved;
    IF v_short > 0 THEN
        RETURN FALSE;
    END IF;
    FOR v_line IN
        SELECT product_id, sum(quantity)::BIGINT AS units FROM reservations
        WHERE checkout_id = p_checkout AND status = 'released'
        GROUP BY product_id ORDER BY product_id
    LOOP
        UPDATE products SET stock = stock - v_line.units WHERE id = v_line.product_id;
    END LOOP;
    UPDATE reservations SET status = 'confirmed'
    WHERE checkout_id = p_checkout AND status = 'released';
    RETURN TRUE;
END
$$;

-- The checkout, locked; HF010 when there is none (of `p_customer`, when one is named).
CREATE FUNCTION hf_lock_checkout(p_id UUID, p_customer UUID)
RETURNS checkouts LANGUAGE plpgsql AS $$
DECLARE
    v_row checkouts%ROWTYPE;
BEGIN
    SELECT * INTO v_row FROM checkouts c
    WHERE c.id = p_id AND (p_customer IS NULL OR c.customer_id = p_customer) FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'checkout' USING ERRCODE = 'HF010';
    END IF;
    RETURN v_row;
END
$$;

-- The buyer cancels a reserved checkout: its units go back, its order is cancelled and its
-- cart may be checked out again. A cancelled checkout answers as it is; any other state HF012.
CREATE FUNCTION hf_cancel_checkout(p_id UUID, p_customer UUID, p_now BIGINT)
RETURNS SETOF checkouts LANGUAGE plpgsql AS $$
DECLARE
    v_row checkouts%ROWTYPE;
BEGIN
    v_row := hf_lock_checkout(p_id, p_customer);
    IF v_row.state = 'cancelled' THEN
        RETURN NEXT v_row;
        RETURN;
    ELSIF v_row.state <> 'reserved' THEN
        RAISE EXCEPTION '%', v_row.state USING ERRCODE = 'HF012';
    END IF;
    PERFORM hf_end_reservations(ARRAY[p_id], 'released');
    UPDATE checkouts SET state = 'cancelled', updated_at = p_now WHERE id = p_id
    RETURNING * INTO v_row;
    UPDATE orders SET status = 'cancelled', updated_at = p_now
    WHERE id = v_row.order_id AND status = 'pending_payment';
    UPDATE carts SET status = 'open', updated_at = p_now
    WHERE id = v_row.cart_id AND status = 'checking_out';
    RETURN NEXT v_row;
END
$$;

-- Starts (or, after its holder's lease ran out, takes over) the charge of a checkout under a
-- lease. `opens_attempt`: this call opened a new attempt (the checkout was reserved).
CREATE FUNCTION hf_begin_charge(
    p_id UUID, p_customer UUID, p_method TEXT, p_now BIGINT, p_owner TEXT, p_until BIGINT,
    OUT opens_attempt BOOLEAN, OUT ck checkouts
) LANGUAGE plpgsql AS $$
BEGIN
    ck := hf_lock_checkout(p_id, p_customer);
    IF (ck.state = 'reserved' AND ck.expires_at <= p_now) OR ck.state = 'expired' THEN
        RAISE EXCEPTION 'expired' USING ERRCODE = 'HF011';
    ELSIF ck.state = 'reserved' THEN
        UPDATE checkouts SET state = 'charging', attempt = attempt + 1,
            payment_method = p_method, charge_started_at = p_now, lease_owner = p_owner,
            lease_until = p_until, updated_at = p_now
        WHERE id = p_id RETURNING * INTO ck;
        opens_attempt := TRUE;
    ELSIF ck.state = 'charging' AND ck.lease_until > p_now THEN
        RAISE EXCEPTION 'charge in progress' USING ERRCODE = 'HF013';
    ELSIF ck.state = 'charging' THEN
        UPDATE checkouts SET lease_owner = p_owner, lease_until = p_until
        WHERE id = p_id RETURNING * INTO ck;
        opens_attempt := FALSE;
    ELSE
        RAISE EXCEPTION '%', ck.state USING ERRCODE = 'HF012';
    END IF;
END
$$;

-- The payment succeeded: the units are sold (or, given back meanwhile, taken again; if they
-- are gone the money is due back), the order is paid, the cart checked out and `order.paid`
-- written to the outbox with `p_event_id`. Completed and refunded checkouts, and one whose
-- money is already due back, answer as they are.
CREATE FUNCTION hf_record_charge_succeeded(
    p_id UUID, p_intent TEXT, p_now BIGINT, p_event_id UUID, p_paid_at TEXT
) RETURNS SETOF checkouts LANGUAGE plpgsql AS $$
DECLARE
    v_row checkouts%ROWTYPE;
BEGIN
    v_row := hf_lock_checkout(p_id, NULL);
    IF v_row.state IN ('completed', 'refunded') THEN
        RETURN NEXT v_row;
        RETURN;
    ELSIF v_row.state IN ('reserved', 'charging', 'requires_action') THEN
        PERFORM hf_end_reservations(ARRAY[p_id], 'confirmed');
    ELSIF v_row.refund_due THEN
        RETURN NEXT v_row;
        RETURN;
    ELSIF NOT hf_reserve_again_and_confirm(p_id) THEN
        UPDATE checkouts SET refund_due = TRUE, payment_intent_id = p_intent,
            lease_owner = NULL, lease_until = p_now, updated_at = p_now
        WHERE id = p_id RETURNING * INTO v_row;
        RETURN NEXT v_row;
        RETURN;
    END IF;
    UPDATE orders SET status = 'paid', payment_intent_id = p_intent, updated_at = p_now
    WHERE id = v_row.order_id;
    UPDATE carts SET status = 'checked_out', updated_at = p_now WHERE id = v_row.cart_id;
    UPDATE checkouts SET state = 'completed', payment_intent_id = p_intent, lease_owner = NULL,
        lease_until = NULL, updated_at = p_now
    WHERE id = p_id RETURNING * INTO v_row;
    INSERT INTO outbox (event_id, topic, order_id, payload, created_at)
    VALUES (p_event_id, 'order.paid', v_row.order_id, jsonb_build_object(
        'event_id', p_event_id,
        'order_id', v_row.order_id,
        'customer_id', v_row.customer_id,
        'checkout_id', v_row.id,
        'total', jsonb_build_object('amount', v_row.total_amount, 'currency', v_row.currency),
        'lines', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'sku', ol.sku,
                'quantity', ol.quantity,
                'unit_price', jsonb_build_object('amount', ol.unit_price, 'currency', o.currency),
                'line_total', jsonb_build_object('amount', ol.line_total, 'currency', o.currency)
            ) ORDER BY ol.sku)
            FROM order_lines ol JOIN orders o ON o.id = ol.order_id WHERE o.id = v_row.order_id
        ), '[]'::JSONB),
        'payment_intent_id', p_intent,
        'paid_at', p_paid_at
    )::TEXT, p_now)
    ON CONFLICT (topic, order_id) DO NOTHING;
    RETURN NEXT v_row;
END
$$;

-- The payment was declined: a charging (or authenticating) checkout gives its units back,
-- its order fails and its cart may be checked out again. Any other state answers as it is.
CREATE FUNCTION hf_record_charge_declined(
    p_id UUID, p_intent TEXT, p_code TEXT, p_now BIGINT
) RETURNS SETOF checkouts LANGUAGE plpgsql AS $$
DECLARE
    v_row checkouts%ROWTYPE;
BEGIN
    v_row := hf_lock_checkout(p_id, NULL);
    IF v_row.state NOT IN ('charging', 'requires_action') THEN
        RETURN NEXT v_row;
        RETURN;
    END IF;
    PERFORM hf_end_reservations(ARRAY[p_id], 'released');
    UPDATE checkouts SET state = 'payment_failed', decline_code = p_code,
        payment_intent_id = COALESCE(p_intent, payment_intent_id), lease_owner = NULL,
        lease_until = NULL, updated_at = p_now
    WHERE id = p_id RETURNING * INTO v_row;
    UPDATE orders SET status = 'payment_failed', updated_at = p_now
    WHERE id = v_row.order_id AND status IN ('pending_payment', 'payment_processing');
    UPDATE carts SET status = 'open', updated_at = p_now
    WHERE id = v_row.cart_id AND status = 'checking_out';
    RETURN NEXT v_row;
END
$$;

-- The payment needs the buyer's authentication: a charging checkout waits for it under a
-- new lease and its order is processing. Any other state answers as it is.
CREATE FUNCTION hf_record_requires_action(
    p_id UUID, p_intent TEXT, p_secret TEXT, p_owner TEXT, p_until BIGINT, p_now BIGINT
) RETURNS SETOF checkouts LANGUAGE plpgsql AS $$
DECLARE
    v_row checkouts%ROWTYPE;
BEGIN
    v_row := hf_lock_checkout(p_id, NULL);
    IF v_row.state <> 'charging' THEN
        RETURN NEXT v_row;
        RETURN;
    END IF;
    UPDATE checkouts SET state = 'requires_action', payment_intent_id = p_intent,
        client_secret = p_secret, lease_owner = p_owner, lease_until = p_until,
        updated_at = p_now
    WHERE id = p_id RETURNING * INTO v_row;
    UPDATE orders SET status = 'payment_processing', payment_intent_id = p_intent,
        updated_at = p_now
    WHERE id = v_row.order_id AND status = 'pending_payment';
    RETURN NEXT v_row;
END
$$;
