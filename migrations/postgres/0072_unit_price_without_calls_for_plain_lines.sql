-- `hf_unit_price` (migration 0031) as one expression PostgreSQL inlines into the reservation's
-- pricing statement, with the same result: a line without volume tiers and without a company
-- price is priced at the list price without calling `hf_tier_amount`, whose JSON parsing was,
-- per call, most of the cost of pricing a retail cart (measured with `track_functions`: 8 calls
-- of the old function per checkout, a third of the reservation's time).
CREATE OR REPLACE FUNCTION hf_unit_price(p_list BIGINT, p_tiers TEXT, p_amount BIGINT,
                                         p_percent BIGINT, p_company_tiers TEXT,
                                         p_quantity BIGINT)
RETURNS BIGINT LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(
        CASE WHEN p_company_tiers IS NULL OR p_company_tiers = '[]' THEN NULL
             ELSE hf_tier_amount(p_company_tiers, p_quantity) END,
        p_amount,
        CASE WHEN p_tiers IS NULL OR p_tiers = '[]' THEN p_list
             ELSE coalesce(hf_tier_amount(p_tiers, p_quantity), p_list) END
        - CASE WHEN p_percent IS NULL OR p_percent = 0 THEN 0
               ELSE floor((CASE WHEN p_tiers IS NULL OR p_tiers = '[]' THEN p_list
                                ELSE coalesce(hf_tier_amount(p_tiers, p_quantity), p_list)
                           END)::NUMERIC * p_percent / 100)::BIGINT END)
$$;
