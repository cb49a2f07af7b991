-- One customer's budget, shared by every instance (GCRA, the rule the in-memory limiter keeps).
-- KEYS[1]: the customer's theoretical arrival time, ms. ARGV[1]: ms per request; ARGV[2]: burst.
-- Returns 0 when the request is within the budget (and takes it), else the ms to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
    tat = now
end
local ahead = tat - now
if ahead > tolerance then
    return ahead - tolerance
end
redis.call('SET', KEYS[1], tat + interval, 'PX', ahead + interval + 1000)
return 0
