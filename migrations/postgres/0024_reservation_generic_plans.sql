-- The reservation functions' statements are planned once per connection and reused. Their
-- parameters are arrays; with PostgreSQL's default plan cache mode every call re-planned them
-- (a custom plan looked cheaper for each array), which a profile of checkout starts showed as a
-- fifth of the function's time. The statements look rows up by key, so the generic plan is
-- the one a custom plan would pick.
ALTER FUNCTION hf_lock_carts_and_products(UUID[], UUID[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION hf_reserve_checkouts(
    UUID[], UUID[], UUID[], UUID[], UUID[], BIGINT, BIGINT[], BIGINT[], TEXT[], BIGINT[], INT[],
    UUID[], TEXT[]
) SET plan_cache_mode = force_generic_plan;
