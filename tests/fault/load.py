"""Steady unicast load through the SDK, and the ledger that checks exactly-once delivery.

``LoadHarness`` runs on an event loop of its own in a background thread, so that the test thread
can block on process start-ups while the clients keep reading and the publisher keeps posting:

* a handful of ``PylonClient`` instances (one uid each, routed by the dispatcher) whose handlers
  record every msg_id the SDK hands them, with the time;
* a publisher that posts ``POST /v1/push`` (one uid per request, round robin) at a steady rate and
  records the msg_ids of every 200; any other answer or a failed request is counted as refused,
  not as accepted. It stops by itself after ``max_s`` seconds or ``max_count`` requests.

The ``Ledger`` holds what was accepted and what was delivered; a scenario asks it which of its
accepted msg_ids are missing and which msg_ids reached a handler more than once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import aiohttp
from pylon_sdk import PylonClient

from services.common import tokens

REQUEST_TIMEOUT_S = 5.0   # a push that takes longer is counted refused (it may still be stored)
MAX_IN_FLIGHT = 64        # pushes outstanding at once; a tick past it is skipped and counted


@dataclass
class Accepted:
    uid: str
    t: float          # when the push was sent (the client may have it before the 200 is read)
    scenario: str


@dataclass
class ClientStats:
    uid: str
    connects: int = 0
    resumed: int = 0
    disconnects: int = 0
    dropped_by_replaced: int = 0   # duplicates dropped by clients of this uid that were replaced
    last_disconnect: str = ""
    closed_reason: str = ""


class Ledger:
    """Accepted pushes and deliveries to the app handlers (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: dict[int, Accepted] = {}
        self.deliveries: dict[int, list[tuple[float, str]]] = {}
        self._reported_dups: set[int] = set()

    def accept(self, msg_id: int, uid: str, scenario: str, t_sent: float) -> None:
        with self._lock:
            self.accepted[msg_id] = Accepted(uid, t_sent, scenario)

    def deliver(self, msg_id: int, uid: str) -> None:
        with self._lock:
            self.deliveries.setdefault(msg_id, []).append((time.monotonic(), uid))

    def accepted_in(self, scenario: str) -> dict[int, Accepted]:
        with self._lock:
            return {m: a for m, a in self.accepted.items() if a.scenario == scenario}

    def missing(self, ids) -> list[int]:
        with self._lock:
            return sorted(m for m in ids if m not in self.deliveries)

    def first_delivery(self, msg_id: int) -> float | None:
        with self._lock:
            d = self.deliveries.get(msg_id)
            return d[0][0] if d else None

    def new_duplicates(self) -> dict[int, int]:
        """msg_ids handed to an app handler more than once, not reported before -> times handed."""
        with self._lock:
            out = {m: len(d) for m, d in self.deliveries.items() if len(d) > 1 and m not in self._reported_dups}
            self._reported_dups.update(out)
            return out

    def wrong_uid(self, ids) -> list[tuple[int, str, str]]:
        """Deliveries of an accepted msg_id to a client of another uid."""
        with self._lock:
            out = []
            for m in ids:
                a = self.accepted.get(m)
                for _, uid in self.deliveries.get(m, []):
                    if a is not None and uid != a.uid:
                        out.append((m, a.uid, uid))
            return out


@dataclass
class PublisherStats:
    scenario: str
    sent: int = 0
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)   # HTTP status or exception name -> count
    skipped: int = 0
    first_refused: float | None = None
    last_refused: float | None = None
    in_flight: int = 0

    def to_dict(self, t0: float) -> dict:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 3)

        return {"sent": self.sent, "accepted": self.accepted, "refused": sum(self.refused.values()),
                "refused_by": dict(self.refused), "skipped_in_flight_cap": self.skipped,
                "first_refused_s": rel(self.first_refused), "last_refused_s": rel(self.last_refused)}


