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
    filed_at: int  # the bucket of its live entry on the wheel; 0 = not on the wheel


class HeartbeatWheel:
    __slots__ = ("_buckets", "_now", "size")

    def __init__(self, now: int) -> None:
        self._buckets: dict[int, list] = {}
        self._now = now
        self.size = 0  # live entries

    def add(self, conn: HasDeadline) -> None:
        """File ``conn`` for its deadline. Already filed at or before that second: nothing to do
        (its entry re-files it when due). Filed later: a new entry, and the old one goes stale
        (skipped when its bucket comes due), so a session is on the wheel once, however often
        its deadline moves."""
        at = conn.deadline if conn.deadline > self._now else self._now + 1
        filed = conn.filed_at
        if filed and filed <= at:
            return
        if filed:
            self.size -= 1  # its old entry is stale now
        conn.filed_at = at
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
            second = self._now
            bucket = self._buckets.pop(second, None)
            if not bucket:
                continue
            for conn in bucket:
                if conn.filed_at != second:
                    continue  # a stale entry: it was filed again, earlier
                self.size -= 1
                conn.filed_at = 0
                d = conn.deadline
                if d == 0:
                    continue  # closed meanwhile
                if d > second:
                    self.add(conn)
                else:
                    expired += 1
                    expire(conn)
        return expired
