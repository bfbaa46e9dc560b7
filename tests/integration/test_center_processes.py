"""Two center processes on one port (center.processes = 2, SO_REUSEPORT): both serve, each pushes,
/v1/stats sums both (whichever answers), each has its own discovery record and metrics port, and
one that dies is started again without its counts being lost.

Runs on a Redis database and MySQL schema of its own (no other module's center may show up in
discovery here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
import uuid

import aiohttp
import pytest

from services.common import runtime
from services.common.discovery import Discovery
from services.launcher import backing, procs
from tests.stores import own_stores

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex[:8]


@dataclasses.dataclass
class Group:
    url: str
    common: object
    supervisor: procs.ServiceProcess


@pytest.fixture(scope="module")
def group(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "center_processes", mysql_database="pylon_center_procs_it")
    env = procs.common_env(common, {"PYLON_CENTER_ADMIN_KEY": ADMIN_KEY, "PYLON_CENTER_SHUTDOWN_GRACE_S": "1"})
    logs = f"{tmp}/center-procs-it"
    h = "127.0.0.1"
    ports = {name: backing.free_port() for name in ("register", "saver", "coordinator", "center")}
    started: dict[str, procs.ServiceProcess] = {}
    try:
        for name in ("register", "saver", "coordinator"):
            started[name] = procs.start(f"{name}-cpit", [name, "--host", h, "--grpc-port", str(ports[name]),
                                                         "--metrics-port", "0"], env, logs, wait_for=[(h, ports[name])])
        started["center"] = procs.start("center-cpit", ["center", "--host", h, "--port", str(ports["center"]),
                                                        "--processes", "2"], env, logs, wait_for=[(h, ports["center"])])
        yield Group(f"http://{h}:{ports['center']}", common, started["center"])
    finally:
        codes = {name: started[name].stop() for name in ("center", "coordinator", "saver", "register") if name in started}
    log = started["center"].log_text() if "center" in started else ""
    assert codes.get("center") == 0 and "Traceback" not in log, log[-4000:]


async def call(session: aiohttp.ClientSession, url: str, method: str, path: str, body=None, key: str = ADMIN_KEY):
    async with session.request(method, url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def on_one_connection(group: Group):
    """A session whose requests all travel on one connection, hence reach one process."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))


