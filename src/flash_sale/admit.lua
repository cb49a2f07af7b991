-- Admit one buyer to a flash sale, atomically (DESIGN §5). Redis runs a script without
-- interleaving other commands, so the count and the grant below cannot race. Counts are in
-- units of the sale's SKU; a new admission holds one unit until `claim` resizes it.
--
-- KEYS: see keys.lua in redis.rs (loaded, holders, tokens, held, sold, bought, released,
-- consumed). ARGV[1] now (ms), ARGV[2] expiry of a new hold (ms), ARGV[3] units,
-- ARGV[4] units per buyer, ARGV[5] customer, ARGV[6] token to grant if admitted now;
-- optionally KEYS[9] the customer's request budget, ARGV[7] ms per request, ARGV[8] burst:
-- one request is taken from it first (`take_budget`, the shared rate limit's own script,
-- prepended by redis.rs), and over budget the answer is {-2, '', ms to wait}, nothing changed.
--
-- Returns {1, token, expiry} granted now, {2, token, expiry} already a holder,
-- {0, "", 0} sold out, {-1, "", 0} the sale is not loaded, {-2, "", ms} over budget. Times are passed and stored as
-- the caller's decimal strings so no precision is lost to Lua's number formatting.

local loaded, holders, tokens, held, sold_key, bought = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
    KEYS[5], KEYS[6]
if redis.call('EXISTS', loaded) == 0 then
    return {-1, '', 0}
end
if KEYS[9] then
    local wait = take_budget({KEYS[9]}, {ARGV[7], ARGV[8]})
    if wait > 0 then
        return {-2, '', wait}
    end
end
local now, expiry, units, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local customer, candidate = ARGV[5], ARGV[6]

-- A hold is live while now < expiry: drop every hold that ended at or before now.
local lapsed = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
if #lapsed > 0 then
    for _, who in ipairs(lapsed) do
        redis.call('HDEL', tokens, who)
        redis.call('HDEL', held, who)
    end
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
end

local at = redis.call('ZSCORE', holders, customer)
if at then
    local token = redis.call('HGET', tokens, customer)
    if token then
        return {2, token, tonumber(at)}
    end
    -- A hold without its token cannot be checked by anyone; drop it and decide afresh.
    redis.call('ZREM', holders, customer)
    redis.call('HDEL', held, customer)
end

if tonumber(redis.call('HGET', bought, customer) or '0') >= limit then
    return {0, '', 0}
end

-- Every remaining holder is live: the units they hold.
local taken = tonumber(redis.call('GET', sold_key) or '0')
for _, n in ipairs(redis.call('HVALS', held)) do
    taken = taken + tonumber(n)
end
if taken >= units then
    return {0, '', 0}
end

redis.call('ZADD', holders, expiry, customer)
redis.call('HSET', tokens, customer, candidate)
redis.call('HSET', held, customer, 1)
return {1, candidate, tonumber(expiry)}
