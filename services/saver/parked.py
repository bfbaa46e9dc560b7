"""ParkedMessages: the saver's operator side. Lists parked messages (MySQL), puts them back in
their inboxes (MySQL first, then Redis), and shows what one user's inboxes and broadcast acks
hold (Redis). Nothing here is on the push path.

Requeue (``Saver.Requeue``): a parked message goes back to ``stored`` with its attempt count at 0,
keeping its msg_id and seq. The MySQL rows change first, in one transaction that locks them
(``state = parked`` and not expired, so a message acked or requeued meanwhile is skipped); then
one script per message puts the Redis record and its inbox entry back. Once MySQL committed, a
rebuild of Redis restores the message as stored too, so a Redis that lost its epoch in between
loses nothing. When the Redis step fails after the commit (Redis down), the call fails and the
rows are left stored with 0 attempts while Redis still has them parked: asking again for the
same msg_ids finishes the job (a requeue by ids also takes rows in that state, and the script
tells a message Redis still has parked from one pending anyway). The caller gets the requeued
messages with their payloads and delivers them to sessions that are online (center does,
through its push path); the others get them at their next login or BIND, from the inbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.common.pb import internal_pb2
from services.common.redis_scripts import Script, run_pipeline
from services.saver import keys
from services.saver import metrics as m
from services.saver.broadcasts import acked_key, live_key
from services.saver.config import SaverConfig
from services.saver.errors import BackendUnavailable, RequestError
from services.saver.journal import UNAVAILABLE_ERRORS
from services.saver.validation import check_app, check_count, check_msg_id, check_uid

_PARKED = keys.STATE_CODES[keys.State.PARKED]
_STORED = keys.STATE_CODES[keys.State.STORED]
# messages per ListParked page and per Requeue by app/uid (one MySQL statement, one pipeline)
MAX_PAGE = 1000
DEFAULT_PAGE = 100
# inbox entries one InspectInboxes call shows per (uid, app)
MAX_INSPECT_ENTRIES = 1000
_RECORD_FIELDS = ("uid", "app", "created_ms", "expires_ms", "seq", "state", "attempts", "acked_ms", "tomb")

# KEYS[1] = pylon:m:{id}, KEYS[2] = its inbox, KEYS[3] = epoch; ARGV = uid, app, payload, created_ms,
# expires_ms, seq, key_ttl_s, inbox_ttl_s, msg_id, reset (1: MySQL had it parked). Returns 2 (was
# parked or gone in Redis, or reset: now stored, attempts 0, in the inbox), 1 (pending already:
# only its inbox entry ensured), 0 (left alone: acked meanwhile) or nil (no epoch: a rebuild
# restores it from MySQL, where it is stored already). The record is written whole: Redis may
# have dropped the payload (a rebuild keeps none for parked messages) or the whole record. A
# tombstone of another owner (see lua._ACK) is replaced.
_REQUEUE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
local v = redis.call('HMGET', KEYS[1], 'uid', 'app', 'state', 'tomb')
local mine = v[1] == ARGV[1] and v[2] == ARGV[2]
if v[3] == 'acked' and (mine or not v[4]) then return 0 end
if mine and ARGV[10] ~= '1' and (v[3] == 'stored' or v[3] == 'delivered') then
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[9])
  return 1
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'app', ARGV[2], 'payload', ARGV[3], 'created_ms', ARGV[4],
           'expires_ms', ARGV[5], 'seq', ARGV[6], 'state', 'stored', 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[9])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[8]) then redis.call('EXPIRE', KEYS[2], ARGV[8]) end
return 2
"""
REQUEUE = Script(_REQUEUE)


def _int(raw) -> int:
    return int(raw) if raw else 0