async def pid_of(session: aiohttp.ClientSession, group: Group) -> int:
    status, body = await call(session, group.url, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok", body
    return body["pid"]


async def serving_pids(group: Group, want: int = 2, tries: int = 200) -> set[int]:
    """Pids seen on fresh connections until ``want`` distinct ones answered (the kernel picks)."""
    seen: set[int] = set()
    for _ in range(tries):
        async with await on_one_connection(group) as s:
            seen.add(await pid_of(s, group))
        if len(seen) >= want:
            break
    return seen


async def wait_until(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def app(group):
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, group.url, "POST", "/v1/apps", {"id": "cpit-" + uuid.uuid4().hex[:8]})
    assert status == 201, body
    return body


async def test_both_processes_serve_and_push(group, app):
    pids = await serving_pids(group)
    assert len(pids) == 2, pids
    assert pids == set(procs.children(group.supervisor.pid))
    pushed: dict[int, str] = {}
    for _ in range(200):
        async with await on_one_connection(group) as s:
            pid = await pid_of(s, group)
            if pid in pushed:
                continue
            status, body = await call(s, group.url, "POST", "/v1/push",
                                      {"uids": [f"cpit-u{pid}"], "payload": f"via {pid}"}, key=app["api_key"])
            assert status == 200, body
            assert await pid_of(s, group) == pid  # the push went to the process that answered before
            pushed[pid] = body["msg_ids"][0]
        if len(pushed) == 2:
            break
    assert set(pushed) == pids
    async with aiohttp.ClientSession() as s:
        for pid, msg_id in pushed.items():
            status, state = await call(s, group.url, "GET", f"/v1/messages/{msg_id}", key=app["api_key"])
            assert status == 200 and state["uid"] == f"cpit-u{pid}" and state["state"] == "stored", state
        # the batch form too, through whichever process
        status, body = await call(s, group.url, "POST", "/v1/push", {"messages": [
            {"uid": "cpit-b1", "payload": "one"}, {"uid": "cpit-b2", "payload_b64": "AAE="}]}, key=app["api_key"])
        assert status == 200 and len(body["msg_ids"]) == 2, body


async def stats_from_each(group: Group, app) -> dict[int, dict]:
    """A /v1/stats snapshot answered by each of the two processes."""
    snapshots: dict[int, dict] = {}
    for _ in range(200):
        async with await on_one_connection(group) as s:
            status, snap = await call(s, group.url, "GET", "/v1/stats", key=app["api_key"])
            assert status == 200, snap
            snapshots.setdefault(snap["center"]["pid"], snap)
        if len(snapshots) == 2:
            return snapshots
    raise AssertionError(f"only {list(snapshots)} answered")


async def push_through_each(group: Group, app) -> None:
    done: set[int] = set()
    for _ in range(200):
        async with await on_one_connection(group) as s:
            pid = await pid_of(s, group)
            if pid not in done:
                status, body = await call(s, group.url, "POST", "/v1/push", {"messages": [
                    {"uid": "cpit-s1", "payload": "a"}, {"uid": "cpit-s2", "payload": "b"}]}, key=app["api_key"])
                assert status == 200, body
                done.add(pid)
        if len(done) == 2:
            return
    raise AssertionError(f"only {done} answered")


async def test_stats_sum_both_processes_whichever_answers(group, app):
    async def both_see_both():
        # each process reads discovery at most every refresh_s (2 s): one that started a moment
        # before the other may not list it yet
        snaps = await stats_from_each(group, app)
        return snaps if all(x["instances"]["center"] == 2 for x in snaps.values()) else None

    before = await wait_until(both_see_both, 10)
    assert before, "a process still lists one center 10 s after both started"
    a, b = before.values()
    assert a["center"]["processes"] == b["center"]["processes"] == 2
    assert a["center"]["id"] != b["center"]["id"]
    assert a["instances"]["center"] == b["instances"]["center"] == 2
    assert a["counters"]["pushes"] == b["counters"]["pushes"] and a["counters"]["messages"] == b["counters"]["messages"]
    await push_through_each(group, app)  # one push of two messages through each process
    after = await stats_from_each(group, app)
    for pid, snap in after.items():
        assert snap["counters"]["pushes"] == a["counters"]["pushes"] + 2, (pid, snap["counters"])
        assert snap["counters"]["messages"] == a["counters"]["messages"] + 4, (pid, snap["counters"])
        assert snap["counters"]["requests"] > before[pid]["counters"]["requests"]


async def test_each_process_has_its_discovery_record_and_metrics(group):
    client = runtime.redis_client(group.common.redis_url)
    try:
        centers = await Discovery(client, ttl_s=10).instances("center", fresh=True)
    finally:
        await client.aclose()
    assert len(centers) == 2 and len({c.id for c in centers}) == 2
    assert len({c.metrics for c in centers}) == 2 and len({c.port for c in centers}) == 1
    async with aiohttp.ClientSession() as s:
        for c in centers:
            async with s.get(f"http://{c.metrics}/metrics") as r:
                text = await r.text()
            assert r.status == 200 and "pylon_center_http_requests_total" in text


async def test_a_killed_process_is_started_again_and_keeps_the_counts(group, app):
    async with aiohttp.ClientSession() as s:
        _, before = await call(s, group.url, "GET", "/v1/stats", key=app["api_key"])
    victim = procs.children(group.supervisor.pid)[0]
    os.kill(victim, signal.SIGKILL)

    async def replaced():
        kids = procs.children(group.supervisor.pid)
        return len(kids) == 2 and victim not in kids and kids

    kids = await wait_until(replaced)
    assert kids, "the supervisor did not start the killed process again"
    pids = await wait_until(lambda: _both(group, set(kids)))
    assert pids == set(kids)
    async with aiohttp.ClientSession() as s:
        _, after = await call(s, group.url, "GET", "/v1/stats", key=app["api_key"])
    assert after["counters"]["pushes"] == before["counters"]["pushes"]
    assert after["counters"]["requests"] > before["counters"]["requests"]
    assert json.dumps(after["counters"])  # plain integers


async def _both(group: Group, want: set[int]) -> set[int] | None:
    try:
        seen = await serving_pids(group, tries=50)
    except aiohttp.ClientError:
        return None  # the new process is still starting
    return seen if seen == want else None
