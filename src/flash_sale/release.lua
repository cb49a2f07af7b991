-- Hand back the units a checkout held: the hold and its token go together. Once per
-- checkout: a repeated release for the same checkout must not take away an admission the
-- customer was granted since, so the first release records the checkout and later ones do
-- nothing. -1 when the sale is not loaded.
--
-- KEYS[1] loaded, KEYS[2] holders, KEYS[3] tokens, KEYS[4] held, KEYS[7] released.
-- ARGV[1] customer, ARGV[2] checkout

if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
if redis.call('SADD', KEYS[7], ARGV[2]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
end
return 0