def _text(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else (raw or "")


def _scored(reply) -> list[tuple[bytes, float]]:
    """ZRANGE ... WITHSCORES as (member, score) pairs (a flat list under RESP2, pairs under RESP3)."""
    if not reply:
        return []
    if isinstance(reply[0], (list, tuple)):
        return [(member, float(score)) for member, score in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


def page_limit(limit: int) -> int:
    return DEFAULT_PAGE if limit <= 0 else min(limit, MAX_PAGE)


def _now_ms() -> int:
    return int(time.time() * 1000)


class ParkedMessages:
    def __init__(self, redis, journal, guard, cfg: SaverConfig, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._redis = redis
        self._journal = journal  # its pool and outage log
        self._guard = guard      # EpochGuard: requeue waits for a rebuild, and starts one when Redis has no epoch
        self.cfg = cfg
        self._now_ms = clock_ms

    # ------------------------------------------------------------------ list
    async def list(self, q: internal_pb2.ParkedQuery) -> internal_pb2.ParkedPage:
        """One page of parked messages in (app, msg_id) order, without payloads."""
        where, args = [f"state={_PARKED}"], []
        if q.app:
            check_app(q.app)
            where.append("app=%s AND BINARY app=%s")  # the column's collation ignores case
            args += [q.app, q.app]
        if q.uid:
            check_uid(q.uid)
            where.append("uid=%s AND BINARY uid=%s")
            args += [q.uid, q.uid]
        if q.after_app or q.after_msg_id:
            check_app(q.after_app)
            where.append("(app>%s OR (app=%s AND msg_id>%s))")
            args += [q.after_app, q.after_app, q.after_msg_id]
        limit = page_limit(q.limit)
        rows = await self._select(
            "list_parked",
            "SELECT msg_id, uid, app, seq, created_ms, expires_ms, attempts FROM messages "
            f"WHERE {' AND '.join(where)} ORDER BY app, msg_id LIMIT %s", [*args, limit + 1])
        page = internal_pb2.ParkedPage(more=len(rows) > limit)
        for msg_id, uid, app, seq, created, expires, attempts in rows[:limit]:
            page.messages.append(internal_pb2.MessageState(
                found=True, msg_id=msg_id, state=keys.State.PARKED.value, uid=uid, app=app, seq=seq,
                created_ms=created, expires_ms=expires, attempts=attempts))
        return page

    # ------------------------------------------------------------------ requeue
    async def requeue(self, req: internal_pb2.RequeueRequest) -> tuple[list[internal_pb2.StoredMessage], list[int]]:
        """Parked → stored (attempts 0), MySQL first, then Redis. Returns (the requeued messages with
        payloads, the asked msg_ids that were not parked). Waits for a rebuild running now (it may
        have read these rows before the requeue); when Redis has no epoch, starts one, which
        restores the messages from MySQL, where they are stored already."""
        if req.msg_ids:
            check_count("Requeue", len(req.msg_ids), self.cfg.max_items)
            for i, msg_id in enumerate(req.msg_ids):
                try:
                    check_msg_id(msg_id)
                except RequestError as exc:
                    raise RequestError(f"Requeue: msg_ids[{i}]: {exc}") from None
            asked = list(dict.fromkeys(req.msg_ids))
            where = f"msg_id IN ({','.join(['%s'] * len(asked))})"
            args: list = list(asked)
            limit = len(asked)
        else:
            if not req.app:
                raise RequestError("Requeue: name msg_ids, or an app (and optionally a uid)")
            check_app(req.app)
            where, args = "app=%s AND BINARY app=%s", [req.app, req.app]
            if req.uid:
                check_uid(req.uid)
                where += " AND uid=%s AND BINARY uid=%s"
                args += [req.uid, req.uid]
            asked = []
            limit = page_limit(req.limit)
        await self._guard.wait(self.cfg.rebuild_wait_s)
        now_ms = self._now_ms()
        rows = await self._requeue_rows(where, args, now_ms, limit, unfinished=bool(req.msg_ids))
        replies = await self._requeue_redis(rows, now_ms) if rows else []
        if any(r is None for r in replies):
            self._guard.lost()
        # requeued: parked in MySQL until now, or parked in Redis still (a requeue whose Redis
        # step failed after its commit, asked again); without an epoch, MySQL's word counts
        requeued = [internal_pb2.StoredMessage(msg_id=msg_id, uid=uid, app=app, payload=payload, created_ms=created,
                                               ttl_s=keys.remaining_ttl_s(expires, now_ms), seq=seq)
                    for (msg_id, uid, app, seq, payload, created, expires, was_parked), reply in zip(rows, replies,
                                                                                                   strict=True)
                    if reply == 2 or (reply is None and was_parked)]
        done = {msg.msg_id for msg in requeued}
        m.REQUEUED.inc(len(requeued))
        return requeued, [i for i in asked if i not in done]

    async def _requeue_rows(self, where: str, args: list, now_ms: int, limit: int, unfinished: bool) -> list[tuple]:
        """Lock the parked, unexpired rows matching ``where``, set them stored with attempts 0,
        commit. With ``unfinished`` also the rows stored with 0 attempts (a requeue whose Redis
        step failed leaves its rows so, and asking again finishes it). Rows: (msg_id, uid, app,
        seq, payload, created_ms, expires_ms, whether it was parked)."""
        states = f"(state={_PARKED} OR (state={_STORED} AND attempts=0))" if unfinished else f"state={_PARKED}"
        started = time.perf_counter()
        try:
            async with self._journal.pool.acquire() as conn:
                await conn.begin()
                try:
                    async with conn.cursor() as cur:
                        await cur.execute(
                            "SELECT msg_id, uid, app, seq, payload, created_ms, expires_ms, state FROM messages "
                            f"WHERE {where} AND {states} AND expires_ms>%s ORDER BY app, msg_id LIMIT %s "
                            "FOR UPDATE", [*args, now_ms, limit])
                        rows = [(*r[:7], r[7] == _PARKED) for r in await cur.fetchall()]
                        ids = [r[0] for r in rows if r[7]]
                        if ids:
                            await cur.execute(
                                f"UPDATE messages SET state={_STORED}, attempts=0 "
                                f"WHERE msg_id IN ({','.join(['%s'] * len(ids))}) AND state={_PARKED}", ids)
                    await conn.commit()
                except BaseException:
                    await conn.rollback()
                    raise
        except UNAVAILABLE_ERRORS as exc:
            raise self._journal.failed(exc) from None
        self._journal.outage.ok()
        m.MYSQL_SECONDS.labels("requeue").observe(time.perf_counter() - started)
        return rows

    async def _requeue_redis(self, rows: Sequence[tuple], now_ms: int) -> list:
        """One REQUEUE script per row; its replies, in order."""
        retention = self.cfg.ack_retention_s

        def build(pipe) -> None:
            for msg_id, uid, app, seq, payload, created, expires, was_parked in rows:
                ttl = keys.remaining_ttl_s(expires, now_ms)
                REQUEUE.queue(pipe, [keys.message_key(msg_id), keys.inbox_key(uid, app), keys.EPOCH_KEY],
                              [uid, app, payload, created, expires, seq, ttl + retention, ttl, msg_id,
                               1 if was_parked else 0])

        return await run_pipeline(self._redis, build, (REQUEUE,))

    # ------------------------------------------------------------------ inspect
    async def inspect(self, req: internal_pb2.InspectRequest) -> list[internal_pb2.InboxView]:
        """Per (uid, app): the inbox entries (states, attempts; payloads if asked) and the app's
        live broadcasts with the ones this user acked."""
        check_count("InspectInboxes", len(req.keys), self.cfg.max_items)
        pairs: list[tuple[str, str]] = []
        for i, key in enumerate(req.keys):
            try:
                check_uid(key.uid)
                for app in key.apps:
                    check_app(app)
            except RequestError as exc:
                raise RequestError(f"InspectInboxes: keys[{i}]: {exc}") from None
            pairs += [(key.uid, app) for app in dict.fromkeys(key.apps)]
        check_count("InspectInboxes (uid, app) inboxes", len(pairs), self.cfg.max_items)
        limit = min(req.limit_per_inbox or DEFAULT_PAGE, MAX_INSPECT_ENTRIES)
        now_ms = self._now_ms()
        apps = list(dict.fromkeys(app for _, app in pairs))
        if not pairs:
            return []

        def build_index(pipe) -> None:
            pipe.execute_command("EXISTS", keys.EPOCH_KEY)
            for uid, app in pairs:
                ikey = keys.inbox_key(uid, app)
                pipe.execute_command("ZCARD", ikey)
                pipe.execute_command("ZRANGE", ikey, 0, limit - 1, "WITHSCORES")
                pipe.execute_command("HKEYS", acked_key(uid, app))
            for app in apps:
                pipe.execute_command("ZRANGEBYSCORE", live_key(app), f"({now_ms}", "+inf", "WITHSCORES")

        epoch_ok, *replies = await run_pipeline(self._redis, build_index)
        if not epoch_ok:
            raise BackendUnavailable("Redis", "being rebuilt from MySQL; ask again shortly")
        per_pair = [replies[3 * i:3 * i + 3] for i in range(len(pairs))]
        live = {app: _scored(r) for app, r in zip(apps, replies[3 * len(pairs):], strict=True)}
        entries = [[_int(member) for member, _ in _scored(ranged)] for _, ranged, _ in per_pair]
        fields = (*_RECORD_FIELDS, "payload") if req.with_payload else _RECORD_FIELDS
        flat = [msg_id for ids in entries for msg_id in ids]

        def build_records(pipe) -> None:
            for msg_id in flat:
                pipe.hmget(keys.message_key(msg_id), fields)

        records = iter(await run_pipeline(self._redis, build_records) if flat else [])
        views = []
        for (uid, app), (total, _, acked), ids in zip(pairs, per_pair, entries, strict=True):
            view = internal_pb2.InboxView(uid=uid, app=app, total=_int(total))
            for msg_id in ids:
                rec = dict(zip(fields, next(records), strict=True))
                found = bool(rec["state"]) and not rec["tomb"] and _text(rec["uid"]) == uid
                state = keys.derive_state(_text(rec["state"]), _int(rec["expires_ms"]), now_ms) if found else ""
                view.entries.append(internal_pb2.MessageState(
                    found=found, msg_id=msg_id, state=state, uid=uid, app=app, created_ms=_int(rec["created_ms"]),
                    expires_ms=_int(rec["expires_ms"]), attempts=_int(rec["attempts"]),
                    acked_ms=_int(rec["acked_ms"]), seq=_int(rec["seq"])))
                if req.with_payload:
                    view.payloads.append((rec["payload"] or b"") if found else b"")
            done = {_int(f) for f in acked or () if f != b"v"}
            for member, expires in live[app]:
                bid = _int(member)
                view.broadcasts.append(internal_pb2.LiveBroadcast(broadcast_id=bid, expires_ms=int(expires),
                                                                  acked=bid in done))
            views.append(view)
        return views

    # ------------------------------------------------------------------ MySQL
    async def _select(self, op: str, sql: str, args: list) -> list[tuple]:
        started = time.perf_counter()
        try:
            async with self._journal.pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(sql, args)
                rows = list(await cur.fetchall())
        except UNAVAILABLE_ERRORS as exc:
            raise self._journal.failed(exc) from None
        self._journal.outage.ok()
        m.MYSQL_SECONDS.labels(op).observe(time.perf_counter() - started)
        return rows
