-- Load a sale from what the database records, unless it is loaded already (a concurrent
-- load won, or the keys were there all along): then nothing changes and 0 is returned.
-- Whatever partial keys are left (some evicted) are replaced as a whole. Returns 1 when
-- loaded here.
--
-- KEYS[1..8] loaded, holders, tokens, held, sold, bought, released, consumed.
-- ARGV: n, then n holders as (customer, expiry ms, units, token); m, then m paid checkouts
-- as (customer, checkout, units); r, then r refunded checkouts; e, then e ended checkouts.

if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
local i = 1
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
    local customer, expiry, units, token = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    i = i + 4
    redis.call('ZADD', KEYS[2], expiry, customer)
    redis.call('HSET', KEYS[3], customer, token)
    redis.call('HSET', KEYS[4], customer, units)
end
local sold = 0
local m = tonumber(ARGV[i]); i = i + 1
for _ = 1, m do
    local customer, checkout, units = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    redis.call('HSET', KEYS[8], checkout, units)
    redis.call('HINCRBY', KEYS[6], customer, units)
    sold = sold + tonumber(units)
end
redis.call('SET', KEYS[5], sold)
local r = tonumber(ARGV[i]); i = i + 1
for _ = 1, r do
    redis.call('HSET', KEYS[8], ARGV[i], 0)
    redis.call('SADD', KEYS[7], ARGV[i])
    i = i + 1
end
local e = tonumber(ARGV[i]); i = i + 1
for _ = 1, e do
    redis.call('SADD', KEYS[7], ARGV[i])
    i = i + 1
end
redis.call('SET', KEYS[1], 1)
return 1
