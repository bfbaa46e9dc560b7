"""The cluster-wide overview behind ``GET /v1/admin/overview``, the dashboard and ``pylon status``.

Every process announces a metrics address in discovery; a sampler scrapes them all every
``sample_s`` and keeps ``window_s`` of aggregated samples in memory, so that a dashboard opened
now draws the last 15 minutes at once. A request answers from the newest sample plus a fresh look
at discovery and the stores, cached for ``cache_s``: a hundred open dashboards cost one build a
second, not a hundred.

Rates are per-process counter differences between two samples, summed: a process that restarted
(its counter went down) counts from zero, so a restart never shows as a negative rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.center.backend import BACKEND_ERRORS, describe
from services.center.cluster_metrics import MetricsScraper, Scrape
from services.common.discovery import Discovery, Instance

log = logging.getLogger(__name__)

SERVICES = ("room", "register", "saver", "coordinator", "center", "dispatcher")
SAMPLE_S = 5.0
WINDOW_S = 15 * 60.0
CACHE_S = 1.0
# a process that does not answer a scrape keeps its last counters this long (see aggregate)
CARRY_MAX_S = 60.0
# a room instance that left discovery is listed as "gone" this long (then forgotten)
GONE_KEPT_S = WINDOW_S
MAX_LISTED_ROOMS = 500
# parked per app is a scan of MySQL's message log: taken this often, not every sample
PARKED_EVERY_S = 15.0
# MySQL counts parked rows with a full scan (no (app, state) index); MariaDB stops it after this
PARKED_QUERY_MAX_S = 1.0
STORE_CHECK_TIMEOUT_S = 1.0

# counters: figure -> (series, label filter); a rate per second is derived for each
COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "messages": ("pylon_center_push_messages_total", {}),
    "pushes": ("pylon_center_push_requests_total", {"kind": "unicast"}),
    "broadcasts": ("pylon_center_push_requests_total", {"kind": "broadcast"}),
    "delivered": ("pylon_room_messages_delivered_total", {}),
    "acks": ("pylon_room_acks_total", {}),
    "connects": ("pylon_room_auths_total", {"result": "ok"}),
    "auths": ("pylon_room_auths_total", {}),
    "upstream": ("pylon_room_upstream_total", {"outcome": "accepted"}),
    "parked": ("pylon_saver_messages_parked_total", {}),
    "stored": ("pylon_saver_messages_stored_total", {}),
    "saver_errors": ("pylon_saver_backend_errors_total", {}),
    "register_errors": ("pylon_register_redis_errors_total", {}),
    "webhook_events": ("pylon_webhook_events_delivered_total", {}),
    "webhook_dropped": ("pylon_webhook_events_dropped_total", {}),
    "webhook_attempts": ("pylon_webhook_requests_total", {}),
    "webhook_ok": ("pylon_webhook_requests_total", {"outcome": "ok"}),
    "rpc_calls": ("pylon_rpc_seconds_count", {}),
    "rpc_ok": ("pylon_rpc_seconds_count", {"outcome": "ok"}),
    "http_requests": ("pylon_center_http_requests_total", {}),
}
# per-app counters: figure -> series with an "app" label
APP_COUNTERS = {"messages": "pylon_center_app_messages_total", "broadcasts": "pylon_center_app_broadcasts_total"}
GAUGES = {
    "connections": "pylon_room_connections",
    "sessions": "pylon_room_sessions",
    "detached": "pylon_room_detached_sessions",
    "webhook_queue": "pylon_webhook_queue_depth",
    "saver_rebuilding": "pylon_saver_rebuilding",
}
# online per app: every room instance's sessions bound to each app (OPEN and DETACHED)
APP_SESSIONS = "pylon_room_app_sessions"
WANTED = frozenset({s for s, _ in COUNTERS.values()} | set(APP_COUNTERS.values()) | set(GAUGES.values())
                   | {"pylon_center_http_requests_total", APP_SESSIONS})
# the charts: figure names in each sample's "rates" or "gauges"
CHART_RATES = ("messages", "delivered", "acks", "connects", "broadcasts", "errors")
CHART_GAUGES = ("sessions", "connections")


def _counter_values(scrape: Scrape) -> dict[str, float]:
    out = {name: scrape.value(series, **match) for name, (series, match) in COUNTERS.items()}
    statuses = scrape.by_label("pylon_center_http_requests_total", "status")
    out["http_5xx"] = sum(v for s, v in statuses.items() if s.startswith("5"))
    for fig, series in APP_COUNTERS.items():
        for app, v in scrape.by_label(series, "app").items():
            out[f"app:{fig}:{app}"] = v
    return out


def _delta(now: float, before: float | None) -> float:
    if before is None:
        return 0.0
    return now - before if now >= before else now  # restarted: counts from 0


@dataclass(slots=True)
class Sample:
    """One point of the ring: gauges summed over the cluster, rates since the previous sample."""

    t_ms: int
    gauges: dict[str, float]
    rates: dict[str, float]
    app_rates: dict[str, dict[str, float]]
    app_queue: dict[str, float]
    # per process: counter name -> value (kept only for the newest sample, to diff the next one)
    counters: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    stamps: dict[str, int] = field(default_factory=dict, repr=False)  # when each process's counters were read
    room_connections: dict[str, float] = field(default_factory=dict)
    app_online: dict[str, float] = field(default_factory=dict)  # sessions per app over the rooms that answered
    scraped: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)


def aggregate(scrapes: list[Scrape], previous: Sample | None, t_ms: int) -> Sample:
    """A sample from one round of scrapes; rates against ``previous`` (pure, no I/O).

    Each process's rate is its own counter difference over its own interval: a process that did
    not answer one round keeps its last values (up to ``CARRY_MAX_S``) and its next answer covers
    both intervals, so a slow scrape neither drops nor doubles its share of a rate."""
    gauges = dict.fromkeys(GAUGES, 0.0)
    app_queue: dict[str, float] = {}
    counters: dict[str, dict[str, float]] = {}
    stamps: dict[str, int] = {}
    room_connections: dict[str, float] = {}
    app_online: dict[str, float] = {}
    failed = []
    for s in scrapes:
        proc = f"{s.instance.service}/{s.instance.id}"
        if s.error:
            failed.append({"service": s.instance.service, "id": s.instance.id, "error": s.error[:200]})
            if previous is not None and proc in previous.counters \
                    and t_ms - previous.stamps[proc] <= CARRY_MAX_S * 1000:
                counters[proc], stamps[proc] = previous.counters[proc], previous.stamps[proc]
            continue
        for name, series in GAUGES.items():
            gauges[name] += s.value(series)
        for app, v in s.by_label(GAUGES["webhook_queue"], "app").items():
            app_queue[app] = app_queue.get(app, 0.0) + v
        counters[proc], stamps[proc] = _counter_values(s), t_ms
        if s.instance.service == "room":
            room_connections[s.instance.id] = s.value(GAUGES["connections"])
            for app, v in s.by_label(APP_SESSIONS, "app").items():
                app_online[app] = app_online.get(app, 0.0) + v
    rates: dict[str, float] = {}
    app_rates: dict[str, dict[str, float]] = {}
    if previous is not None and t_ms > previous.t_ms:
        sums: dict[str, float] = dict.fromkeys((*COUNTERS, "http_5xx"), 0.0)
        for proc, values in counters.items():
            before = previous.counters.get(proc)
            # no baseline (a new process, or one silent for longer than CARRY_MAX_S): it counts
            # from its next sample; carried values (no answer now) wait for the next answer
            if not before or stamps[proc] != t_ms:
                continue
            dt = (t_ms - previous.stamps[proc]) / 1000
            for name, v in values.items():
                # a series new in a known process (an app's first push) counts from 0
                sums[name] = sums.get(name, 0.0) + _delta(v, before.get(name, 0.0)) / dt
        for key, v in sums.items():
            if key.startswith("app:"):
                _, fig, app = key.split(":", 2)
                app_rates.setdefault(app, {})[fig] = v
            else:
                rates[key] = v
        rates["errors"] = rates["http_5xx"] + (rates["rpc_calls"] - rates["rpc_ok"]) + rates["saver_errors"] \
            + rates["register_errors"]
        rates["webhook_failed"] = rates["webhook_attempts"] - rates["webhook_ok"]
    return Sample(t_ms=t_ms, gauges=gauges, rates=rates, app_rates=app_rates, app_queue=app_queue,
                  counters=counters, stamps=stamps, room_connections=room_connections, app_online=app_online,
                  scraped=len(scrapes), failed=failed)


@dataclass(slots=True)
class AppStoreFigures:
    """Per-app figures read from the stores, not from metrics."""

    online: dict[str, int] = field(default_factory=dict)
    online_error: str = ""
    parked: dict[str, int] = field(default_factory=dict)
    parked_error: str = ""
    apps: list[str] = field(default_factory=list)
    t_ms: int = 0


async def app_ids(pool) -> list[str]:
    """Every app in the app table (the operator creates them: a short list)."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id FROM apps ORDER BY id LIMIT 1000")
        return [str(row[0]) for row in await cur.fetchall()]


