"""Server-side scripts for message state changes, run by SHA (EVALSHA) inside pipelines.

Each script touches one key (so Redis Cluster works). The state changes make check-then-write
atomic (an ack racing a delivery count can never be overwritten); the store scripts fold 2-3
commands into one, because redis-py's per-command cost, not redis-server, limits a saver (7
commands per stored message ran at ~9k messages/s, 3 at ~20k). Redis forgets scripts when it
restarts; ``run_pipeline`` reloads them on NOSCRIPT and replays the pipeline (a NOSCRIPT
pipeline ran none of its scripts, and its other commands are idempotent).
"""

from __future__ import annotations

from services.common.redis_scripts import Script

# KEYS[1] = pylon:seq:{uid}:{app}; ARGV = count, ttl_s. Returns the last of ``count`` new numbers.
_SEQ_NEXT = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return v
"""

# KEYS[1] = pylon:m:{id}; ARGV = uid, app, payload, created_ms, expires_ms, seq, key_ttl_s.
# DEL first: a retried Store starts the record afresh instead of mixing in an old ack.
_STORE_BODY = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'app', ARGV[2], 'payload', ARGV[3], 'created_ms', ARGV[4],
           'expires_ms', ARGV[5], 'seq', ARGV[6], 'state', 'stored', 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""

# KEYS[1] = pylon:in:{uid}:{app}; ARGV = ttl_s, then (seq, msg_id) pairs. The inbox lives as
# long as its longest-lived message: the TTL only ever grows (TTL is -1 on a new inbox).
_INBOX_ADD = """
local n = redis.call('ZADD', KEYS[1], unpack(ARGV, 2))
local ttl = tonumber(ARGV[1])
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return n
"""
# Lua's C stack takes ~8,000 unpacked values; one INBOX_ADD call carries at most this many pairs
INBOX_ADD_MAX_PAIRS = 1000

# KEYS[1] = pylon:m:{id}; ARGV = uid, app, acked_ms, ack_retention_s. Returns 1 when applied.
# Only the owner (uid, app) may ack; the payload is dropped at once, the record kept for status reads.
_ACK = """
local v = redis.call('HMGET', KEYS[1], 'uid', 'app', 'state')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] or v[3] == 'acked' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'acked', 'acked_ms', ARGV[3])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] = pylon:m:{id}; ARGV = uid, app, max_attempts. Returns 0 (not counted: unknown, someone
# else's, acked or parked), the attempt count (counted), or minus it (counted and now parked).
_MARK_DELIVERED = """
local v = redis.call('HMGET', KEYS[1], 'uid', 'app', 'state')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] then return 0 end
if v[3] ~= 'stored' and v[3] ~= 'delivered' then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'parked')
  return -n
end
if v[3] == 'stored' then redis.call('HSET', KEYS[1], 'state', 'delivered') end
return n
"""


ACK = Script(_ACK)
MARK_DELIVERED = Script(_MARK_DELIVERED)
SEQ_NEXT = Script(_SEQ_NEXT)
STORE_BODY = Script(_STORE_BODY)
INBOX_ADD = Script(_INBOX_ADD)
