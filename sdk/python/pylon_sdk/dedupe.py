"""Bounded memory of recently delivered message ids (delivery is at-least-once; the app sees each once)."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """An LRU set of the last ``capacity`` ids. A duplicate arrives soon after the original
    (a lost ACK, a reconnect), so remembering the recent ones is enough."""

    __slots__ = ("capacity", "_ids")

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self._ids

    def seen(self, msg_id: int) -> bool:
        """True if ``msg_id`` was added before; refreshes its place so a redelivered id stays known."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return True
        return False

    def add(self, msg_id: int) -> None:
        self._ids[msg_id] = None
        self._ids.move_to_end(msg_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
