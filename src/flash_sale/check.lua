-- The customer's token if its hold is live at ARGV[1] (ms), else nil. The caller compares
-- tokens itself, in constant time.
--
-- KEYS[1] holders (sorted set, customer -> expiry ms), KEYS[2] tokens (hash, customer -> token)
-- ARGV[1] now (ms), ARGV[2] customer

local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expiry or tonumber(expiry) <= tonumber(ARGV[1]) then
    return false
end
return redis.call('HGET', KEYS[2], ARGV[2])
