-- Push a holder's expiry to ARGV[1] (ms). Never pulls it earlier; a customer who is not a
-- holder stays one who is not. -1 when the sale is not loaded.
--
-- KEYS[1] loaded, KEYS[2] holders. ARGV[1] new expiry (ms), ARGV[2] customer

if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[2])
if expiry and tonumber(expiry) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2])
end
return 0
