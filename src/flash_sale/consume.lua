-- The checkout was paid: its hold ends and its units count as sold, to the sale and to the
-- buyer, in one step so no admission can see the units as both free and sold. Once per
-- checkout, so a repeated consume (a retried webhook, a retried call) is harmless. A checkout
-- released before its late payment gave its hold up then: the customer's hold now, if any, is
-- a newer admission and stays. -1 when the sale is not loaded.
--
-- KEYS[1] loaded, KEYS[2] holders, KEYS[3] tokens, KEYS[4] held, KEYS[5] sold, KEYS[6] bought,
-- KEYS[7] released, KEYS[8] consumed (checkout -> units counted, 0 once refunded).
-- ARGV[1] customer, ARGV[2] checkout, ARGV[3] units

if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
if redis.call('HSETNX', KEYS[8], ARGV[2], ARGV[3]) == 0 then
    return 0
end
if redis.call('SISMEMBER', KEYS[7], ARGV[2]) == 0 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
end
redis.call('INCRBY', KEYS[5], ARGV[3])
redis.call('HINCRBY', KEYS[6], ARGV[1], ARGV[3])
return 0
