-- {1, token} when the customer's hold is live at ARGV[1] (ms), {0, ""} when it is not,
-- {-1, ""} when the sale is not loaded. The caller compares tokens itself, in constant time.
--
-- KEYS[1] loaded, KEYS[2] holders, KEYS[3] tokens. ARGV[1] now (ms), ARGV[2] customer

if redis.call('EXISTS', KEYS[1]) == 0 then
    return {-1, ''}
end
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not expiry or tonumber(expiry) <= tonumber(ARGV[1]) then
    return {0, ''}
end
return {1, redis.call('HGET', KEYS[3], ARGV[2]) or ''}