class LoadHarness:
    def __init__(self, center_url: str, dispatcher_url: str, app: dict, clients: int = 6) -> None:
        self.center_url = center_url
        self.dispatcher_url = dispatcher_url
        self.app = app
        self.ledger = Ledger()
        self.run_id = uuid.uuid4().hex[:6]
        self.uids = [f"fault-{self.run_id}-{i}" for i in range(clients)]
        self.stats = {uid: ClientStats(uid) for uid in self.uids}
        self.clients: dict[str, PylonClient] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-load-loop", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        self._publisher: asyncio.Task | None = None
        self._pub_stats: PublisherStats | None = None
        self._push_tasks: set[asyncio.Task] = set()
        self._seq = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout_s: float = 30.0):
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout_s)

    # ------------------------------------------------------------------ clients

    def start(self, timeout_s: float = 30.0) -> None:
        self.call(self._start(timeout_s), timeout_s + 5)

    async def _start(self, timeout_s: float) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        for uid in self.uids:
            self.clients[uid] = self._client(uid)
        await asyncio.wait_for(asyncio.gather(*(c.start() for c in self.clients.values())), timeout_s)

    def _client(self, uid: str) -> PylonClient:
        token, _ = tokens.sign(self.app["secret"], uid, self.app["id"], 24 * 3600, device_id="fault-dev")
        st = self.stats[uid]
        client = PylonClient(self.dispatcher_url, uid=uid, token=token, device_id="fault-dev",
                             on_message=self._handler(uid), on_event=self._on_event(st),
                             connect_timeout_s=3, auth_timeout_s=3, pong_timeout_s=5,
                             reconnect_min_s=0.2, reconnect_max_s=2.0)
        return client

    def uid_for(self, name: str) -> str:
        return f"fault-{self.run_id}-{name}"

    def add_client(self, name: str) -> str:
        """Start one more client (uid ``uid_for(name)``) in the background; it joins the load, the
        probes and the checks at once, connected or not. Returns its uid."""
        return self.call(self._add_client(name), 10)

    async def _add_client(self, name: str) -> str:
        uid = self.uid_for(name)
        self.stats[uid] = ClientStats(uid)
        client = self.clients[uid] = self._client(uid)
        self.uids.append(uid)
        task = self.loop.create_task(client.start())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return uid

    def revive_closed(self) -> dict[str, str]:
        """Replace every client the SDK closed for good (kicked, refused) by a new one for the same
        uid; uid -> why the old one closed. The new client's dedupe starts empty."""
        return self.call(self._revive_closed(), 30)

    async def _revive_closed(self) -> dict[str, str]:
        revived = {}
        for uid, c in list(self.clients.items()):
            if c.state.value == "closed":
                revived[uid] = c.close_reason
                await c.close()
                self.stats[uid].closed_reason = c.close_reason
                self.stats[uid].dropped_by_replaced += c.duplicates_dropped
                fresh = self._client(uid)
                self.clients[uid] = fresh
                fresh_start = self.loop.create_task(fresh.start())
                fresh_start.add_done_callback(lambda t: t.cancelled() or t.exception())
        return revived

    def _handler(self, uid: str):
        ledger = self.ledger

        def on_message(msg) -> None:
            ledger.deliver(int(msg.msg_id), uid)

        return on_message

    @staticmethod
    def _on_event(st: ClientStats):
        def on_event(kind: str, data) -> None:
            if kind == "connected":
                st.connects += 1
                if isinstance(data, dict) and data.get("resumed"):
                    st.resumed += 1
            elif kind == "disconnected":
                st.disconnects += 1
                st.last_disconnect = str(data)

        return on_event

    def client_view(self) -> dict[str, dict]:
        """uid -> connected?, room port, reconnect counters (read on the loop)."""
        return self.call(self._client_view(), 10)

    async def _client_view(self) -> dict[str, dict]:
        out = {}
        for uid, c in self.clients.items():
            addr = c.address
            st = self.stats[uid]
            out[uid] = {"connected": c.connected, "port": addr.port if addr is not None else None,
                        "state": c.state.value, "connects": st.connects, "resumed": st.resumed,
                        "disconnects": st.disconnects, "duplicates_dropped": st.dropped_by_replaced + c.duplicates_dropped,
                        "last_disconnect": st.last_disconnect, "close_reason": c.close_reason}
        return out

    def counters(self) -> dict[str, int]:
        view = self.client_view()
        return {k: sum(v[k] for v in view.values()) for k in ("connects", "resumed", "disconnects",
                                                               "duplicates_dropped")}

    # ------------------------------------------------------------------ presence

    def presence(self) -> dict[str, dict]:
        return self.call(self._presence(), 15)

    async def _presence(self) -> dict[str, dict]:
        async def one(uid):
            try:
                async with self._session.get(f"{self.center_url}/v1/users/{uid}", headers=self._headers()) as r:
                    return uid, {"status": r.status, **(await r.json(content_type=None) or {})}
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return uid, {"status": type(exc).__name__}

        return dict(await asyncio.gather(*(one(u) for u in self.uids)))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.app['api_key']}", "Content-Type": "application/json"}

    # ------------------------------------------------------------------ publisher

    def start_publisher(self, scenario: str, rate_per_s: float, max_s: float = 120.0, max_count: int = 5000) -> None:
        self.call(self._start_publisher(scenario, rate_per_s, max_s, max_count), 5)

    async def _start_publisher(self, scenario, rate_per_s, max_s, max_count) -> None:
        if self._publisher is not None and not self._publisher.done():
            raise RuntimeError("a publisher is already running")
        self._pub_stats = PublisherStats(scenario)
        self._publisher = self.loop.create_task(self._publish(self._pub_stats, rate_per_s, max_s, max_count))

    def stop_publisher(self) -> PublisherStats | None:
        """Stop posting; wait (bounded by the request timeout) for the pushes in flight to answer."""
        return self.call(self._stop_publisher(), REQUEST_TIMEOUT_S + 10)

    async def _stop_publisher(self) -> PublisherStats | None:
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
        if self._push_tasks:
            await asyncio.wait(set(self._push_tasks), timeout=REQUEST_TIMEOUT_S + 5)
        return self._pub_stats

    async def _publish(self, st: PublisherStats, rate_per_s: float, max_s: float, max_count: int) -> None:
        interval = 1.0 / rate_per_s
        start = time.monotonic()
        n = 0
        while n < max_count and time.monotonic() - start < max_s:
            uid = self.uids[n % len(self.uids)]
            n += 1
            if st.in_flight >= MAX_IN_FLIGHT:
                st.skipped += 1
            else:
                task = self.loop.create_task(self._push_one(st, uid))
                self._push_tasks.add(task)
                task.add_done_callback(self._push_tasks.discard)
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))

    async def _push_one(self, st: PublisherStats | None, uid: str, scenario: str | None = None) -> int | None:
        self._seq += 1
        body = {"app": self.app["id"], "uids": [uid], "payload": f"{scenario or st.scenario} #{self._seq}"}
        if st is not None:
            st.sent += 1
            st.in_flight += 1
        t_sent = time.monotonic()
        status: int | str
        try:
            async with self._session.post(f"{self.center_url}/v1/push", json=body, headers=self._headers()) as r:
                status = r.status
                reply = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            status, reply = type(exc).__name__, None
        finally:
            if st is not None:
                st.in_flight -= 1
        if status == 200 and reply and len(reply.get("msg_ids", [])) == 1:
            msg_id = int(reply["msg_ids"][0])
            self.ledger.accept(msg_id, uid, scenario or st.scenario, t_sent)
            if st is not None:
                st.accepted += 1
            return msg_id
        if st is not None:
            now = time.monotonic()
            st.refused[str(status)] += 1
            st.first_refused = st.first_refused or now
            st.last_refused = now
        return None

    def push_to(self, uid: str, count: int, scenario: str) -> list[int]:
        """Push ``count`` messages to ``uid`` (one request each, in turn); the msg_ids accepted."""
        return self.call(self._push_to(uid, count, scenario), count * (REQUEST_TIMEOUT_S + 1) + 5)

    async def _push_to(self, uid: str, count: int, scenario: str) -> list[int]:
        ids = [await self._push_one(None, uid, scenario) for _ in range(count)]
        return [m for m in ids if m is not None]

    def states(self, ids: list[int]) -> dict[int, str]:
        """msg_id -> its state as GET /v1/messages/{id} reports it (or why it could not be read)."""
        return self.call(self._states(ids), REQUEST_TIMEOUT_S + 10)

    async def _states(self, ids: list[int]) -> dict[int, str]:
        async def one(m: int) -> tuple[int, str]:
            try:
                async with self._session.get(f"{self.center_url}/v1/messages/{m}", headers=self._headers()) as r:
                    body = await r.json(content_type=None) or {}
                    return m, body.get("state", "?") if r.status == 200 else f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return m, type(exc).__name__

        return dict(await asyncio.gather(*(one(m) for m in ids)))

    # ------------------------------------------------------------------ probe

    def probe(self, scenario: str, timeout_s: float) -> dict[str, float | None]:
        """Push one message to every uid; uid -> seconds until its handler had it (None: push refused
        or not delivered within ``timeout_s``)."""
        return self.call(self._probe(scenario, timeout_s), timeout_s + REQUEST_TIMEOUT_S + 10)

    async def _probe(self, scenario: str, timeout_s: float) -> dict[str, float | None]:
        t0 = time.monotonic()
        ids = await asyncio.gather(*(self._push_one(None, uid, scenario) for uid in self.uids))
        out: dict[str, float | None] = {}
        deadline = t0 + timeout_s
        while True:
            for uid, msg_id in zip(self.uids, ids, strict=True):
                if uid not in out and msg_id is not None:
                    t = self.ledger.first_delivery(msg_id)
                    if t is not None:
                        out[uid] = round(t - t0, 3)
            if len(out) == sum(1 for m in ids if m is not None) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        return {uid: out.get(uid) for uid in self.uids}

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        try:
            self.call(self._close(), 20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self.loop.is_running():
                self.loop.close()

    async def _close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
