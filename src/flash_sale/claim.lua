-- Resize a live holder's hold to the units its checkout reserves, atomically, if that stays
-- within what the buyer may still buy and what the sale has left.
--
-- KEYS[1] loaded, KEYS[2] holders, KEYS[4] held, KEYS[5] sold, KEYS[6] bought (all keys of
-- the sale are passed). ARGV[1] now (ms), ARGV[2] units of the sale, ARGV[3] units per
-- buyer, ARGV[4] customer, ARGV[5] units wanted
--
-- Returns {1, wanted} held, {0, 0} not a live holder, {2, allowed} more than allowed,
-- {-1, 0} the sale is not loaded.

local loaded, holders, held, sold_key, bought = KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', loaded) == 0 then
    return {-1, 0}
end
local now, units, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local customer, wanted = ARGV[4], tonumber(ARGV[5])

local at = redis.call('ZSCORE', holders, customer)
if not at or tonumber(at) <= tonumber(now) then
    return {0, 0}
end
local others = 0
for _, who in ipairs(redis.call('ZRANGEBYSCORE', holders, '(' .. now, '+inf')) do
    if who ~= customer then
        others = others + tonumber(redis.call('HGET', held, who) or '1')
    end
end
local sold = tonumber(redis.call('GET', sold_key) or '0')
local allowed = math.min(limit - tonumber(redis.call('HGET', bought, customer) or '0'),
    units - sold - others)
if allowed < 0 then
    allowed = 0
end
if wanted > allowed then
    return {2, allowed}
end
redis.call('HSET', held, customer, wanted)
return {1, wanted}
