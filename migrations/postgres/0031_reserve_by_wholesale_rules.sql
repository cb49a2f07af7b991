-- The reservation of migration 0022 with wholesale rules and prices, decided in the same
-- all-or-nothing step that reserves the stock:
--
--   rules_changed  a line breaks its product's ordering rules as they are now (the rules may
--                  have changed since the line was set); details: [{sku, quantity,
--                  min_quantity, increment, max_quantity}] in product-id order, the caller
--                  names the rule (`OrderingRules::breach`). Checked after cart_empty, before
--                  anything else.
--
-- Every line is priced by `hf_unit_price` (the same rule as `domain::unit_price`): the buyer's
-- company price list, the product's volume tiers, the list price. The guard still checks the
-- list price read with the line (`list_price`), so an admin price change between pricing and
-- the guard starts over as before.

-- The amount of the tier `p_quantity` falls in: the largest min_quantity at or below it.
CREATE FUNCTION hf_tier_amount(p_tiers TEXT, p_quantity BIGINT)
RETURNS BIGINT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_tiers IS NULL OR p_tiers = '[]' THEN NULL ELSE (
        SELECT (t->>'amount')::BIGINT FROM jsonb_array_elements(p_tiers::JSONB) t
        WHERE (t->>'min_quantity')::BIGINT <= p_quantity
        ORDER BY (t->>'min_quantity')::BIGINT DESC LIMIT 1)
    END
$$;

-- A line's unit price: the company's tier, else the company's amount, else the product's
-- price at this quantity less the company's percentage (the discount rounded down).
CREATE FUNCTION hf_unit_price(p_list BIGINT, p_tiers TEXT, p_amount BIGINT, p_percent BIGINT,
                              p_company_tiers TEXT, p_quantity BIGINT)
RETURNS BIGINT LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(hf_tier_amount(p_company_tiers, p_quantity), p_amount,
                    b.base - floor(b.base::NUMERIC * coalesce(p_percent, 0) / 100)::BIGINT)
    FROM (SELECT coalesce(hf_tier_amount(p_tiers, p_quantity), p_list) AS base) b
$$;

