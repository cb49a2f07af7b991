-- Push a holder's expiry to ARGV[1] (ms). Never pulls it earlier; a customer who is not a
-- holder stays one who is not.
--
-- KEYS[1] holders (sorted set, customer -> expiry ms)
-- ARGV[1] new expiry (ms), ARGV[2] customer

local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if expiry and tonumber(expiry) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
end
return 0
