"""Every app's secret, held in memory so that AUTH verifies a token without I/O.

One background refresh reads ``pylon:apps`` (HGETALL) every few seconds. An AUTH naming an
app not in the table waits for one coalesced refresh (a new app works within milliseconds) —
the waiting connection is parked in a list, not given a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.common import apps as apps_mod
from services.common.apps import App

log = logging.getLogger(__name__)


class AppCache:
    def __init__(self, redis, refresh_s: float = 5.0, max_waiters: int = 10_000) -> None:
        self._redis = redis
        self.refresh_s = refresh_s
        self.max_waiters = max_waiters
        self.apps: dict[str, App] = {}
        self._waiters: list[Callable[[bool], None]] = []
        self._refreshing = False
        self._task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self.loaded = False

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    def get(self, app_id: str) -> App | None:
        return self.apps.get(app_id)

    def wait_refresh(self, callback: Callable[[bool], None]) -> bool:
        """Call ``callback(ok)`` after the next refresh; False if too many are waiting already."""
        if len(self._waiters) >= self.max_waiters:
            return False
        self._waiters.append(callback)
        if not self._refreshing:
            self._refreshing = True  # now, not when the task first runs: one refresh for a burst of misses
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
        return True

    async def _refresh(self) -> None:
        self._refreshing = True
        ok = True
        try:
            raw = await self._redis.hgetall(apps_mod.REDIS_KEY)
            table = {}
            for key, value in raw.items():
                try:
                    app = App.from_json(value)
                except (ValueError, TypeError) as exc:
                    log.warning("skipping bad app record %r: %s", key, exc)
                    continue
                table[app.id] = app
            if table or not self.apps:
                self.apps = table
            else:
                # the whole table gone at once: Redis lost its data (center puts it back within a
                # second or two); refusing every AUTH with UNKNOWN_APP meanwhile would make SDKs
                # give up for good, so keep what we had
                log.warning("app table is empty in Redis; keeping the %d apps known until it is back", len(self.apps))
            self.loaded = True
        except Exception as exc:
            ok = False
            log.warning("app table refresh failed: %s", exc)
        finally:
            self._refreshing = False
            waiters, self._waiters = self._waiters, []
            for cb in waiters:
                cb(ok)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            if not self._refreshing:
                await self._refresh()
