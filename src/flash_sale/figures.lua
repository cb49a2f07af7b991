-- Live holders at ARGV[1] (ms) and units sold, read together.
--
-- KEYS[1] holders (sorted set, customer -> expiry ms), KEYS[2] sold (counter)
-- ARGV[1] now (ms)

local live = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')
local sold = tonumber(redis.call('GET', KEYS[2]) or '0')
return {live, sold}
