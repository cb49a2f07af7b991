-- Live holders at ARGV[1] (ms), the units they hold, and units sold, read together;
-- {-1, 0, 0} when the sale is not loaded.
--
-- KEYS[1] loaded, KEYS[2] holders, KEYS[4] held, KEYS[5] sold. ARGV[1] now (ms)

if redis.call('EXISTS', KEYS[1]) == 0 then
    return {-1, 0, 0}
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
local held = 0
for _, who in ipairs(live) do
    held = held + tonumber(redis.call('HGET', KEYS[4], who) or '1')
end
local sold = tonumber(redis.call('GET', KEYS[5]) or '0')
return {#live, held, sold}
