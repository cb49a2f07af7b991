-- The customer paid: the hold ends and the unit counts as sold, in one step so no admission
-- can see the unit as both free and sold. Counting once per buyer makes a repeated consume
-- (a retried webhook, a retried call after a timeout) harmless.
--
-- KEYS[1] holders (sorted set), KEYS[2] tokens (hash), KEYS[3] sold (counter),
-- KEYS[4] buyers (set)
-- ARGV[1] customer

redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('SADD', KEYS[4], ARGV[1]) == 1 then
    redis.call('INCR', KEYS[3])
end
return 0
