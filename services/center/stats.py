"""The /v1/stats snapshot: rooms and their load, instances per service, this center's tallies (summed over
the processes that share its port)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from services.center.backend import BACKEND_ERRORS, unavailable
from services.center.shared_tally import SharedTallies
from services.center.telemetry import Tally
from services.common.discovery import Discovery

SERVICES = ("room", "register", "saver", "coordinator", "center", "dispatcher")
MAX_LISTED_ROOMS = 500  # the dashboard table; the totals always cover every room


class StatsCollector:
    def __init__(self, discovery: Discovery, tally: Tally, center_id: str = "",
                 clock: Callable[[], float] = time.time, group: SharedTallies | None = None) -> None:
        self.discovery = discovery
        self.tally = tally
        # the processes sharing this center's port: counters are their sum, whichever one answers
        self.group = group
        self.center_id = center_id
        self._clock = clock
        self._started = clock()

    async def snapshot(self) -> dict[str, Any]:
        try:
            found = await asyncio.gather(*(self.discovery.instances(s) for s in SERVICES))
        except BACKEND_ERRORS as exc:
            raise unavailable("discovery", exc) from exc
        by_service = dict(zip(SERVICES, found, strict=True))
        rooms = by_service["room"]
        return {
            "time_ms": int(self._clock() * 1000),
            "rooms": {
                "count": len(rooms),
                "sessions": sum(r.load for r in rooms),
                "capacity": sum(r.capacity for r in rooms),
                "draining": sum(1 for r in rooms if r.draining),
                "regions": sorted({r.region for r in rooms}),
                "instances": [{"id": r.id, "host": r.host, "port": r.port, "region": r.region, "load": r.load,
                               "capacity": r.capacity, "draining": r.draining, "nets": list(r.nets)}
                              for r in rooms[:MAX_LISTED_ROOMS]],
            },
            "instances": {s: len(v) for s, v in by_service.items()},
            "center": {"id": self.center_id, "uptime_s": round(self._clock() - self._started, 1), "pid": os.getpid(),
                       "processes": self.group.slots if self.group is not None else 1},
            "counters": self.group.total() if self.group is not None else self.tally.to_dict(),
        }
