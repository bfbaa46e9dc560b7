"""MessageStore: the saver's core. Validates a batch, then drives the Redis inbox side and the
MySQL journal side. Holds no gRPC types beyond the protobuf messages it returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.common.pb import internal_pb2
from services.saver import keys, validation
from services.saver import metrics as m
from services.saver.config import SaverConfig
from services.saver.inbox import InboxStore
from services.saver.journal import MessageJournal


def _now_ms() -> int:
    return int(time.time() * 1000)


class MessageStore:
    def __init__(self, inbox: InboxStore, journal: MessageJournal, cfg: SaverConfig,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self.inbox = inbox
        self.journal = journal
        self.cfg = cfg
        self._now_ms = clock_ms

    async def store(self, messages: Sequence[internal_pb2.StoredMessage]) -> list[int]:
        """Durably store a batch; returns each message's per-(uid, app) seq, in request order.
        MySQL is written before the inbox, so a message that failed to store is never delivered."""
        items = validation.store_items(messages, self.cfg, self._now_ms())
        if not items:
            return []
        seqs = await self.inbox.assign_seqs(items)
        await self.journal.insert(items, seqs)
        await self.inbox.write(items, seqs)
        m.STORED.inc(len(items))
        return seqs

    async def load(self, raw_keys: Sequence[internal_pb2.InboxKey], limit: int) -> list[internal_pb2.Inbox]:
        per_key, limit = validation.load_keys(raw_keys, limit, self.cfg)
        flat = [pair for pairs in per_key for pair in pairs]
        loaded, pruned = await self.inbox.load(flat, limit, self._now_ms(), self.cfg.load_max_bytes)
        m.PRUNED.inc(pruned)
        out, pos = [], 0
        for key, pairs in zip(raw_keys, per_key, strict=True):
            msgs = [msg for i in range(pos, pos + len(pairs)) for msg in loaded[i]]
            pos += len(pairs)
            m.LOADED.inc(len(msgs))
            out.append(internal_pb2.Inbox(uid=key.uid, messages=msgs))
        return out

    async def ack(self, raw_refs: Sequence[internal_pb2.MessageRef]) -> int:
        refs = validation.refs("Ack", raw_refs, self.cfg)
        if not refs:
            return 0
        now = self._now_ms()
        acked = await self.inbox.ack(refs, now)
        await self.journal.mark_acked(acked, now)
        m.ACKED.inc(len(acked))
        return len(acked)

    async def mark_delivered(self, raw_refs: Sequence[internal_pb2.MessageRef]) -> int:
        refs = validation.refs("MarkDelivered", raw_refs, self.cfg)
        if not refs:
            return 0
        counted, parked = await self.inbox.mark_delivered(refs)
        await self.journal.mark_parked([r.msg_id for r in parked], self.cfg.max_attempts)
        m.DELIVERED.inc(counted)
        m.PARKED.inc(len(parked))
        return counted

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
