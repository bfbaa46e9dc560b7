"""InboxStore: the saver's Redis side. Every operation is one or two pipelines per batch."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.pb import internal_pb2
from services.common.redis_scripts import run_pipeline
from services.saver import keys
from services.saver.errors import EpochMissing
from services.saver.keys import EPOCH_KEY, PENDING
from services.saver.lua import ACK, INBOX_ADD, INBOX_ADD_MAX_PAIRS, MARK_DELIVERED, SEQ_NEXT, STORE_BODY
from services.saver.validation import Ref, StoreItem

_LOAD_FIELDS = ("uid", "app", "payload", "created_ms", "expires_ms", "seq", "state")
_STATE_FIELDS = ("uid", "app", "created_ms", "expires_ms", "seq", "state", "attempts", "acked_ms", "tomb")
# An ack's tombstone (see lua._ACK) must outlive any rebuild that may have read the row before the
# ack committed; an hour is far beyond one (a million rows rebuild in well under a minute).
TOMBSTONE_TTL_S = 3600


def _int(raw: bytes | None) -> int:
    return int(raw) if raw else 0


class InboxStore:
    def __init__(self, redis, *, ack_retention_s: int, max_attempts: int, seq_ttl_s: int) -> None:
        self._redis = redis
        self.ack_retention_s = ack_retention_s
        self.max_attempts = max_attempts
        # The sequence counter outlives every message it numbered; an idle (user, app) pair
        # forgets it afterwards and starts again at 1 (a client sees a lower seq as a reset).
        self.seq_ttl_s = seq_ttl_s

    async def assign_seqs(self, items: Sequence[StoreItem]) -> tuple[list[int], bytes]:
        """Next per-(uid, app) sequence numbers, one counter bump per pair, in request order, and
        the epoch they were drawn under. Raises EpochMissing when Redis has no epoch."""
        counts: dict[tuple[str, str], int] = {}
        for it in items:
            pair = (it.uid, it.app)
            counts[pair] = counts.get(pair, 0) + 1
        pairs = list(counts)
        ttl = self.seq_ttl_s

        def build(pipe) -> None:
            for uid, app in pairs:
                SEQ_NEXT.queue(pipe, [keys.seq_key(uid, app), EPOCH_KEY], [counts[(uid, app)], ttl])

        replies = await run_pipeline(self._redis, build, (SEQ_NEXT,))
        if any(r is None for r in replies):
            raise EpochMissing("no epoch in Redis: sequence counters not rebuilt yet")
        epoch = replies[0][0]
        if any(r[0] != epoch for r in replies):
            raise EpochMissing("epoch changed while numbering")  # rebuilt mid-batch: number again
        next_seq = {pair: int(replies[i][1]) - counts[pair] + 1 for i, pair in enumerate(pairs)}
        seqs = []
        for it in items:
            pair = (it.uid, it.app)
            seqs.append(next_seq[pair])
            next_seq[pair] += 1
        return seqs, epoch

    async def write(self, items: Sequence[StoreItem], seqs: Sequence[int], epoch: bytes) -> None:
        """Bodies and inbox entries. Raises EpochMissing when Redis was rebuilt (or lost) since
        ``epoch``: the seqs may be numbers a rebuilt counter hands out again, so the caller
        numbers the batch afresh."""
        retention = self.ack_retention_s
        inboxes: dict[str, list] = {}  # inbox key -> [ttl_s, seq, msg_id, seq, msg_id, ...]
        for it, seq in zip(items, seqs, strict=True):
            entry = inboxes.setdefault(keys.inbox_key(it.uid, it.app), [0])
            if it.ttl_s > entry[0]:
                entry[0] = it.ttl_s
            entry += (seq, it.msg_id)

        def build(pipe) -> None:
            for it, seq in zip(items, seqs, strict=True):
                STORE_BODY.queue(pipe, [keys.message_key(it.msg_id), EPOCH_KEY], [
                    it.uid, it.app, it.payload, it.created_ms, it.expires_ms, seq, it.ttl_s + retention, epoch])
            step = 2 * INBOX_ADD_MAX_PAIRS
            for ikey, (ttl, *pairs) in inboxes.items():
                for i in range(0, len(pairs), step):
                    INBOX_ADD.queue(pipe, [ikey], [ttl, *pairs[i:i + step]])

        replies = await run_pipeline(self._redis, build, (STORE_BODY, INBOX_ADD))
        if any(r is None for r in replies[:len(items)]):
            raise EpochMissing("epoch changed since the batch was numbered")

    async def load(self, inboxes: Sequence[tuple[str, str]], limit: int, now_ms: int,
                   max_bytes: int) -> tuple[list[list[internal_pb2.StoredMessage]], int]:
        """Pending messages of each (uid, app) inbox, lowest seq first, at most ``limit`` each.
        Entries whose body is gone, expired, acked or parked are removed from the inbox.
        Returns (messages per inbox, entries pruned)."""
        result: list[list[internal_pb2.StoredMessage]] = [[] for _ in inboxes]
        if not inboxes:
            return result, 0

        # Each read pipeline starts with EXISTS epoch: without it the inboxes are missing or being
        # rebuilt, and an empty or partial answer would look like "nothing pending".
        def build_ranges(pipe) -> None:
            pipe.execute_command("EXISTS", EPOCH_KEY)
            for uid, app in inboxes:
                pipe.zrange(keys.inbox_key(uid, app), 0, limit - 1)

        epoch_ok, *ranges = await run_pipeline(self._redis, build_ranges)
        if not epoch_ok:
            raise EpochMissing("no epoch in Redis: inboxes not rebuilt yet")
        entries = [(i, member) for i, members in enumerate(ranges) for member in members]
        if not entries:
            return result, 0
        msg_ids = []
        for _, member in entries:
            try:
                msg_ids.append(int(member))
            except ValueError:
                msg_ids.append(0)  # not one of ours: pruned below

        def build_bodies(pipe) -> None:
            pipe.execute_command("EXISTS", EPOCH_KEY)
            for msg_id in msg_ids:
                pipe.hmget(keys.message_key(msg_id), _LOAD_FIELDS)

        epoch_ok, *bodies = await run_pipeline(self._redis, build_bodies)
        if not epoch_ok:
            raise EpochMissing("no epoch in Redis: inboxes not rebuilt yet")
        stale: dict[int, list[bytes]] = {}
        budget = max_bytes
        for (i, member), msg_id, body in zip(entries, msg_ids, bodies, strict=True):
            uid, app = inboxes[i]
            raw_uid, raw_app, payload, created, expires, seq, state = body
            if (not msg_id or not state or raw_uid != uid.encode() or raw_app != app.encode()
                    or state.decode() not in PENDING or _int(expires) <= now_ms):
                stale.setdefault(i, []).append(member)
                continue
            payload = payload or b""
            if len(payload) > budget:
                continue  # reply full: stays in the inbox for the next load
            budget -= len(payload)
            expires_ms = _int(expires)
            result[i].append(internal_pb2.StoredMessage(
                msg_id=msg_id, uid=uid, app=app, payload=payload, created_ms=_int(created),
                ttl_s=keys.remaining_ttl_s(expires_ms, now_ms), seq=_int(seq)))
        if stale:
            def build_prune(pipe) -> None:
                for i, members in stale.items():
                    pipe.zrem(keys.inbox_key(*inboxes[i]), *members)

            await run_pipeline(self._redis, build_prune)
        return result, sum(len(v) for v in stale.values())

    async def ack(self, refs: Sequence[Ref], now_ms: int) -> list[int]:
        """Apply acks by their owners; returns the msg ids whose state changed to acked. Call it
        after the acks are in MySQL: without an epoch it leaves tombstones (see lua._ACK)."""
        script = ACK
        retention = self.ack_retention_s

        def build(pipe) -> None:
            for r in refs:
                script.queue(pipe, [keys.message_key(r.msg_id), EPOCH_KEY],
                             [r.uid, r.app, now_ms, retention, TOMBSTONE_TTL_S, r.deliveries])
                # the acker's own inbox only: someone else's ack cannot touch this user's inbox
                pipe.zrem(keys.inbox_key(r.uid, r.app), str(r.msg_id))

        results = await run_pipeline(self._redis, build, (script,))
        return [r.msg_id for r, applied in zip(refs, results[0::2], strict=True) if applied]

    async def mark_delivered(self, refs: Sequence[Ref]) -> tuple[list[tuple[Ref, int]], list[Ref]]:
        """Count a delivery attempt per ref. Returns ((ref, attempts) per counted ref, negative when
        that attempt parked it; refs refused for want of an epoch)."""
        script = MARK_DELIVERED
        max_attempts = self.max_attempts

        def build(pipe) -> None:
            for r in refs:
                script.queue(pipe, [keys.message_key(r.msg_id), EPOCH_KEY], [r.uid, r.app, max_attempts])

        results = await run_pipeline(self._redis, build, (script,))
        counted = [(r, n) for r, n in zip(refs, results, strict=True) if n]
        refused = [r for r, n in zip(refs, results, strict=True) if n is None]
        parked = [r for r, n in counted if n < 0]
        if parked:
            def build_unqueue(pipe) -> None:
                for r in parked:
                    pipe.zrem(keys.inbox_key(r.uid, r.app), str(r.msg_id))

            await run_pipeline(self._redis, build_unqueue)
        return counted, refused

    async def get(self, msg_id: int) -> dict | None:
        """The message's record without payload, or None if Redis no longer has it."""
        values = await self._redis.hmget(keys.message_key(msg_id), _STATE_FIELDS)
        rec = dict(zip(_STATE_FIELDS, values, strict=True))
        if not rec["uid"] or not rec["state"] or rec["tomb"]:
            return None  # a tombstone is no answer: MySQL has the row (or there is none)
        return {
            "uid": rec["uid"].decode(), "app": (rec["app"] or b"").decode(), "state": rec["state"].decode(),
            "created_ms": _int(rec["created_ms"]), "expires_ms": _int(rec["expires_ms"]), "seq": _int(rec["seq"]),
            "attempts": _int(rec["attempts"]), "acked_ms": _int(rec["acked_ms"]),
        }
