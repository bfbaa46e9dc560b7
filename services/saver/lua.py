"""Server-side scripts for message state changes, run by SHA (EVALSHA) inside pipelines.

The state changes make check-then-write
atomic (an ack racing a delivery count can never be overwritten); the store scripts fold 2-3
commands into one, because redis-py's per-command cost, not redis-server, limits a saver (7
commands per stored message ran at ~9k messages/s, 3 at ~20k). Redis forgets scripts when it
restarts; ``run_pipeline`` reloads them on NOSCRIPT and replays the pipeline (a NOSCRIPT
pipeline ran none of its scripts, and its other commands are idempotent).

Epoch: the scripts that number, write or count deliveries of a message first check the epoch
key (``keys.EPOCH_KEY``, KEYS[2]) and return nil without touching anything when it is missing
(or, for STORE_BODY, no longer the one the sequence numbers were drawn under). A missing epoch
means Redis lost the saver's data; the saver rebuilds it from MySQL and runs the refused part
again, so no message is ever numbered from an empty counter. ACK is never refused (the ack is in
MySQL before it runs); without an epoch it leaves a tombstone that a rebuild respects.
The check is inside the script, so it is atomic with the write. (With a Redis Cluster the epoch
would have to live in every slot; the scripts assume one Redis, the other keys do not.)
"""

from __future__ import annotations

from services.common.redis_scripts import Script

# KEYS[1] = pylon:seq:{uid}:{app}, KEYS[2] = epoch; ARGV = count, ttl_s.
# Returns {epoch, last of ``count`` new numbers}, or nil (no epoch: nothing numbered).
_SEQ_NEXT = """
local e = redis.call('GET', KEYS[2])
if not e then return false end
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {e, v}
"""

# KEYS[1] = pylon:m:{id}, KEYS[2] = epoch; ARGV = uid, app, payload, created_ms, expires_ms, seq,
# key_ttl_s, epoch the seq was drawn under. Returns 1, or nil when the epoch changed since.
# DEL first: a retried Store starts the record afresh instead of mixing in an old ack.
_STORE_BODY = """
if redis.call('GET', KEYS[2]) ~= ARGV[8] then return false end
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

# KEYS[1] = pylon:m:{id}, KEYS[2] = epoch; ARGV = uid, app, acked_ms, ack_retention_s, tombstone_ttl_s,
# deliveries (attempts the ack also reports, counted when it applies: MessageRef.deliveries).
# Returns 1 when applied, 0 when not (unknown, someone else's, already acked).
# Only the owner (uid, app) may ack; the payload is dropped at once, the record kept for status reads.
# No record and no epoch: Redis lost the message or a rebuild has not restored it yet. The ack is
# already in MySQL, but a rebuild may have read the row before that commit; a tombstone (state
# acked, tomb 1) makes the rebuild keep it acked. A tombstone is not trusted for anything else:
# status reads skip it, and a rebuild replaces one whose (uid, app) is not the row's.
_ACK = """
local v = redis.call('HMGET', KEYS[1], 'uid', 'app', 'state')
if not v[1] then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'app', ARGV[2], 'state', 'acked', 'acked_ms', ARGV[3], 'tomb', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 0
end
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] or v[3] == 'acked' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'acked', 'acked_ms', ARGV[3])
if ARGV[6] ~= '0' then redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[6]) end
redis.call('HDEL', KEYS[1], 'payload')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] = pylon:m:{id}, KEYS[2] = epoch; ARGV = uid, app, max_attempts. Returns 0 (not counted:
# unknown, someone else's, acked or parked), the attempt count (counted), minus it (counted and
# now parked), or nil without an epoch.
_MARK_DELIVERED = """
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
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

# ---------------------------------------------------------------- rebuild from MySQL

# KEYS[1] = pylon:m:{id}, KEYS[2] = rebuild lock; ARGV = uid, app, payload, created_ms, expires_ms,
# seq, state, attempts, key_ttl_s, lock token. Returns 1 (restored), 0 (kept) or nil (the lock is
# no longer the caller's: Redis lost it again, or it expired; this rebuild is void).
# A record of the same owner already there is newer than the MySQL row read for it (an ack's
# tombstone, or a write since): kept as it is. One of another owner can only be a tombstone
# someone else's ack left: replaced.
_RESTORE_BODY = """
if redis.call('GET', KEYS[2]) ~= ARGV[10] then return false end
local v = redis.call('HMGET', KEYS[1], 'uid', 'app')
if v[1] == ARGV[1] and v[2] == ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'app', ARGV[2], 'payload', ARGV[3], 'created_ms', ARGV[4],
           'expires_ms', ARGV[5], 'seq', ARGV[6], 'state', ARGV[7], 'attempts', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
"""

# KEYS[1] = message record, KEYS[2] = its inbox, KEYS[3] = rebuild lock; ARGV = uid, app, state
# (acked | parked), msg_id, owner token. MySQL wins for a message it holds as settled: a record
# Redis still has as pending (it lost the ack or park with its last writes) takes MySQL's state,
# drops its payload and leaves the inbox. Returns false if the lock is no longer the caller's.
_SETTLE_BODY = """
if redis.call('GET', KEYS[3]) ~= ARGV[5] then return false end
local v = redis.call('HMGET', KEYS[1], 'uid', 'app', 'state')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] then return 0 end
if v[3] ~= 'stored' and v[3] ~= 'delivered' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('ZREM', KEYS[2], ARGV[4])
return 1
"""

# KEYS[1] = pylon:seq:{uid}:{app}; ARGV = seq, ttl_s. The counter only ever moves up: the next
# number handed out is above every seq MySQL holds for the pair.
_SEQ_RAISE = """
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if c < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] = rebuild lock; ARGV = owner token, ttl_ms. Returns 1 while the caller still holds it.
_LOCK_EXTEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] = rebuild lock, KEYS[2] = epoch; ARGV = owner token, new epoch. Sets the epoch and
# frees the lock only if the caller still holds it: a rebuild whose lock expired, or that Redis
# lost again underneath it, must not declare its half-written data complete.
_EPOCH_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] = epoch; ARGV = the epoch found stale. Dropped only if no other saver replaced it since.
_EPOCH_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

# KEYS[1] = rebuild lock; ARGV = owner token.
_LOCK_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


ACK = Script(_ACK)
MARK_DELIVERED = Script(_MARK_DELIVERED)
SEQ_NEXT = Script(_SEQ_NEXT)
STORE_BODY = Script(_STORE_BODY)
INBOX_ADD = Script(_INBOX_ADD)
RESTORE_BODY = Script(_RESTORE_BODY)
SETTLE_BODY = Script(_SETTLE_BODY)
SEQ_RAISE = Script(_SEQ_RAISE)
LOCK_EXTEND = Script(_LOCK_EXTEND)
EPOCH_PUBLISH = Script(_EPOCH_PUBLISH)
LOCK_RELEASE = Script(_LOCK_RELEASE)
EPOCH_DROP = Script(_EPOCH_DROP)
