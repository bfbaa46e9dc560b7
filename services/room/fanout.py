"""Broadcast fan-out in a room instance (gRPC Room.Broadcast, one sub-task of a broadcast).

Per app, one fan-out runs at a time over the app's sessions (``RoomInstance.by_app``, never a
scan of every connection). Broadcasts that arrive while a pass runs wait for the next one and
leave together: one PUSH frame carrying all of them (within the frame limit), encoded once and
written to each session in one write, so twenty broadcasts back to back cost a session a few
writes, not twenty. A pass runs in slices of ``slice_sessions`` that yield to the event loop in
between, so heartbeats, logins and unicast keep flowing while a large instance is written; with
a pacing limit (``max_per_s``, this instance's share of the app's deliveries per second) the
slices are spread out to keep to it.

A broadcast id this instance already fanned out answers its earlier count again without writing
anything (a sub-task retried or run twice by two centers is harmless); one still in flight is
joined. What a session already holds (its unacked copy, or the same copy from a login's inbox
load) is not written to it twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.common.codec import HEADER_SIZE, Op, encode
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room import metrics as m
from services.room.session import Held

# broadcast ids remembered as fanned out (each until its expiry); past this the oldest go
MAX_REMEMBERED = 10_000
# room for the PUSH frame's own fields beside the messages
FRAME_SLACK = 512


class BroadcastFanout:
    def __init__(self, room, slice_sessions: int = 2000, wall_ms: Callable[[], int] | None = None,
                 linger_s: float = 0.0) -> None:
        self.room = room
        self.slice_sessions = slice_sessions
        self.linger_s = linger_s
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self._queued: dict[str, list[tuple[ipb.StoredMessage, int, asyncio.Future]]] = {}
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[int, asyncio.Future] = {}
        self._done: dict[int, tuple[int, int]] = {}  # broadcast id -> (sessions written, expires_ms)
        self.passes = 0  # fan-out passes run (a pass carries one or more broadcasts)

    async def broadcast(self, message: ipb.StoredMessage, max_per_s: int = 0) -> int:
        """Write ``message`` to this instance's sessions bound to its app; the sessions written."""
        bid = message.msg_id
        done = self._done.get(bid)
        if done is not None:
            return done[0]
        fut = self._inflight.get(bid)
        if fut is None:
            fut = self._inflight[bid] = asyncio.get_running_loop().create_future()
            self._queued.setdefault(message.app, []).append((message, max_per_s, fut))
            if message.app not in self._running:
                self._running.add(message.app)
                task = asyncio.get_running_loop().create_task(self._run(message.app))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(fut)

    async def _gather(self, app: str) -> None:
        """Wait while broadcasts for ``app`` keep arriving: linger_s after the last one, at most
        four lingers in all (a quiet system waits one linger)."""
        if self.linger_s <= 0:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 4 * self.linger_s
        seen = -1
        while (n := len(self._queued.get(app, ()))) != seen and loop.time() < give_up:
            seen = n
            await asyncio.sleep(min(self.linger_s, max(0.0, give_up - loop.time())))

    async def _run(self, app: str) -> None:
        try:
            while True:
                await self._gather(app)
                queue = self._queued.pop(app, None)
                if not queue:
                    return
                batch, rest = self._fill_frame(queue)
                if rest:
                    self._queued[app] = rest + self._queued.get(app, [])
                try:
                    written = await self._pass(app, [msg for msg, _, _ in batch],
                                               min((r for _, r, _ in batch if r), default=0))
                except Exception as exc:  # a bug: fail the callers rather than leave them waiting
                    for msg, _, fut in batch:
                        self._inflight.pop(msg.msg_id, None)
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                self._remember([msg for msg, _, _ in batch], written)
                for msg, _, fut in batch:
                    self._inflight.pop(msg.msg_id, None)
                    if not fut.done():
                        fut.set_result(written)
        finally:
            self._running.discard(app)

    def _fill_frame(self, queue: list) -> tuple[list, list]:
        """As many queued broadcasts as fit in one PUSH frame (at least one), the rest."""
        budget = self.room.max_frame - HEADER_SIZE - FRAME_SLACK
        size = 0
        for i, (msg, _, _) in enumerate(queue):
            size += len(msg.payload) + 64
            if i and size > budget:
                return queue[:i], queue[i:]
        return queue, []

    def _remember(self, messages: list[ipb.StoredMessage], written: int) -> None:
        now = self._wall_ms()
        if len(self._done) + len(messages) > MAX_REMEMBERED:
            for bid in [b for b, (_, exp) in self._done.items() if exp <= now]:
                del self._done[bid]
            while len(self._done) + len(messages) > MAX_REMEMBERED:
                del self._done[next(iter(self._done))]
        for msg in messages:
            self._done[msg.msg_id] = (written, msg.created_ms + msg.ttl_s * 1000)

    async def _pass(self, app: str, messages: list[ipb.StoredMessage], max_per_s: int) -> int:
        room = self.room
        self.passes += 1
        held = [Held(msg.msg_id, app, msg.payload, msg.created_ms, 0, True) for msg in messages]
        frame = encode(Op.PUSH, cpb.Push(messages=[
            cpb.Message(msg_id=msg.msg_id, app=app, payload=msg.payload, created_ms=msg.created_ms, broadcast=True)
            for msg in messages]).SerializeToString())
        sessions = list(room.by_app.get(app, ()))
        step = self.slice_sessions
        if max_per_s:
            # about ten slices a second at the paced rate
            step = max(1, min(step, max_per_s // (10 * len(messages)) or 1))
        loop = asyncio.get_running_loop()
        started = loop.time()
        write = room.write_broadcast
        written = 0
        for start in range(0, len(sessions), step):
            for session in sessions[start:start + step]:
                written += write(session, frame, held)
            if start + step < len(sessions):
                if max_per_s:
                    due = started + (start + step) * len(messages) / max_per_s
                    await asyncio.sleep(max(0.0, due - loop.time()))
                else:
                    await asyncio.sleep(0)
        if written:
            m.frames_out[Op.PUSH].inc(written)
            m.broadcast_out.inc(written * len(messages))
        return written

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
