"""One timing wheel per room instance for every connection deadline (handshake, heartbeat).

No timer per connection: a connection sits in the bucket of the second its deadline falls in.
Moving a deadline later (a PING arrived) costs nothing here: the connection just updates its
own ``deadline``; when its old bucket comes due the wheel sees the later deadline and re-files
it. So each connection is touched about once per heartbeat interval, not once per PING.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class HasDeadline(Protocol):
    deadline: int  # whole seconds on the wheel's clock; 0 = no deadline (closed)


class HeartbeatWheel:
    __slots__ = ("_buckets", "_now", "size")

    def __init__(self, now: int) -> None:
        self._buckets: dict[int, list] = {}
        self._now = now
        self.size = 0

    def add(self, conn: HasDeadline) -> None:
        at = conn.deadline if conn.deadline > self._now else self._now + 1
        bucket = self._buckets.get(at)
        if bucket is None:
            self._buckets[at] = [conn]
        else:
            bucket.append(conn)
        self.size += 1

    def advance(self, now: int, expire: Callable[[HasDeadline], None]) -> int:
        """Process every bucket up to ``now``; ``expire`` each connection whose deadline passed."""
        expired = 0
        while self._now < now:
            self._now += 1
            bucket = self._buckets.pop(self._now, None)
            if not bucket:
                continue
            self.size -= len(bucket)
            for conn in bucket:
                d = conn.deadline
                if d == 0:
                    continue  # closed meanwhile
                if d > self._now:
                    self.add(conn)
                else:
                    expired += 1
                    expire(conn)
        return expired
