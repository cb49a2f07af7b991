-- Hand a holder's unit back: the hold and its token go together. Idempotent.
--
-- KEYS[1] holders (sorted set), KEYS[2] tokens (hash)
-- ARGV[1] customer

redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 0
