-- The checkout's money went back: the units it was counted for return to the sale and to the
-- buyer's limit, once (its consumed entry drops to 0). A checkout never consumed is released
-- instead. -1 when the sale is not loaded.
--
-- KEYS as consume.lua. ARGV[1] customer, ARGV[2] checkout

if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
local counted = redis.call('HGET', KEYS[8], ARGV[2])
if counted then
    local units = tonumber(counted)
    if units > 0 then
        redis.call('HSET', KEYS[8], ARGV[2], 0)
        redis.call('DECRBY', KEYS[5], units)
        redis.call('HINCRBY', KEYS[6], ARGV[1], -units)
    end
    return 0
end
if redis.call('SADD', KEYS[7], ARGV[2]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
end
return 0
