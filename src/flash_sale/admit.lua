-- Admit one buyer to a flash sale, atomically (DESIGN §5). Redis runs a script without
-- interleaving other commands, so the count and the grant below cannot race.
--
-- KEYS[1] holders: sorted set, customer -> hold expiry (ms since the epoch)
-- KEYS[2] tokens:  hash, customer -> admission token
-- KEYS[3] sold:    counter of units paid for
-- KEYS[4] buyers:  set of customers whose unit was paid for
-- ARGV[1] now (ms), ARGV[2] expiry of a new hold (ms), ARGV[3] units,
-- ARGV[4] customer, ARGV[5] token to grant if the customer is admitted now
--
-- Returns {1, token, expiry} granted now, {2, token, expiry} already a holder,
-- {0, "", 0} sold out. Times are passed and stored as the caller's decimal strings so no
-- precision is lost to Lua's number formatting.

local holders, tokens, sold_key, buyers = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, expiry, units = ARGV[1], ARGV[2], tonumber(ARGV[3])
local customer, candidate = ARGV[4], ARGV[5]

-- A hold is live while now < expiry: drop every hold that ended at or before now.
local lapsed = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
if #lapsed > 0 then
    for _, who in ipairs(lapsed) do
        redis.call('HDEL', tokens, who)
    end
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
end

local held = redis.call('ZSCORE', holders, customer)
if held then
    local token = redis.call('HGET', tokens, customer)
    if token then
        return {2, token, tonumber(held)}
    end
    -- A hold without its token cannot be checked by anyone; drop it and decide afresh.
    redis.call('ZREM', holders, customer)
end

-- One unit per customer: the sold count is kept per buyer, so a second purchase by the same
-- customer would go uncounted.
if redis.call('SISMEMBER', buyers, customer) == 1 then
    return {0, '', 0}
end

local sold = tonumber(redis.call('GET', sold_key) or '0')
if redis.call('ZCARD', holders) + sold >= units then
    return {0, '', 0}
end

redis.call('ZADD', holders, expiry, customer)
redis.call('HSET', tokens, customer, candidate)
return {1, candidate, tonumber(expiry)}
