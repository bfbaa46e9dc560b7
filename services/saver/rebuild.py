"""RedisRebuild: bring the saver's Redis data back from the MySQL log after Redis lost it.

The log is read in keyset pages on the primary key (``msg_id > last ORDER BY msg_id LIMIT n``),
and each page goes to Redis as one pipeline, so a rebuild of N rows costs N / chunk_rows round
trips each way and holds one page in memory, however large the table. Per page:

- every row not acked, not parked and not expired gets its record back (payload, seq, state
  stored/delivered, attempts) and its place in its (uid, app) inbox, scored by its seq;
- every row, acked, parked and expired ones included, raises its pair's sequence counter to at
  least its seq (counters only move up), so a message stored after the rebuild continues above
  every number a client may have seen;
- the rebuild lock's TTL is renewed, and every restored record checks that the lock is still
  this rebuild's: one that lost it (Redis lost its data again, or the lock expired while this
  saver stalled) stops writing and is void.

The caller (EpochGuard) holds the lock before and publishes the epoch after.

A Redis that comes back from a crash with its append-only file keeps its epoch, but if its host
went down it may miss its last second of writes (appendfsync everysec). ``tail_loss`` looks for
that in the newest rows of the log: a sequence counter below a seq MySQL has (counters are bumped
before the row is written, so that never happens otherwise), or a pending message without its
record that was stored long enough ago for its Store to have finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.redis_scripts import run_pipeline
from services.saver import keys
from services.saver.keys import REBUILD_LOCK_KEY
from services.saver.lua import INBOX_ADD, INBOX_ADD_MAX_PAIRS, LOCK_EXTEND, RESTORE_BODY, SEQ_RAISE, SETTLE_BODY

_PENDING_CODES = frozenset(keys.STATE_CODES[s] for s in keys.PENDING)


class RebuildLockLost(Exception):
    """The rebuild lock is no longer this rebuild's; what it wrote is not declared complete."""


@dataclass(slots=True)
class ChunkPlan:
    """What one page of MySQL rows becomes in Redis (pure data, see ``plan_chunk``)."""
    # (msg_id, uid, app, payload, created_ms, expires_ms, seq, state name, attempts, key ttl s)
    bodies: list[tuple] = field(default_factory=list)
    # inbox key -> [ttl_s, seq, msg_id, seq, msg_id, ...] (the INBOX_ADD arguments)
    inboxes: dict[str, list] = field(default_factory=dict)
    # seq counter key -> highest seq of the pair in this page
    counters: dict[str, int] = field(default_factory=dict)
    # (msg_id, uid, app, state name) of acked or parked rows not expired: MySQL's state wins
    settled: list[tuple] = field(default_factory=list)


def plan_chunk(rows: Sequence[tuple], now_ms: int, ack_retention_s: int) -> ChunkPlan:
    """Rows as ``MessageJournal.scan`` returns them: (msg_id, uid, app, seq, created_ms,
    expires_ms, state, attempts, payload)."""
    plan = ChunkPlan()
    for msg_id, uid, app, seq, created_ms, expires_ms, state, attempts, payload in rows:
        ckey = keys.seq_key(uid, app)
        if seq > plan.counters.get(ckey, 0):
            plan.counters[ckey] = seq
        if expires_ms <= now_ms:
            continue
        if state not in _PENDING_CODES:
            plan.settled.append((msg_id, uid, app, keys.state_from_code(state)))
            continue
        ttl_s = keys.remaining_ttl_s(expires_ms, now_ms)
        plan.bodies.append((msg_id, uid, app, payload, created_ms, expires_ms, seq, keys.state_from_code(state),
                            attempts, ttl_s + ack_retention_s))
        entry = plan.inboxes.setdefault(keys.inbox_key(uid, app), [0])
        if ttl_s > entry[0]:
            entry[0] = ttl_s
        entry += (seq, msg_id)
    return plan


# A Store writes MySQL, then Redis, within its deadline (5 s by default): a row older than this
# whose record is missing was lost by Redis, not still on its way.
TAIL_SETTLED_MS = 10_000


def tail_loss(rows: Sequence[tuple], counters: dict[str, int], redis_state: dict[int, str | None],
              now_ms: int) -> tuple[int, int]:
    """(counters behind MySQL, messages whose Redis record is missing or behind) for the newest
    ``rows`` (``MessageJournal.tail``), given each pair's counter and each row's state in Redis
    (None: no record). Behind: a settled pending message with no record, or one MySQL holds as
    acked or parked that Redis still has pending (the ack or park was among the lost writes)."""
    behind = {keys.seq_key(uid, app) for _, uid, app, seq, *_ in rows if counters.get(keys.seq_key(uid, app), 0) < seq}
    missing = 0
    for msg_id, _, _, _, created_ms, expires_ms, state, _ in rows:
        if expires_ms <= now_ms:
            continue
        in_redis = redis_state.get(msg_id)
        if state in _PENDING_CODES:
            missing += in_redis is None and created_ms <= now_ms - TAIL_SETTLED_MS
        else:
            missing += in_redis in keys.PENDING
    return len(behind), missing


