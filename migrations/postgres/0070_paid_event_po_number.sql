-- The `order.paid` event of a card payment carries the order's purchase-order number when it
-- has one, as the event of an order on account does; otherwise as in migration 0023.
CREATE OR REPLACE FUNCTION hf_record_charge_succeeded(
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
    VALUES (p_event_id, 'order.paid', v_row.order_id, (jsonb_build_object(
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
    ) || coalesce((
        SELECT jsonb_build_object('po_number', o.po_number)
        FROM orders o WHERE o.id = v_row.order_id AND o.po_number IS NOT NULL
    ), '{}'::JSONB))::TEXT, p_now)
    ON CONFLICT (topic, order_id) DO NOTHING;
    RETURN NEXT v_row;
END
$$;

-- The reservation of migration 0032 runs on generic plans, as migration 0024 set for the
-- reservation it replaced (a dropped function loses its settings).
ALTER FUNCTION hf_reserve_checkouts(
    UUID[], UUID[], UUID[], UUID[], UUID[], BIGINT, BIGINT[], BIGINT[], TEXT[], BIGINT[], INT[],
    UUID[], TEXT[], TEXT[]
) SET plan_cache_mode = force_generic_plan;
