"""The dashboard tallies of K center processes that serve one port, in one shared mapping.

A client of ``/v1/stats`` cannot choose which of the K processes answers, and the dashboard turns
the difference between two snapshots into per-second rates: every process must report the same,
monotonic sums. The supervisor maps one anonymous shared region before it forks; process *i*
writes only its own slot (one event-loop thread per process, so one writer per slot; aligned
8-byte stores are not torn on the platforms we run), and any process sums every slot. A process
started again in its slot continues from the counts its predecessor left, so a restart neither
loses nor repeats anything. Prometheus needs none of this: each process exports its own series
on its own metrics port, and the series are summed there.
"""

from __future__ import annotations

import dataclasses
import mmap

from services.center.telemetry import Tally

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Tally))
_WORD = 8  # bytes of one signed 64-bit counter


class SharedTallies:
    """``slots`` tallies in memory that forked children share (created before the fork)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, max(1, slots * len(FIELDS) * _WORD))  # anonymous + MAP_SHARED
        self._words = memoryview(self._mem).cast("q")

    def slot(self, index: int) -> SlotTally:
        if not 0 <= index < self.slots:
            raise IndexError(f"tally slot {index} of {self.slots}")
        return SlotTally(self._words, index * len(FIELDS))

    def total(self) -> dict[str, int]:
        words, n = self._words, len(FIELDS)
        return {name: sum(words[s * n + i] for s in range(self.slots)) for i, name in enumerate(FIELDS)}


class SlotTally:
    """A ``Tally`` (same attribute names, same ``to_dict``) whose counters live in a shared slot."""

    __slots__ = ("_words", "_base")

    def __init__(self, words: memoryview, base: int) -> None:
        self._words = words
        self._base = base

    def to_dict(self) -> dict[str, int]:
        return {name: self._words[self._base + i] for i, name in enumerate(FIELDS)}


def _counter(i: int) -> property:
    def get(self: SlotTally) -> int:
        return self._words[self._base + i]

    def put(self: SlotTally, value: int) -> None:
        self._words[self._base + i] = value

    return property(get, put)


for _i, _name in enumerate(FIELDS):
    setattr(SlotTally, _name, _counter(_i))
