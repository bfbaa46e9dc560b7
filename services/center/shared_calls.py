"""The center's calls to saver, register and rooms, shared by concurrent pushes.

Every push request hands its messages to these queues instead of making its own Saver.Store,
Register.Lookup and Room.Push calls: one ``Batcher`` per call kind (and per room instance), so N
concurrent single-message requests cost about N / batch RPCs, not 3N (DESIGN.md §2; issue 8
measured ~2 ms of server CPU per RPC of one item). The batches adapt (services/common/batching):
a call leaves at once when none is in flight to that target, and what arrives meanwhile leaves
together when it returns (group commit). A request waits only for the batches carrying its own
items, and a failed call fails exactly the items (so the requests) it carried.

Large batches are split by bytes (``rpc_batch_bytes``) and items (``rpc_batch_items``) into
concurrent calls, as a single request's were before.

The queues are ``tagged``: each call names the requests whose items it carries (logs.REQUEST_IDS).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence

import grpc

from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.common.batching import Batcher
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)

# Envelope bytes of a StoredMessage besides payload and strings (ids, timestamps, tags).
MESSAGE_OVERHEAD = 64
# Calls in flight per queue (per room instance for pushes), and how long a batch gathering
# behind a call in flight waits for it before it takes the second slot. Calls take 3-15 ms here
# (Store includes the MySQL commit), so a batch normally leaves when the call ahead returns (pure
# group commit: concurrent requests merge into one call at every hop) and a stalled call holds the
# next batch 20 ms at most. Measured with 16 closed-loop HTTP connections: 4 slots and 2 ms gave
# 0.27 Store and 0.24 Lookup calls per message; 1 slot gave 0.15 and 0.15, 586 msg/s vs 428-562.
GATHER_S = 0.020
FLUSHES_IN_FLIGHT = 2


def message_size(m: pb.StoredMessage) -> int:
    return len(m.payload) + len(m.uid) + len(m.app) + MESSAGE_OVERHEAD


def chunk_spans(sizes: Sequence[int], max_bytes: int, max_items: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive slices of at most ``max_bytes`` and ``max_items`` (a larger item alone)."""
    start = size = 0
    for i, s in enumerate(sizes):
        if i > start and (size + s > max_bytes or i - start >= max_items):
            yield start, i
            start, size = i, 0
        size += s
    if start < len(sizes):
        yield start, len(sizes)


class StoreQueue:
    """Saver.Store shared across requests. Item: (owner, message); result: the message's seq.
    ``owner`` tells the requests apart: when saver refuses a shared call as INVALID_ARGUMENT
    (a limit stricter than center's), each request's part is tried on its own, so only the
    request that carries the bad message hears 400."""

    def __init__(self, saver: ServiceClient, *, max_batch: int, max_bytes: int, max_pending: int) -> None:
        self.saver = saver
        self.max_batch, self.max_bytes = max_batch, max_bytes
        self.queue: Batcher[tuple[int, pb.StoredMessage]] = Batcher(
            "center_store", self._flush, max_batch=max_batch, delay_s=GATHER_S, max_pending=max_pending,
            max_concurrent_flushes=FLUSHES_IN_FLIGHT, tagged=True)

    async def store(self, owner: int, messages: Sequence[pb.StoredMessage]) -> None:
        """Store ``messages`` (their ``seq`` is set from the answer); raises the center error for a failure."""
        seqs = await self.queue.submit_many([(owner, m) for m in messages])
        for m, seq in zip(messages, seqs, strict=True):
            if seq:
                m.seq = seq

    async def _flush(self, items: list[tuple[int, pb.StoredMessage]]) -> list:
        msgs = [m for _, m in items]
        spans = list(chunk_spans([message_size(m) for m in msgs], self.max_bytes, self.max_batch))
        parts = await asyncio.gather(*(self._call(items[a:b]) for a, b in spans))
        return [r for part in parts for r in part]

    async def _call(self, items: list[tuple[int, pb.StoredMessage]]) -> list:
        msgs = [m for _, m in items]
        try:
            reply = await self.saver.call("Store", pb.StoreRequest(messages=msgs))
        except BACKEND_ERRORS as exc:
            owners = list(dict.fromkeys(o for o, _ in items))
            if (len(owners) > 1 and isinstance(exc, grpc.aio.AioRpcError)
                    and exc.code() == grpc.StatusCode.INVALID_ARGUMENT):
                return await self._each_owner(items, owners)
            log.warning("Saver.Store of %d messages failed: %s", len(msgs), describe(exc))
            return [unavailable("saver", exc)] * len(items)
        if len(reply.seqs) != len(msgs):
            log.error("Saver.Store answered %d seqs for %d messages", len(reply.seqs), len(msgs))
            return [0] * len(items)
        return list(reply.seqs)

    async def _each_owner(self, items: list[tuple[int, pb.StoredMessage]], owners: list[int]) -> list:
        out: list = [None] * len(items)
        for owner in owners:
            idx = [i for i, (o, _) in enumerate(items) if o == owner]
            part = await self._call([items[i] for i in idx])
            for i, r in zip(idx, part, strict=True):
                out[i] = r
        return out


