-- Hand back the unit a checkout held: the hold and its token go together. Once per checkout:
-- a repeated release for the same checkout must not take away an admission the customer was
-- granted since, so the first release records the checkout and later ones do nothing.
--
-- KEYS[1] holders (sorted set), KEYS[2] tokens (hash), KEYS[3] released (set of checkouts)
-- ARGV[1] customer, ARGV[2] checkout

if redis.call('SADD', KEYS[3], ARGV[2]) == 1 then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
end
return 0