@dataclass(slots=True)
class RebuildStats:
    rows_scanned: int = 0
    messages_restored: int = 0
    counters_raised: int = 0
    seconds: float = 0.0


class RedisRebuild:
    def __init__(self, redis, journal, *, chunk_rows: int, ack_retention_s: int, seq_ttl_s: int,
                 lock_ttl_s: float, clock_ms: Callable[[], int] | None = None,
                 on_chunk: Callable[[int], None] | None = None, broadcasts=None) -> None:
        self._redis = redis
        self._broadcasts = broadcasts  # BroadcastStore: live broadcasts and acked sets come back too
        self._journal = journal
        self.chunk_rows = chunk_rows
        self.ack_retention_s = ack_retention_s
        self.seq_ttl_s = seq_ttl_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self._now_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._on_chunk = on_chunk  # called with each page's restored count (metrics)

    async def run(self, token: str) -> RebuildStats:
        """Copy the log into Redis under the rebuild lock held with ``token``."""
        started = time.perf_counter()
        stats = RebuildStats()
        after = 0
        while True:
            now_ms = self._now_ms()
            rows = await self._journal.scan(after, now_ms, self.chunk_rows)
            if not rows:
                break
            plan = plan_chunk(rows, now_ms, self.ack_retention_s)
            await self._write(plan, token)
            stats.rows_scanned += len(rows)
            stats.messages_restored += len(plan.bodies)
            stats.counters_raised += len(plan.counters)
            if self._on_chunk is not None:
                self._on_chunk(len(plan.bodies))
            after = rows[-1][0]
            if len(rows) < self.chunk_rows:
                break
        if self._broadcasts is not None:
            await self._broadcasts.rebuild(self._now_ms(), self.chunk_rows)
        stats.seconds = time.perf_counter() - started
        return stats

    async def find_tail_loss(self, rows_to_check: int) -> tuple[int, int]:
        """``tail_loss`` over the newest ``rows_to_check`` rows of the log: one MySQL query and
        one Redis pipeline."""
        rows = await self._journal.tail(rows_to_check)
        if not rows:
            return 0, 0
        ckeys = list(dict.fromkeys(keys.seq_key(uid, app) for _, uid, app, *_ in rows))

        def build(pipe) -> None:
            for ckey in ckeys:
                pipe.execute_command("GET", ckey)
            for row in rows:
                pipe.execute_command("HGET", keys.message_key(row[0]), "state")

        replies = await run_pipeline(self._redis, build)
        counters = {ckey: int(v) for ckey, v in zip(ckeys, replies, strict=False) if v is not None}
        redis_state = {row[0]: (v.decode() if isinstance(v, bytes) else v)
                       for row, v in zip(rows, replies[len(ckeys):], strict=True)}
        return tail_loss(rows, counters, redis_state, self._now_ms())

    async def _write(self, plan: ChunkPlan, token: str) -> None:
        seq_ttl = self.seq_ttl_s
        lock_ttl_ms = self.lock_ttl_ms

        def build(pipe) -> None:
            # bodies before inbox entries: a load never finds an entry without its record
            for msg_id, uid, app, payload, created_ms, expires_ms, seq, state, attempts, key_ttl in plan.bodies:
                RESTORE_BODY.queue(pipe, [keys.message_key(msg_id), REBUILD_LOCK_KEY], [
                    uid, app, payload, created_ms, expires_ms, seq, state, attempts, key_ttl, token])
            step = 2 * INBOX_ADD_MAX_PAIRS
            for ikey, (ttl, *pairs) in plan.inboxes.items():
                for i in range(0, len(pairs), step):
                    INBOX_ADD.queue(pipe, [ikey], [ttl, *pairs[i:i + step]])
            for ckey, seq in plan.counters.items():
                SEQ_RAISE.queue(pipe, [ckey], [seq, seq_ttl])
            for msg_id, uid, app, state in plan.settled:
                SETTLE_BODY.queue(pipe, [keys.message_key(msg_id), keys.inbox_key(uid, app), REBUILD_LOCK_KEY],
                                  [uid, app, state, str(msg_id), token])
            LOCK_EXTEND.queue(pipe, [REBUILD_LOCK_KEY], [token, lock_ttl_ms])

        replies = await run_pipeline(self._redis, build, (RESTORE_BODY, INBOX_ADD, SEQ_RAISE, SETTLE_BODY,
                                                          LOCK_EXTEND))
        if replies[-1] != 1 or any(r is None for r in replies[:len(plan.bodies)]):
            raise RebuildLockLost("the rebuild lock expired or Redis lost it during the rebuild")