class LookupFailed:
    """The result of a uid whose Lookup call failed (the message waits in its inbox)."""

    __slots__ = ()


LOOKUP_FAILED = LookupFailed()


class LookupQueue:
    """Register.Lookup shared across requests. Item: uid; result: its ``UserSessions`` (None
    when register does not know it, LOOKUP_FAILED when the call failed); a uid asked by several
    requests at once is looked up once."""

    def __init__(self, register: ServiceClient, *, max_batch: int, max_pending: int) -> None:
        self.register = register
        self.max_batch = max_batch
        self.queue: Batcher[str] = Batcher("center_lookup", self._flush, max_batch=max_batch, delay_s=GATHER_S,
                                           max_pending=max_pending, max_concurrent_flushes=FLUSHES_IN_FLIGHT,
                                           tagged=True)

    async def lookup(self, uids: Sequence[str]) -> tuple[list[pb.UserSessions], bool]:
        """Sessions of ``uids``, and whether some of them could not be looked up."""
        got = await self.queue.submit_many(list(uids))
        return [u for u in got if isinstance(u, pb.UserSessions)], any(u is LOOKUP_FAILED for u in got)

    async def _flush(self, uids: list[str]) -> list:
        unique = list(dict.fromkeys(uids))
        step = self.max_batch
        chunks = [unique[i:i + step] for i in range(0, len(unique), step)]
        replies = await asyncio.gather(
            *(self.register.call("Lookup", pb.LookupRequest(uids=c)) for c in chunks), return_exceptions=True)
        found: dict[str, pb.UserSessions | LookupFailed] = {}
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, BACKEND_ERRORS):
                    raise reply
                log.warning("Register.Lookup of %d uids failed; messages wait in the inbox: %s", len(chunk),
                            describe(reply))
                for uid in chunk:
                    found[uid] = LOOKUP_FAILED
            else:
                for user in reply.users:
                    found[user.uid] = user
        return [found.get(uid) for uid in uids]


class RoomPushQueues:
    """Room.Push shared across requests, one queue per room instance (gRPC target). Item:
    (message, sessions expected); result: deliveries credited to that message. A room answers
    one total per call; when it equals the sum expected (every session written, the usual case)
    each message gets its own count exactly, else the total is credited in order."""

    def __init__(self, rooms: ServiceClient, *, deadline_s: float, max_batch: int, max_bytes: int,
                 max_pending: int, max_targets: int = 4096) -> None:
        self.rooms = rooms
        self.deadline_s = deadline_s
        self.max_batch, self.max_bytes, self.max_pending = max_batch, max_bytes, max_pending
        self.max_targets = max_targets
        self._queues: dict[str, Batcher] = {}

    def queue(self, target: str) -> Batcher:
        q = self._queues.get(target)
        if q is None:
            if len(self._queues) >= self.max_targets:  # instances come and go: forget the idle ones
                self._queues = {t: b for t, b in self._queues.items() if b.pending}
            q = self._queues[target] = Batcher(
                "center_room_push", self._flusher(target), max_batch=self.max_batch, delay_s=GATHER_S,
                max_pending=self.max_pending, max_concurrent_flushes=FLUSHES_IN_FLIGHT, tagged=True)
        return q

    def _flusher(self, target: str) -> Callable:
        async def flush(items: list[tuple[pb.StoredMessage, int]]) -> list:
            spans = chunk_spans([message_size(m) for m, _ in items], self.max_bytes, self.max_batch)
            parts = await asyncio.gather(*(self._call(target, items[a:b]) for a, b in spans))
            return [r for part in parts for r in part]
        return flush

    async def _call(self, target: str, items: list[tuple[pb.StoredMessage, int]]) -> list:
        try:
            reply = await self.rooms.call("Push", pb.PushRequest(messages=[m for m, _ in items]), target=target,
                                          deadline_s=self.deadline_s)
        except BACKEND_ERRORS as exc:
            return [exc] * len(items)
        left = reply.delivered
        out = []
        for _, expected in items:
            got = min(expected, left)
            out.append(got)
            left -= got
        if left and out:
            out[-1] += left  # more than expected (a session that registered since the lookup)
        return out
