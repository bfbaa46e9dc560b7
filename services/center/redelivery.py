"""Redelivery: stored messages whose way to the client failed after the store succeeded.

A push answers 200 once its messages are stored; the lookup in register and the room calls that
follow may fail (register restarting, a room call past its deadline). The message is safe in its
inbox, but a client that stays connected would only get it at its next connect, which may be
hours away. So those messages are tried again here, after 1, 2, 4 ... s, for ``max_age_s``; what
is still not through by then waits in the inbox for the next connect or inbox load. Bounded in
messages and bytes (past the bound a message is left to the inbox, counted); in memory, so a
center that dies forgets them, and they too wait in the inbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter, Gauge

from services.common import logs
from services.common.pb import internal_pb2 as pb

log = logging.getLogger(__name__)

RETRIED = Counter("pylon_center_redelivery_attempts_total", "Messages tried again after a failed lookup or room call")
LEFT = Counter("pylon_center_redelivery_left_total",
               "Messages left to the inbox (next connect) by redelivery, by reason", ["reason"])
WAITING = Gauge("pylon_center_redelivery_waiting", "Stored messages waiting to be tried again")

PAUSES_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class Redelivery:
    def __init__(self, deliver: Callable[[list[pb.StoredMessage]], Awaitable[Sequence[pb.StoredMessage]]], *,
                 max_messages: int = 100_000, max_bytes: int = 64 * 1024 * 1024, max_age_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # deliver(messages) -> those whose way failed again
        self._deliver = deliver
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._waiting: list[tuple[float, int, float, pb.StoredMessage]] = []  # (due, attempt, first, message)
        self._bytes = 0
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, messages: Sequence[pb.StoredMessage], attempt: int = 0, first: float | None = None) -> None:
        now = self._clock()
        first = now if first is None else first
        if now - first >= self.max_age_s:
            LEFT.labels("too_old").inc(len(messages))
            return
        due = now + PAUSES_S[min(attempt, len(PAUSES_S) - 1)]  # the last pause again until max_age_s
        for m in messages:
            size = len(m.payload)
            if len(self._waiting) >= self.max_messages or self._bytes + size > self.max_bytes:
                LEFT.labels("full").inc()
                continue
            self._waiting.append((due, attempt, first, m))
            self._bytes += size
        WAITING.set(len(self._waiting))
        if self._waiting and self._task is None:
            # started by one request's push, it then retries the messages of many
            self._task = asyncio.get_running_loop().create_task(self._run(), context=logs.without_request_ids())

    async def _run(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(max(0.05, min(d for d, _, _, _ in self._waiting) - self._clock()))
                await self.run_due()
        finally:
            self._task = None

    async def run_due(self) -> int:
        """Try every message that is due; returns how many were tried."""
        now = self._clock()
        due = [w for w in self._waiting if w[0] <= now]
        if not due:
            return 0
        self._waiting = [w for w in self._waiting if w[0] > now]
        self._bytes = sum(len(w[3].payload) for w in self._waiting)
        WAITING.set(len(self._waiting))
        messages = [w[3] for w in due]
        RETRIED.inc(len(messages))
        try:
            failed = set(id(m) for m in await self._deliver(messages))
        except Exception as exc:  # everything failed again
            log.warning("redelivery of %d messages failed: %s", len(messages), exc)
            failed = {id(m) for m in messages}
        for _, attempt, first, m in due:
            if id(m) in failed:
                self.add([m], attempt + 1, first)
        return len(messages)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
