"""MessageStore: the saver's core. Validates a batch, then drives the Redis inbox side and the
MySQL journal side. Holds no gRPC types beyond the protobuf messages it returns.

What each answer means (every write is committed to MySQL before the RPC returns):
  Store         each message is a committed MySQL row and in its Redis inbox, numbered above
                every seq its (uid, app) pair had, in Redis or in MySQL;
  Ack           each owner's ack is committed to MySQL (whether or not Redis still had the
                message), so no rebuild brings it back; the count is acks Redis applied;
  MarkDelivered each counted attempt is in Redis and committed to MySQL (state delivered or
                parked, attempts), so a rebuild restores it.
Store, LoadInbox and MarkDelivered wait while Redis is being rebuilt from MySQL (EpochGuard),
up to the caller's deadline, and run again what Redis refused for want of an epoch.

Concurrent Store RPCs share their work (group commit): each RPC's validated messages are one
item of a ``Batcher``, and a flush numbers, journals and writes the messages of every RPC in it
together: one Redis pipeline to number them, one multi-row INSERT (through the journal's own
batcher) and one Redis pipeline to write them, whatever number of RPCs they came from. A flush
leaves at once when none is in flight and gathers behind one that is; an RPC's messages are
never split across flushes, so they are numbered in request order. A failed flush fails the
RPCs in it, and only those. Ack and MarkDelivered RPCs share their Redis pipeline and UPDATE
the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from services.common.batching import Batcher
from services.common.pb import internal_pb2
from services.saver import keys, validation
from services.saver import metrics as m
from services.saver.broadcasts import BroadcastStore, check_broadcast_ref
from services.saver.config import SaverConfig
from services.saver.epoch import EpochGuard
from services.saver.errors import BackendUnavailable, EpochMissing, RequestError
from services.saver.inbox import InboxStore
from services.saver.journal import MessageJournal

# Runs of an operation that Redis refused for want of an epoch: the first meets the loss, the
# second runs on the rebuilt data; a third covers a second loss during the rebuild.
EPOCH_TRIES = 3
# Messages (or refs) in one shared Store, Ack or MarkDelivered flush (a Redis pipeline holds
# one or two commands per message).
STORE_FLUSH_MESSAGES = 5000
# RPCs of one kind waiting for a flush at most (each one is also bounded by max_items).
STORE_MAX_PENDING_CALLS = 2000


def _now_ms() -> int:
    return int(time.time() * 1000)


class MessageStore:
    def __init__(self, inbox: InboxStore, journal: MessageJournal, guard: EpochGuard, cfg: SaverConfig,
                 clock_ms: Callable[[], int] = _now_ms, broadcasts: BroadcastStore | None = None) -> None:
        self.inbox = inbox
        self.broadcasts = broadcasts
        self.journal = journal
        self.guard = guard
        self.cfg = cfg
        self._now_ms = clock_ms
        # item: (validated messages of one Store RPC, loop time until which it may wait for a rebuild)
        self._stores: Batcher[tuple[list, float]] = Batcher(
            "saver_store", self._store_flush, max_batch=STORE_MAX_PENDING_CALLS, max_weight=STORE_FLUSH_MESSAGES,
            weigh=lambda call: len(call[0]), delay_s=cfg.mysql_batch_delay_s, max_pending=STORE_MAX_PENDING_CALLS,
            max_concurrent_flushes=cfg.mysql_flush_concurrency, tagged=True)  # its lines name the requests
        # item: the validated refs of one Ack RPC; of one MarkDelivered RPC with its rebuild deadline
        self._acks: Batcher[list] = Batcher(
            "saver_ack", self._ack_flush, max_batch=STORE_MAX_PENDING_CALLS, max_weight=STORE_FLUSH_MESSAGES,
            weigh=len, delay_s=cfg.mysql_batch_delay_s, max_pending=STORE_MAX_PENDING_CALLS,
            max_concurrent_flushes=2)
        self._deliveries: Batcher[tuple[list, float]] = Batcher(
            "saver_mark_delivered", self._delivered_flush, max_batch=STORE_MAX_PENDING_CALLS,
            max_weight=STORE_FLUSH_MESSAGES, weigh=lambda call: len(call[0]), delay_s=cfg.mysql_batch_delay_s,
            max_pending=STORE_MAX_PENDING_CALLS, max_concurrent_flushes=2)

    def _deadline(self, wait_s: float | None) -> float:
        """Loop time until which this call may wait for a rebuild."""
        wait = self.cfg.rebuild_wait_s if wait_s is None else min(wait_s, self.cfg.rebuild_wait_s)
        return asyncio.get_running_loop().time() + wait

    async def _until_whole(self, deadline: float) -> None:
        await self.guard.wait(deadline - asyncio.get_running_loop().time())

    async def store(self, messages: Sequence[internal_pb2.StoredMessage], wait_s: float | None = None) -> list[int]:
        """Durably store a batch; returns each message's per-(uid, app) seq, in request order.
        MySQL is written before the inbox, so a message that failed to store is never delivered.
        When Redis lost its data or was rebuilt while the batch was numbered, the batch is
        numbered again from the rebuilt counters (its rows renumbered: ON DUPLICATE KEY UPDATE)."""
        items = validation.store_items(messages, self.cfg, self._now_ms())
        if not items:
            return []
        deadline = self._deadline(wait_s)
        await self._until_whole(deadline)
        return (await self._stores.submit_many([(items, deadline)]))[0]

    async def _store_flush(self, calls: list[tuple[list, float]]) -> list:
        """The messages of every Store RPC in ``calls``, numbered, journaled and written together;
        each RPC's seqs, in its order. A failure is every RPC's result (the adapter maps and logs
        it, once per outage; the batcher would log it once per flush)."""
        try:
            return await self._store_together(calls)
        except Exception as exc:
            return [exc] * len(calls)

    async def _store_together(self, calls: list[tuple[list, float]]) -> list[list[int]]:
        items = [it for call_items, _ in calls for it in call_items]
        deadline = min(d for _, d in calls)
        for _ in range(EPOCH_TRIES):
            await self._until_whole(deadline)
            try:
                seqs, epoch = await self.inbox.assign_seqs(items)
                await self.journal.insert(items, seqs)
                await self.inbox.write(items, seqs, epoch)
            except EpochMissing:
                self.guard.lost()
                continue
            m.STORED.inc(len(items))
            out, pos = [], 0
            for call_items, _ in calls:
                out.append(seqs[pos:pos + len(call_items)])
                pos += len(call_items)
            return out
        raise BackendUnavailable("Redis", "lost its data again while this batch was stored; retry")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Finish the Store, Ack and MarkDelivered flushes queued or in flight."""
        for batcher in (self._stores, self._acks, self._deliveries):
            await batcher.drain(timeout_s)

    async def load(self, raw_keys: Sequence[internal_pb2.InboxKey], limit: int,
                   wait_s: float | None = None) -> list[internal_pb2.Inbox]:
        per_key, limit = validation.load_keys(raw_keys, limit, self.cfg)
        flat = [pair for pairs in per_key for pair in pairs]
        deadline = self._deadline(wait_s)
        broadcasts = None
        for _ in range(EPOCH_TRIES):
            await self._until_whole(deadline)
            now = self._now_ms()
            try:
                if self.broadcasts is None:
                    loaded, pruned = await self.inbox.load(flat, limit, now, self.cfg.load_max_bytes)
                else:  # the inbox and the app's live broadcasts, read side by side
                    (loaded, pruned), broadcasts = await asyncio.gather(
                        self.inbox.load(flat, limit, now, self.cfg.load_max_bytes),
                        self.broadcasts.unacked(flat, now, limit))
                break
            except EpochMissing:
                self.guard.lost()
        else:
            raise BackendUnavailable("Redis", "lost its data again while inboxes were loaded; retry")
        if broadcasts is not None:
            for mine, more in zip(loaded, broadcasts, strict=True):
                mine += more
        m.PRUNED.inc(pruned)
        out, pos = [], 0
        for key, pairs in zip(raw_keys, per_key, strict=True):
            msgs = [msg for i in range(pos, pos + len(pairs)) for msg in loaded[i]]
            pos += len(pairs)
            m.LOADED.inc(len(msgs))
            out.append(internal_pb2.Inbox(uid=key.uid, messages=msgs))
        return out

    async def ack(self, raw_refs: Sequence[internal_pb2.MessageRef]) -> int:
        """MySQL first (owner-checked there), then Redis: once the ack is committed no rebuild
        can bring the message back, whatever Redis knew of it. Never waits for a rebuild (see
        lua._ACK for how an ack and a concurrent rebuild meet). Concurrent Ack RPCs share the
        UPDATE and the Redis pipeline."""
        bc = [r for r in raw_refs if r.broadcast]
        if bc:
            return await self._ack_broadcasts(raw_refs, bc)
        refs = validation.refs("Ack", raw_refs, self.cfg)
        if not refs:
            return 0
        return (await self._acks.submit_many([refs]))[0]

    async def _ack_broadcasts(self, raw_refs, bc) -> int:
        """An Ack carrying broadcast refs: those go to the per-(uid, app) acked sets, the rest as usual."""
        if self.broadcasts is None:
            raise RequestError("Ack: this saver does not keep broadcasts")
        validation.check_count("Ack", len(raw_refs), self.cfg.max_items)
        for i, r in enumerate(bc):
            try:
                check_broadcast_ref(r)
            except RequestError as exc:
                raise RequestError(f"Ack: broadcast refs[{i}]: {exc}") from None
        rest = [r for r in raw_refs if not r.broadcast]
        n = 0
        if rest:
            refs = validation.refs("Ack", rest, self.cfg)
            n = (await self._acks.submit_many([refs]))[0]
        await self.broadcasts.ack(bc, self._now_ms())
        return n + len(bc)

    async def store_broadcast(self, messages: Sequence[internal_pb2.StoredMessage],
                              wait_s: float | None = None) -> int:
        if self.broadcasts is None:
            raise RequestError("StoreBroadcast: this saver does not keep broadcasts")
        self.broadcasts.validate(messages, self._now_ms())
        await self._until_whole(self._deadline(wait_s))
        return await self.broadcasts.store(messages, self._now_ms())

    async def _ack_flush(self, calls: list[list]) -> list:
        try:
            refs = [r for call in calls for r in call]
            now = self._now_ms()
            await self.journal.mark_acked(refs, now)
            acked = await self.inbox.ack(refs, now)
        except Exception as exc:
            return [exc] * len(calls)
        m.ACKED.inc(len(acked))
        # each RPC counts the acks Redis applied among its own refs (a msg_id in two RPCs: once)
        applied: dict[int, int] = {}
        for msg_id in acked:
            applied[msg_id] = applied.get(msg_id, 0) + 1
        out = []
        for call in calls:
            n = 0
            for r in call:
                if applied.get(r.msg_id, 0) > 0:
                    applied[r.msg_id] -= 1
                    n += 1
            out.append(n)
        return out

    async def mark_delivered(self, raw_refs: Sequence[internal_pb2.MessageRef], wait_s: float | None = None) -> int:
        """Count the attempts in Redis (owner-checked, atomic with the park decision), then commit
        state and attempts to MySQL. Refs Redis refused for want of an epoch were not counted;
        they are counted on the rebuilt records. Concurrent MarkDelivered RPCs share the Redis
        pipeline and the UPDATE."""
        refs = validation.refs("MarkDelivered", raw_refs, self.cfg)
        if not refs:
            return 0
        deadline = self._deadline(wait_s)
        await self._until_whole(deadline)
        return (await self._deliveries.submit_many([(refs, deadline)]))[0]

    async def _delivered_flush(self, calls: list[tuple[list, float]]) -> list:
        try:
            return await self._delivered_together(calls)
        except Exception as exc:
            return [exc] * len(calls)

    async def _delivered_together(self, calls: list[tuple[list, float]]) -> list:
        owner = {id(r): k for k, (call_refs, _) in enumerate(calls) for r in call_refs}
        refs = [r for call_refs, _ in calls for r in call_refs]
        deadline = min(d for _, d in calls)
        counted: list = []
        for _ in range(EPOCH_TRIES):
            await self._until_whole(deadline)
            done, refs = await self.inbox.mark_delivered(refs)
            counted += done
            if not refs:
                break
            self.guard.lost()
        await self.journal.mark_delivered([(r.msg_id, n) for r, n in counted])
        parked = sum(1 for _, n in counted if n < 0)
        m.DELIVERED.inc(len(counted))
        m.PARKED.inc(parked)
        out: list = [0] * len(calls)
        for r, _ in counted:
            out[owner[id(r)]] += 1
        if refs:  # what Redis refused again fails the RPCs it came from (the rest was counted)
            error = BackendUnavailable("Redis", f"lost its data again; {len(refs)} deliveries not counted, retry")
            for r in refs:
                out[owner[id(r)]] = error
        return out

    async def get(self, msg_id: int) -> internal_pb2.MessageState:
        validation.check_msg_id(msg_id)
        rec = await self.inbox.get(msg_id)
        if rec is None:
            rec = await self.journal.get(msg_id)
        if rec is None:
            return internal_pb2.MessageState(found=False, msg_id=msg_id)
        state = keys.derive_state(rec["state"], rec["expires_ms"], self._now_ms())
        return internal_pb2.MessageState(
            found=True, msg_id=msg_id, state=state, uid=rec["uid"], app=rec["app"], created_ms=rec["created_ms"],
            expires_ms=rec["expires_ms"], attempts=rec["attempts"], acked_ms=rec["acked_ms"], seq=rec["seq"])
