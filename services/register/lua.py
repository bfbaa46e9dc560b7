"""Server-side scripts of the session store, run by SHA (EVALSHA) inside pipelines.

Scripts touch one key each, so they also work on a Redis Cluster. Redis forgets loaded scripts
when it restarts; ``run_pipeline`` reloads them on NOSCRIPT and runs the pipeline again (every
command the store pipelines is idempotent, so a replay is harmless).
"""

from __future__ import annotations

# KEYS[1] = pylon:u:{uid}; ARGV[1] = session_id; ARGV[2] = instance.
# Deletes the field only while the stored Session (protobuf) still names ARGV[2] as its instance
# (field 3): a session that resumed on another room instance must survive the old one's cleanup.
UNREGISTER_IF_OWNED = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local i, n = 1, #raw
local function varint()
  local v, mul = 0, 1
  while i <= n do
    local b = string.byte(raw, i)
    i = i + 1
    if b < 128 then return v + b * mul end
    v = v + (b - 128) * mul
    mul = mul * 128
  end
  return nil
end
while i <= n do
  local tag = varint()
  if not tag then return 0 end
  local wire = tag % 8
  local field = (tag - wire) / 8
  if wire == 2 then
    local len = varint()
    if not len then return 0 end
    if field == 3 then
      if string.sub(raw, i, i + len - 1) == ARGV[2] then
        return redis.call('HDEL', KEYS[1], ARGV[1])
      end
      return 0
    end
    i = i + len
  elseif wire == 0 then
    if not varint() then return 0 end
  elseif wire == 1 then
    i = i + 8
  elseif wire == 5 then
    i = i + 4
  else
    return 0
  end
end
return 0
"""