async def parked_per_app(pool) -> dict[str, int]:
    """Parked messages per app in the durable log (state 3, not yet expired)."""
    now_ms = int(time.time() * 1000)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SET STATEMENT max_statement_time={PARKED_QUERY_MAX_S} FOR "
            "SELECT app, COUNT(*) FROM messages WHERE state = 3 AND expires_ms > %s GROUP BY app", (now_ms,))
        return {str(app): int(n) for app, n in await cur.fetchall()}


class OverviewCollector:
    """Samples the cluster in the background and answers overview requests (see module doc)."""

    def __init__(self, discovery: Discovery, scraper: MetricsScraper, redis, pool, center_id: str = "",
                 sample_s: float = SAMPLE_S, window_s: float = WINDOW_S, cache_s: float = CACHE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.discovery = discovery
        self.scraper = scraper
        self._redis = redis
        self._pool = pool
        self.center_id = center_id
        self.sample_s = sample_s
        self.window_s = window_s
        self.cache_s = cache_s
        self._clock = clock
        self.ring: deque[Sample] = deque(maxlen=max(2, int(window_s / sample_s) + 1))
        self._rooms_seen: dict[str, tuple[Instance, int]] = {}
        self._app_store = AppStoreFigures()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._build_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.scraper.close()

    async def _sample_loop(self) -> None:
        last_tables = -PARKED_EVERY_S
        while True:
            started = time.monotonic()
            try:
                await self.sample()
                await self._read_apps()
                if started - last_tables >= PARKED_EVERY_S:
                    last_tables = started
                    await self._read_tables()
            except Exception:  # a bug here must not end the sampling; logged once per sample
                log.exception("overview sample failed")
            await asyncio.sleep(max(0.1, self.sample_s - (time.monotonic() - started)))

    # ------------------------------------------------------------ sampling

    async def _instances(self) -> tuple[dict[str, list[Instance]], str]:
        try:
            found = await asyncio.gather(*(self.discovery.instances(s) for s in SERVICES))
        except BACKEND_ERRORS as exc:
            return {s: [] for s in SERVICES}, describe(exc)
        return dict(zip(SERVICES, found, strict=True)), ""

    async def sample(self) -> Sample:
        by_service, _ = await self._instances()
        targets = {i.metrics or f"{i.service}/{i.id}": i for group in by_service.values() for i in group}
        scrapes = await self.scraper.scrape(targets.values(), WANTED)
        previous = self.ring[-1] if self.ring else None
        sample = aggregate(scrapes, previous, int(self._clock() * 1000))
        # sessions as discovery has them (what the cards show), even for a room that did not answer
        sample.gauges["sessions"] = float(sum(r.load for r in by_service["room"]))
        if previous is not None:
            previous.counters, previous.stamps = {}, {}  # only the newest keeps per-process values
        self.ring.append(sample)
        self._online_from(sample)
        return sample

    def _online_from(self, sample: Sample) -> None:
        """Online per app from the rooms' own counts (no read of the session store): exact for
        the instances that answered; short by those that did not, which the overview says."""
        figures = self._app_store
        figures.online = {app: int(v) for app, v in sample.app_online.items()}
        silent = sum(f["service"] == "room" for f in sample.failed)
        figures.online_error = f"{silent} room instances did not answer; their sessions are not counted" if silent else ""
        figures.t_ms = sample.t_ms

    async def _read_apps(self) -> None:
        try:
            self._app_store.apps = await asyncio.wait_for(app_ids(self._pool), STORE_CHECK_TIMEOUT_S)
        except (*BACKEND_ERRORS, TimeoutError) as exc:  # the list stays as it was; MySQL's health says why
            log.debug("app list not read: %s", describe(exc))

    async def _read_tables(self) -> None:
        figures = self._app_store
        try:
            figures.parked = await asyncio.wait_for(parked_per_app(self._pool), PARKED_QUERY_MAX_S * 2)
            figures.parked_error = ""
        except (*BACKEND_ERRORS, TimeoutError) as exc:
            figures.parked_error = describe(exc)

    # ------------------------------------------------------------ answering

    async def overview(self) -> dict[str, Any]:
        async with self._build_lock:  # callers arriving during a build wait for it and share it
            if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
            result = await self._build()
            self._cached = (time.monotonic(), result)
            return result

    async def _health_stores(self) -> dict[str, dict[str, Any]]:
        async def redis_check() -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(self._redis.ping(), STORE_CHECK_TIMEOUT_S)
            except (*BACKEND_ERRORS, TimeoutError) as exc:
                return {"state": "down", "detail": describe(exc)}
            return {"state": "ok", "detail": f"ping {1000 * (time.perf_counter() - t0):.1f} ms"}

        async def mysql_check() -> dict[str, Any]:
            t0 = time.perf_counter()

            async def select_one() -> None:
                async with self._pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT 1")
                    await cur.fetchall()
            try:
                await asyncio.wait_for(select_one(), STORE_CHECK_TIMEOUT_S)
            except (*BACKEND_ERRORS, TimeoutError) as exc:
                return {"state": "down", "detail": describe(exc)}
            return {"state": "ok", "detail": f"SELECT 1 {1000 * (time.perf_counter() - t0):.1f} ms"}

        redis_state, mysql_state = await asyncio.gather(redis_check(), mysql_check())
        return {"redis": redis_state, "mysql": mysql_state}

    def _rooms(self, live: list[Instance], sample: Sample | None, now_ms: int) -> list[dict[str, Any]]:
        for r in live:
            self._rooms_seen[r.id] = (r, now_ms)
        live_ids = {r.id for r in live}
        for rid, (_, seen) in list(self._rooms_seen.items()):
            if rid not in live_ids and now_ms - seen > GONE_KEPT_S * 1000:
                del self._rooms_seen[rid]
        connections = sample.room_connections if sample is not None else {}
        out = []
        for rid, (r, seen) in sorted(self._rooms_seen.items()):
            state = "gone" if rid not in live_ids else ("draining" if r.draining else "live")
            out.append({"id": r.id, "host": r.host, "port": r.port, "region": r.region,
                        "sessions": r.load if state != "gone" else 0, "capacity": r.capacity,
                        "connections": int(connections.get(rid, 0)) if state != "gone" else 0,
                        "fill": round(r.load / r.capacity, 4) if r.capacity and state != "gone" else 0.0,
                        "state": state, "nets": list(r.nets), "last_seen_ms": seen, "started_ms": r.started_ms})
        order = {"live": 0, "draining": 1, "gone": 2}
        out.sort(key=lambda x: (order[x["state"]], x["id"]))
        return out[:MAX_LISTED_ROOMS]

    def _service_health(self, by_service: dict[str, list[Instance]], rates: dict[str, float],
                        gauges: dict[str, float], app_queue: dict[str, float]) -> dict[str, dict[str, Any]]:
        def state(n: int, trouble: str) -> str:
            return "down" if n == 0 else ("warn" if trouble else "ok")

        saver_n, register_n, coord_n = (len(by_service[s]) for s in ("saver", "register", "coordinator"))
        saver_trouble = ("rebuilding Redis from MySQL" if gauges.get("saver_rebuilding") else
                         f"{rates.get('saver_errors', 0):.1f} backend errors/s" if rates.get("saver_errors") else "")
        register_trouble = (f"{rates.get('register_errors', 0):.1f} Redis errors/s"
                            if rates.get("register_errors") else "")
        failed = rates.get("webhook_failed", 0.0)
        dropped = rates.get("webhook_dropped", 0.0)
        queue = sum(app_queue.values())
        hooks_trouble = (f"{failed:.1f} failed attempts/s" if failed else "") or \
            (f"{dropped:.1f} events dropped/s" if dropped else "")
        return {
            "saver": {"state": state(saver_n, saver_trouble), "instances": saver_n,
                      "detail": saver_trouble or f"{rates.get('stored', 0):.1f} stored/s"},
            "register": {"state": state(register_n, register_trouble), "instances": register_n,
                         "detail": register_trouble or "no errors"},
            "coordinator": {"state": state(coord_n, ""), "instances": coord_n, "detail": ""},
            "webhooks": {"state": "down" if coord_n == 0 else ("warn" if hooks_trouble else "ok"),
                         "queue": int(queue), "delivered_per_s": round(rates.get("webhook_events", 0.0), 2),
                         "failed_per_s": round(failed, 2), "dropped_per_s": round(dropped, 2),
                         "detail": hooks_trouble or f"{int(queue)} queued"},
        }

    def _apps(self, sample: Sample | None) -> list[dict[str, Any]]:
        store = self._app_store
        rates = sample.app_rates if sample is not None else {}
        queue = sample.app_queue if sample is not None else {}
        names = set(store.apps) | set(store.online) | set(store.parked) | set(rates) | set(queue)
        names.discard("")
        return [{"app": a, "online": store.online.get(a, 0), "messages_per_s": round(rates.get(a, {}).get("messages", 0.0), 2),
                 "broadcasts_per_s": round(rates.get(a, {}).get("broadcasts", 0.0), 3),
                 "parked": store.parked.get(a, 0), "webhook_queue": int(queue.get(a, 0))}
                for a in sorted(names)]

    def series(self) -> dict[str, list[float]]:
        points = list(self.ring)[1:]  # the first sample has no rates
        out: dict[str, list[float]] = {"t_ms": [p.t_ms for p in points]}
        for name in CHART_GAUGES:
            out[name] = [p.gauges.get(name, 0.0) for p in points]
        for name in CHART_RATES:
            out[f"{name}_per_s"] = [round(p.rates.get(name, 0.0), 3) for p in points]
        return out

    async def _build(self) -> dict[str, Any]:
        (by_service, discovery_error), stores = await asyncio.gather(self._instances(), self._health_stores())
        now_ms = int(self._clock() * 1000)
        sample = self.ring[-1] if self.ring else None
        # the newest sample that has rates (the very first has none)
        rated = sample if sample is not None and sample.rates else None
        rates = rated.rates if rated is not None else {}
        gauges = sample.gauges if sample is not None else dict.fromkeys(GAUGES, 0.0)
        rooms = by_service["room"]
        if discovery_error:
            stores["redis"] = {"state": "down", "detail": f"discovery: {discovery_error}"}
        health = {**stores, **self._service_health(by_service, rates, gauges, sample.app_queue if sample else {})}
        figures = ("messages", "pushes", "broadcasts", "delivered", "acks", "connects", "auths", "upstream",
                   "parked", "stored", "errors", "http_5xx", "webhook_events", "webhook_failed")
        return {
            "time_ms": now_ms,
            "center": self.center_id,
            "sample_s": self.sample_s,
            "window_s": self.window_s,
            "sampled_ms": sample.t_ms if sample is not None else 0,
            "totals": {
                "sessions": sum(r.load for r in rooms),
                "connections": int(gauges.get("connections", 0)),
                "detached": int(gauges.get("detached", 0)),
                "capacity": sum(r.capacity for r in rooms),
                "rooms": len(rooms),
                "rooms_draining": sum(1 for r in rooms if r.draining),
            },
            "rates": {f"{k}_per_s": round(rates.get(k, 0.0), 3) for k in figures},
            "instances": {s: len(v) for s, v in by_service.items()},
            "rooms": self._rooms(rooms, sample, now_ms),
            "apps": self._apps(rated or sample),
            "apps_source": {"online_estimated": False,  # always exact now; kept for older clients
                            "online_error": self._app_store.online_error,
                            "parked_error": self._app_store.parked_error, "read_ms": self._app_store.t_ms},
            "health": health,
            "scrape": {"targets": sample.scraped if sample else 0,
                       "failed": sample.failed[:20] if sample else []},
            "series": self.series(),
        }