CREATE OR REPLACE FUNCTION hf_reserve_checkouts(
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
    p_open_skus    TEXT[]
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
DECLARE
    v_locked     UUID[];
    v_first_pass INT := 1;
    v_sales      BIGINT;
    v_sale       UUID;
    v_sale_sku   TEXT;
    v_sale_units BIGINT;
    v_status     TEXT;
    v_lines      JSONB;
    v_broken     JSONB;
    v_company    UUID;
    v_short      JSONB;
    v_currencies BIGINT;
    v_currency   TEXT;
    v_total      NUMERIC;
    v_updated    BIGINT;
    v_row        checkouts%ROWTYPE;
BEGIN
    -- A batch locks all its carts and product rows up front, in id order. A single request
    -- first looks without locks: a refusal (sold out, cart not open, ...) read from a
    -- committed snapshot is true at that moment and takes no lock, writes nothing and needs
    -- no commit flush, so refused buyers do not queue on the hot row; only a request that
    -- looks like it fits takes the locks and is judged again under them.
    IF coalesce(cardinality(p_ids), 0) > 1 THEN
        v_locked := hf_lock_carts_and_products(p_carts, p_customers);
        v_first_pass := 2;
    END IF;

    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        idx := i - 1;
        outcome := NULL; details := NULL; id := NULL; customer_id := NULL; cart_id := NULL;
        order_id := NULL; state := NULL; total_amount := NULL; currency := NULL;
        expires_at := NULL; max_expires_at := NULL; created_at := NULL; attempt := NULL;
        payment_intent_id := NULL; client_secret := NULL; decline_code := NULL;
        payment_method := NULL; refund_due := NULL; flash_sale_id := NULL;
        flash_sale_units := NULL;

        FOR v_pass IN v_first_pass .. 2 LOOP
            IF v_pass = 2 AND v_first_pass = 1 THEN
                v_locked := hf_lock_carts_and_products(p_carts[i:i], p_customers[i:i]);
            END IF;
            SELECT c.status INTO v_status FROM carts c
            WHERE c.id = p_carts[i] AND c.customer_id = p_customers[i];
            IF NOT FOUND THEN
                outcome := 'cart_missing';
                EXIT;
            END IF;
            -- Under the locks, a cart that opened after they were taken is not ours to check
            -- out in this call (the plain path's answer: nothing to check out).
            IF v_status <> 'open' OR (v_pass = 2 AND NOT (p_carts[i] = ANY(v_locked))) THEN
                outcome := 'cart_status';
                details := to_jsonb(v_status)::TEXT;
                EXIT;
            END IF;

            SELECT c.company_id INTO v_company FROM customers c WHERE c.id = p_customers[i];
            SELECT jsonb_agg(jsonb_build_object(
                       'product_id', p.id, 'sku', p.sku, 'quantity', l.quantity,
                       'unit_price', x.unit_price, 'list_price', p.price_amount,
                       'currency', p.currency) ORDER BY p.id),
                   jsonb_agg(jsonb_build_object(
                       'sku', p.sku, 'requested', l.quantity, 'available', p.stock - p.reserved)
                       ORDER BY p.id) FILTER (WHERE p.stock - p.reserved < l.quantity),
                   jsonb_agg(jsonb_build_object(
                       'sku', p.sku, 'quantity', l.quantity, 'min_quantity', p.min_quantity,
                       'increment', p.increment, 'max_quantity', p.max_quantity) ORDER BY p.id)
                       FILTER (WHERE l.quantity < p.min_quantity OR l.quantity % p.increment <> 0
                               OR l.quantity > p.max_quantity),
                   count(DISTINCT p.currency),
                   min(p.currency),
                   sum(x.unit_price::NUMERIC * l.quantity)
            INTO v_lines, v_short, v_broken, v_currencies, v_currency, v_total
            FROM cart_lines l JOIN products p ON p.id = l.product_id
            LEFT JOIN company_prices cp ON cp.company_id = v_company AND cp.product_id = p.id
            CROSS JOIN LATERAL (SELECT hf_unit_price(p.price_amount, p.price_tiers, cp.amount,
                                                     cp.percent_off, cp.tiers, l.quantity)
                                       AS unit_price) x
            WHERE l.cart_id = p_carts[i];
            IF v_lines IS NULL THEN
                outcome := 'cart_empty';
                EXIT;
            END IF;
            -- The ordering rules as they are now: a line set under older rules is refused.
            IF v_broken IS NOT NULL THEN
                outcome := 'rules_changed';
                details := v_broken::TEXT;
                EXIT;
            END IF;
            IF v_currencies > 1 OR v_total > 9223372036854775807 THEN
                outcome := 'unpriceable';
                details := v_lines::TEXT;
                EXIT;
            END IF;
            -- The flash-sale line check: a sale SKU's line only with its admission, within
            -- the buyer's limit.
            SELECT count(DISTINCT o.id), (array_agg(o.id))[1], min(x.sku), sum(x.quantity)
            INTO v_sales, v_sale, v_sale_sku, v_sale_units
            FROM jsonb_to_recordset(v_lines) AS x(sku TEXT, quantity BIGINT)
            JOIN unnest(p_open_req, p_open_ids, p_open_skus) AS o(req, id, sku)
              ON o.req = i AND o.sku = x.sku;
            IF v_sales > 1 THEN
                outcome := 'one_sale_per_checkout';
                EXIT;
            END IF;
            IF v_sales = 1 AND p_sales[i] IS DISTINCT FROM v_sale THEN
                outcome := 'admission_required';
                EXIT;
            END IF;
            IF v_sales = 1 AND v_sale_units > p_sale_units[i] THEN
                outcome := 'flash_sale_limit';
                details := jsonb_build_object('sku', v_sale_sku, 'requested', v_sale_units,
                                              'limit', p_sale_units[i])::TEXT;
                EXIT;
            END IF;
            IF v_sales = 0 THEN
                v_sale := NULL;
                v_sale_units := 0;
            END IF;
            IF v_short IS NOT NULL THEN
                outcome := 'insufficient_stock';
                details := v_short::TEXT;
                EXIT;
            END IF;
        END LOOP;
        IF outcome IS NOT NULL THEN
            RETURN NEXT;
            CONTINUE;
        END IF;

        UPDATE carts SET status = 'checking_out', updated_at = p_now WHERE id = p_carts[i];
        INSERT INTO orders (id, customer_id, checkout_id, status, total_amount, currency,
                            created_at, updated_at)
        VALUES (p_order_ids[i], p_customers[i], p_ids[i], 'pending_payment', v_total,
                v_currency, p_now, p_now);
        INSERT INTO order_lines (order_id, product_id, sku, quantity, unit_price, line_total)
        SELECT p_order_ids[i], x.product_id, x.sku, x.quantity, x.unit_price,
               x.unit_price * x.quantity
        FROM jsonb_to_recordset(v_lines)
             AS x(product_id BIGINT, sku TEXT, quantity BIGINT, unit_price BIGINT);
        INSERT INTO checkouts (id, customer_id, cart_id, order_id, state, total_amount,
                               currency, expires_at, max_expires_at, created_at, updated_at,
                               flash_sale_id, flash_sale_units)
        VALUES (p_ids[i], p_customers[i], p_carts[i], p_order_ids[i], 'reserved', v_total,
                v_currency, p_expires[i], p_max_expires[i], p_now, p_now, v_sale, v_sale_units)
        RETURNING * INTO v_row;
        INSERT INTO reservations (checkout_id, product_id, quantity, status)
        SELECT p_ids[i], x.product_id, x.quantity, 'active'
        FROM jsonb_to_recordset(v_lines) AS x(product_id BIGINT, quantity BIGINT);

        -- The guard, last: the rows are locked, so it must match every line unless this
        -- transaction itself moved a price (a trigger) or a row is broken.
        UPDATE products p SET reserved = p.reserved + x.quantity
        FROM jsonb_to_recordset(v_lines)
             AS x(product_id BIGINT, quantity BIGINT, list_price BIGINT, currency TEXT)
        WHERE p.id = x.product_id AND p.stock - p.reserved >= x.quantity
          AND p.price_amount = x.list_price AND p.currency = x.currency;
        GET DIAGNOSTICS v_updated = ROW_COUNT;
        IF v_updated <> jsonb_array_length(v_lines) THEN
            IF EXISTS (SELECT 1 FROM products p
                       JOIN jsonb_to_recordset(v_lines)
                            AS x(product_id BIGINT, list_price BIGINT, currency TEXT)
                         ON p.id = x.product_id
                       WHERE p.price_amount <> x.list_price OR p.currency <> x.currency) THEN
                RAISE EXCEPTION 'a catalogue price moved while reserving' USING ERRCODE = 'HF001';
            END IF;
            RAISE EXCEPTION 'a guarded update matched % of % locked rows',
                v_updated, jsonb_array_length(v_lines) USING ERRCODE = 'HF002';
        END IF;

        -- The start's Idempotency-Key row names its checkout (IDEMPOTENCY_CREATED).
        IF p_keys[i] IS NOT NULL THEN
            UPDATE idempotency_keys SET checkout_id = p_ids[i]
            WHERE customer_id = p_customers[i] AND idem_key = p_keys[i] AND status_code IS NULL;
        END IF;

        outcome := 'reserved';
        id := v_row.id; customer_id := v_row.customer_id; cart_id := v_row.cart_id;
        order_id := v_row.order_id; state := v_row.state; total_amount := v_row.total_amount;
        currency := v_row.currency; expires_at := v_row.expires_at;
        max_expires_at := v_row.max_expires_at; created_at := v_row.created_at;
        attempt := v_row.attempt; payment_intent_id := v_row.payment_intent_id;
        client_secret := v_row.client_secret; decline_code := v_row.decline_code;
        payment_method := v_row.payment_method; refund_due := v_row.refund_due;
        flash_sale_id := v_row.flash_sale_id; flash_sale_units := v_row.flash_sale_units;
        RETURN NEXT;
    END LOOP;
END
$$;
