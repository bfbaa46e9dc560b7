"""64-bit, time-ordered message ids, unique across processes (DESIGN.md §4).

Layout (snowflake): 41 bits of milliseconds since 2024-01-01 UTC (good until 2093),
10 bits of node id, 12 bits of per-millisecond sequence (4096 ids per ms per node).
Node ids are leased from Redis at start (``lease_node_id``) so two centers never share one.
"""

from __future__ import annotations

import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
_SEQ_MASK = (1 << SEQ_BITS) - 1


class IdGenerator:
    __slots__ = ("node", "_last_ms", "_seq", "_clock")

    def __init__(self, node: int, clock=time.time) -> None:
        if not 0 <= node <= MAX_NODE:
            raise ValueError(f"node id {node} outside 0..{MAX_NODE}")
        self.node = node
        self._last_ms = 0
        self._seq = 0
        self._clock = clock

    def next(self) -> int:
        now = int(self._clock() * 1000)
        if now <= self._last_ms:
            # same millisecond, or the clock went back: keep counting on the last timestamp
            now = self._last_ms
            self._seq = (self._seq + 1) & _SEQ_MASK
            if self._seq == 0:
                now += 1  # 4096 ids used in this ms: borrow the next one
        else:
            self._seq = 0
        self._last_ms = now
        return ((now - EPOCH_MS) << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | self._seq

    def batch(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]


def timestamp_ms(msg_id: int) -> int:
    return (msg_id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS


async def lease_node_id(redis, service: str) -> int:
    """A node id unique among live processes: INCR a counter, modulo the id space."""
    n = await redis.incr("pylon:idnode")
    return int(n) % (MAX_NODE + 1)
