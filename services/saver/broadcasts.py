"""BroadcastStore: the saver's stored broadcasts (DESIGN.md §3, §4).

A broadcast is one record, never a copy per user: a MySQL row (``broadcasts``) and, until it
expires, a Redis body and an entry in its app's live set. What a user acked is one small record
per (uid, app): the ids of the live broadcasts it acked, each with its expiry so it prunes
itself. A login or BIND (LoadInbox) gets, beside the inbox, every live broadcast of the app that
(uid, app) has not acked; an ack is remembered there, so an acked broadcast never comes again.

Redis keys:
    pylon:bc:m:{id}           HASH app, payload, created_ms, expires_ms (expires with the broadcast)
    pylon:bc:live:{app}       ZSET broadcast id -> expires_ms (lives as long as its last member)
    pylon:bca:{uid}:{app}     HASH broadcast id -> its expires_ms (lives as long as the latest)

MySQL: ``broadcasts`` (one row per broadcast) and ``broadcast_acks`` (one row per (app, uid):
the acked ids packed with their expiries, appended). An ack is applied in Redis
first, then written to MySQL within the same flush; a rebuild after Redis lost its data brings
both back. The window in between (a crash of Redis and its append-only file in the second after
an ack) can hand that broadcast once more to the user: the SDK drops it by msg_id.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from services.common.apps import valid_app_id
from services.common.pb import internal_pb2
from services.common.redis_scripts import run_pipeline
from services.common.requests import RequestError, check_count, check_uid
from services.saver import metrics as m
from services.saver.config import SaverConfig
from services.saver.keys import remaining_ttl_s

_PAIR = struct.Struct(">QQ")
# bodies of live broadcasts a saver keeps in memory (they never change; a miss reads Redis)
BODY_CACHE = 4096


def body_key(bid: int) -> str:
    return f"pylon:bc:m:{bid}"


def live_key(app: str) -> str:
    return f"pylon:bc:live:{app}"


def acked_key(uid: str, app: str) -> str:
    # app ids never contain ':' (apps.valid_app_id), so (uid, app) -> key is one-to-one
    return f"pylon:bca:{uid}:{app}"


def pack_acked(pairs: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(_PAIR.pack(bid, exp) for bid, exp in pairs)


def unpack_acked(blob: bytes) -> list[tuple[int, int]]:
    return [_PAIR.unpack_from(blob, i) for i in range(0, len(blob) - len(blob) % 16, 16)]


# A user's durable acked set holds at most this many bytes (1,024 broadcasts); past it the oldest
# pairs (most likely expired) go. Were one of them still live and Redis lost, that user would get
# it once more (the SDK drops it by msg_id).
ACKED_ROW_BYTES = 16 * 1024


class BroadcastStore:
    def __init__(self, redis, journal, cfg: SaverConfig) -> None:
        self._redis = redis
        self._journal = journal  # its pool, statement runner and outage log
        self.cfg = cfg
        # broadcast id -> (app, payload, created_ms, expires_ms)
        self._bodies: dict[int, tuple[str, bytes, int, int]] = {}

    # ------------------------------------------------------------------ store
    def validate(self, messages: Sequence, now_ms: int) -> list[tuple[int, str, bytes, int, int]]:
        """(id, app, payload, created_ms, expires_ms) per broadcast; RequestError names the bad one."""
        check_count("StoreBroadcast", len(messages), self.cfg.max_items)
        rows = []
        seen = set()
        for i, msg in enumerate(messages):
            where = f"StoreBroadcast: messages[{i}]"
            if not msg.broadcast:
                raise RequestError(f"{where}: broadcast must be true")
            if msg.uid:
                raise RequestError(f"{where}: a broadcast has no uid")
            if msg.msg_id <= 0 or msg.msg_id in seen:
                raise RequestError(f"{where}: msg_id must be > 0 and unique")
            seen.add(msg.msg_id)
            if not valid_app_id(msg.app):
                raise RequestError(f"{where}: app {msg.app[:64]!r} is not a valid app id")
            if len(msg.payload) > self.cfg.max_payload_bytes:
                raise RequestError(f"{where}: payload of {len(msg.payload)} bytes is over the limit of "
                                   f"{self.cfg.max_payload_bytes}")
            ttl = msg.ttl_s if msg.ttl_s > 0 else self.cfg.default_ttl_s
            ttl = min(ttl, self.cfg.max_ttl_s)
            created = msg.created_ms or now_ms
            rows.append((msg.msg_id, msg.app, msg.payload, created, created + ttl * 1000))
        return rows

    async def store(self, messages: Sequence, now_ms: int) -> int:
        """MySQL (committed) first, then Redis: a broadcast a client may see is one a rebuild restores."""
        rows = self.validate(messages, now_ms)
        if not rows:
            return 0

        def sql(conn) -> str:
            values = ",".join(f"({int(bid)},'{conn.escape_string(app)}',X'{payload.hex()}',{int(c)},{int(e)})"
                              for bid, app, payload, c, e in rows)
            return ("INSERT INTO broadcasts (id, app, payload, created_ms, expires_ms) VALUES " + values
                    + " ON DUPLICATE KEY UPDATE id=id")

        await self._run_sql("broadcast_insert", sql, None, len(rows))
        await self.restore(rows, now_ms)
        m.BROADCASTS_STORED.inc(len(rows))
        return len(rows)

    async def restore(self, rows: Sequence[tuple[int, str, bytes, int, int]], now_ms: int) -> None:
        """Put broadcasts in Redis (also what a rebuild does); idempotent."""
        live = [r for r in rows if r[4] > now_ms]
        if not live:
            return

        def build(pipe) -> None:
            for bid, app, payload, created, expires in live:
                key = body_key(bid)
                pipe.execute_command("HSET", key, "app", app, "payload", payload, "created_ms", created,
                                     "expires_ms", expires)
                pipe.execute_command("PEXPIREAT", key, expires)
                lkey = live_key(app)
                pipe.execute_command("ZADD", lkey, expires, bid)
                pipe.execute_command("ZREMRANGEBYSCORE", lkey, "-inf", now_ms)
                pipe.execute_command("PEXPIREAT", lkey, expires, "NX")
                pipe.execute_command("PEXPIREAT", lkey, expires, "GT")

        await run_pipeline(self._redis, build)

    # ------------------------------------------------------------------ load
    async def unacked(self, inboxes: Sequence[tuple[str, str]], now_ms: int,
                      limit: int) -> list[list[internal_pb2.StoredMessage]]:
        """Per (uid, app): the app's live broadcasts that (uid, app) has not acked, oldest first."""
        result: list[list[internal_pb2.StoredMessage]] = [[] for _ in inboxes]
        apps = list(dict.fromkeys(app for _, app in inboxes))
        if not apps:
            return result

        def build_live(pipe) -> None:
            for app in apps:
                pipe.execute_command("ZRANGEBYSCORE", live_key(app), f"({now_ms}", "+inf")

        replies = await run_pipeline(self._redis, build_live)
        live = {app: [int(b) for b in ids] for app, ids in zip(apps, replies, strict=True) if ids}
        if not live:
            return result
        wanted = [i for i, (_, app) in enumerate(inboxes) if app in live]
        missing = list(dict.fromkeys(b for ids in live.values() for b in ids if b not in self._bodies))

        def build_acked(pipe) -> None:
            for i in wanted:
                pipe.execute_command("HKEYS", acked_key(*inboxes[i]))
            for bid in missing:
                pipe.hmget(body_key(bid), ("app", "payload", "created_ms", "expires_ms"))

        replies = await run_pipeline(self._redis, build_acked)
        for bid, (app, payload, created, expires) in zip(missing, replies[len(wanted):], strict=True):
            if app is None:
                continue  # expired between the two reads
            if len(self._bodies) >= BODY_CACHE:
                self._prune_cache(now_ms)
            self._bodies[bid] = (app.decode(), payload or b"", int(created), int(expires))
        n = 0
        stale: list[tuple[int, list[bytes]]] = []
        for i, acked in zip(wanted, replies[:len(wanted)], strict=True):
            done = {int(f) for f in acked} if acked else ()
            out = result[i]
            ids = live[inboxes[i][1]]
            if len(done) > len(ids) or (done and not done <= set(ids)):
                alive = set(ids)
                stale.append((i, [f for f in acked if int(f) not in alive]))  # acked, since expired
            for bid in ids:
                if bid in done:
                    continue
                body = self._bodies.get(bid)
                if body is None or body[3] <= now_ms:
                    continue
                out.append(internal_pb2.StoredMessage(
                    msg_id=bid, app=body[0], payload=body[1], created_ms=body[2],
                    ttl_s=remaining_ttl_s(body[3], now_ms), broadcast=True))
                if len(out) >= limit:
                    break
            n += len(out)
        if stale:
            def build_prune(pipe) -> None:
                for i, fields in stale:
                    pipe.execute_command("HDEL", acked_key(*inboxes[i]), *fields)

            await run_pipeline(self._redis, build_prune)
        m.BROADCASTS_LOADED.inc(n)
        return result

    def _prune_cache(self, now_ms: int) -> None:
        for bid in [b for b, body in self._bodies.items() if body[3] <= now_ms]:
            del self._bodies[bid]
        while len(self._bodies) >= BODY_CACHE:
            del self._bodies[next(iter(self._bodies))]

    # ------------------------------------------------------------------ ack
    async def _expiries(self, per_app: dict[str, set[int]], now_ms: int) -> dict[int, int]:
        """Expiry of each acked id that is a live broadcast of its app: from the body cache, else
        one ZMSCORE per app for the ids it lacks (a flush acks a few distinct broadcasts)."""
        out: dict[int, int] = {}
        ask: dict[str, list[int]] = {}
        for app, ids in per_app.items():
            for bid in ids:
                body = self._bodies.get(bid)
                if body is not None and body[0] == app:
                    out[bid] = body[3]
                else:
                    ask.setdefault(app, []).append(bid)
        if ask:
            apps = list(ask)

            def build(pipe) -> None:
                for app in apps:
                    pipe.execute_command("ZMSCORE", live_key(app), *ask[app])

            for app, scores in zip(apps, await run_pipeline(self._redis, build), strict=True):
                for bid, score in zip(ask[app], scores, strict=True):
                    if score is not None:
                        out[bid] = int(float(score))
        return {bid: exp for bid, exp in out.items() if exp > now_ms}

    async def ack(self, refs: Sequence, now_ms: int) -> int:
        """Remember acked broadcasts per (uid, app): one HSET (id -> its expiry) per user in Redis,
        then one row per user in one MySQL statement (appended: the union of what each flush
        acked, so flushes of one user through different savers may commit in any order). Ids
        that are no live broadcast of the app are ignored. Returns the acks remembered."""
        per_user: dict[tuple[str, str], list[int]] = {}
        per_app: dict[str, set[int]] = {}
        for r in refs:
            ids = per_user.setdefault((r.uid, r.app), [])
            ids.append(r.msg_id)
            ids += r.more_broadcast_ids
            per_app.setdefault(r.app, set()).update(ids)
        expiry = await self._expiries(per_app, now_ms)
        rows = []
        for (uid, app), ids in per_user.items():
            pairs = [(bid, expiry[bid]) for bid in dict.fromkeys(ids) if bid in expiry]
            if pairs:
                rows.append((uid, app, pairs, max(e for _, e in pairs)))
        if not rows:
            return 0

        def build(pipe) -> None:
            for uid, app, pairs, latest in rows:
                key = acked_key(uid, app)
                pipe.execute_command("HSET", key, *[v for pair in pairs for v in pair])
                # the hash lives as long as its longest-lived broadcast (NX: a new hash has no TTL)
                pipe.execute_command("PEXPIREAT", key, latest, "NX")
                pipe.execute_command("PEXPIREAT", key, latest, "GT")

        await run_pipeline(self._redis, build)

        def sql(conn) -> str:
            values = ",".join(f"(X'{app.encode().hex()}',X'{uid.encode().hex()}',X'{pack_acked(pairs).hex()}',{e})"
                              for uid, app, pairs, e in rows)
            # assignments run left to right: acked sees the old expires_ms. A row whose every
            # broadcast expired starts afresh; one that keeps growing keeps its newest pairs.
            return ("INSERT INTO broadcast_acks (app, uid, acked, expires_ms) VALUES " + values
                    + f" ON DUPLICATE KEY UPDATE acked=IF(expires_ms<={int(now_ms)}, VALUES(acked),"
                      f" RIGHT(CONCAT(acked, VALUES(acked)), {ACKED_ROW_BYTES})),"
                      " expires_ms=GREATEST(expires_ms, VALUES(expires_ms))")

        await self._run_sql("broadcast_ack", sql, None, len(rows))
        n = sum(len(pairs) for _, _, pairs, _ in rows)
        m.BROADCASTS_ACKED.inc(n)
        return n

    # ------------------------------------------------------------------ rebuild
    async def rebuild(self, now_ms: int, page: int = 1000) -> tuple[int, int]:
        """After Redis lost its data: live broadcasts and users' acked sets back from MySQL.
        Returns (broadcasts, acked sets) restored."""
        rows = await self._journal.select(
            "broadcast_scan", "SELECT id, app, payload, created_ms, expires_ms FROM broadcasts WHERE expires_ms > %s",
            (now_ms,))
        await self.restore([(int(b), a, p, int(c), int(e)) for b, a, p, c, e in rows], now_ms)
        restored = 0
        after = (b"", b"")
        while True:
            acks = await self._journal.select(
                "broadcast_scan", "SELECT app, uid, acked, expires_ms FROM broadcast_acks WHERE expires_ms > %s "
                "AND (app, uid) > (%s, %s) ORDER BY app, uid LIMIT %s", (now_ms, after[0], after[1], page))
            if not acks:
                break

            def build(pipe, acks=acks) -> None:
                for app, uid, blob, expires in acks:
                    key = acked_key(uid.decode(), app.decode())
                    pairs = [(b, e) for b, e in unpack_acked(blob) if e > now_ms]
                    if not pairs:
                        continue
                    fields = [v for b, e in pairs for v in (b, e)]
                    pipe.execute_command("HSET", key, *fields)
                    pipe.execute_command("PEXPIREAT", key, int(expires))

            await run_pipeline(self._redis, build)
            restored += len(acks)
            after = (acks[-1][0], acks[-1][1])
            if len(acks) < page:
                break
        return len(rows), restored

    # ------------------------------------------------------------------ MySQL
    async def _run_sql(self, op: str, sql, args, rows: int) -> int:
        try:
            return await self._journal.execute(op, sql, args, rows)
        except Exception as exc:
            raise self._journal.failed(exc) from None


# broadcast ids one ref may carry (a client ACK frame holds at most 4,096 ids)
MAX_IDS_PER_REF = 4096


def check_broadcast_ref(r) -> None:
    check_uid(r.uid)
    if len(r.more_broadcast_ids) >= MAX_IDS_PER_REF:
        raise RequestError(f"at most {MAX_IDS_PER_REF} broadcast ids per ref")
    if not valid_app_id(r.app):
        raise RequestError(f"app {r.app[:64]!r} is not a valid app id")
    if r.msg_id <= 0:
        raise RequestError("msg_id must be > 0")
