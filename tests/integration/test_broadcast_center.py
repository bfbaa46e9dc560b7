"""Center side of stored broadcasts against real processes: register, saver, two room instances and
three centers on the test Redis/MariaDB. One center runs no sub-task worker (it only answers the
API), so that freezing the other two (SIGSTOP) holds every sub-task where it is: queued while
they are frozen, taken over by the survivor when the one holding them is killed.

Discovery records live 30 s here, so that a room instance frozen with SIGSTOP stays listed (and its
sub-task keeps failing and being retried) instead of dropping out as gone after the usual 3 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
import uuid

import aiohttp
import pytest

from services.center import broadcasts as bc
from services.common import runtime, tokens
from services.common.codec import Op
from services.common.discovery import Discovery, Instance
from services.launcher import backing, procs
from tests.stores import own_stores
from tests.wire_client import WireClient

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex[:8]
H = "127.0.0.1"
CLAIM_IDLE_S = 1.5


@dataclasses.dataclass
class System:
    common: object
    env: dict
    logs: str
    api: str                                   # the center without a worker
    workers: dict[str, procs.ServiceProcess]   # url -> center running a sub-task worker
    rooms: list[tuple[procs.ServiceProcess, int, str]]  # (process, client port, instance id)
    started: list[procs.ServiceProcess]

    def worker_procs(self) -> list[procs.ServiceProcess]:
        return list(self.workers.values())


def _center_env(env: dict, worker: bool) -> dict:
    return {**env, "PYLON_CENTER_BROADCAST_WORKER": "true" if worker else "false"}


def _start_center(system_env: dict, logs: str, name: str, worker: bool, port: int | None = None):
    port = port or backing.free_port()
    proc = procs.start(name, ["center", "--host", H, "--port", str(port)], _center_env(system_env, worker), logs,
                       wait_for=[(H, port)])
    return f"http://{H}:{port}", proc


@pytest.fixture(scope="module")
def system(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "broadcast_center", mysql_database="pylon_bc_center_it", discovery_ttl_s=30)
    env = procs.common_env(common, {
        "PYLON_CENTER_ADMIN_KEY": ADMIN_KEY, "PYLON_CENTER_SHUTDOWN_GRACE_S": "1",
        "PYLON_CENTER_SUBTASK_CLAIM_IDLE_S": str(CLAIM_IDLE_S), "PYLON_CENTER_BROADCAST_ROOM_DEADLINE_S": "1",
        "PYLON_ROOM_RESUME_GRACE_S": "3", "PYLON_LOG_LEVEL": "INFO"})
    logs = f"{tmp}/broadcast-center-it"
    started: list[procs.ServiceProcess] = []
    s = System(common, env, logs, "", {}, [], started)
    try:
        for name in ("register", "saver"):
            port = backing.free_port()
            started.append(procs.start(f"{name}-bcit", [name, "--host", H, "--grpc-port", str(port),
                                                        "--metrics-port", "0"], env, logs, wait_for=[(H, port)]))
        for i in range(2):
            s.rooms.append(asyncio.run(_start_room(s, f"room-bcit-{i}")))
        s.api, proc = _start_center(env, logs, "center-bcit-api", worker=False)
        started.append(proc)
        for i in range(2):
            url, proc = _start_center(env, logs, f"center-bcit-w{i}", worker=True)
            s.workers[url] = proc
        asyncio.run(_wait_rooms_listed(common, {r[2] for r in s.rooms}))
        yield s
    finally:
        codes = {}
        for p in [*s.workers.values(), *started[::-1]]:
            p.signal(signal.SIGCONT)
            codes[p.name] = p.stop()
        for room, _, _ in s.rooms:
            room.signal(signal.SIGCONT)
            room.stop()
    centers = [p for p in [*s.workers.values(), *started] if p.name.startswith("center-")]
    for p in centers:
        # a clean, timely shutdown (stop() kills what is still running after 10 s) and no bug in the logs
        assert codes[p.name] == 0 and "Traceback" not in p.log_text(), (codes[p.name], p.log_text()[-4000:])


async def _start_room(s: System, name: str) -> tuple[procs.ServiceProcess, int, str]:
    port, grpc_port = backing.free_port(), backing.free_port()
    proc = procs.start(name, ["room", "--host", H, "--port", str(port), "--grpc-port", str(grpc_port)], s.env, s.logs,
                       wait_for=[(H, port), (H, grpc_port)])
    inst = await _wait_instance(s.common, f"{H}:{grpc_port}")
    return proc, port, inst.id


async def _rooms(common) -> list[Instance]:
    redis = runtime.redis_client(common.redis_url)
    try:
        return await Discovery(redis).instances("room", fresh=True)
    finally:
        await redis.aclose()


async def _wait_instance(common, grpc_addr: str) -> Instance:
    async def find():
        return next((i for i in await _rooms(common) if i.grpc == grpc_addr), None)
    inst = await wait_for(find)
    assert inst is not None, f"room {grpc_addr} never showed up in discovery"
    return inst


async def _wait_rooms_listed(common, ids: set[str]) -> None:
    async def listed():
        return ids <= {i.id for i in await _rooms(common)}
    assert await wait_for(listed)


async def wait_for(predicate, timeout_s: float = 20.0):
    """Poll ``predicate`` (async) until it returns something truthy or the time is up (returns the last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def call(url: str, method: str, path: str, body=None, key: str | None = ADMIN_KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with aiohttp.ClientSession() as session, session.request(method, url + path, data=data,
                                                                   headers=headers) as r:
        text = await r.read()
        assert r.headers.get("Content-Type", "").startswith("application/json"), (r.status, text[:300])
        return r.status, json.loads(text), r.headers


async def new_app(s: System, **fields) -> dict:
    status, body, _ = await call(s.api, "POST", "/v1/apps", {"id": "bcit-" + uuid.uuid4().hex[:8], **fields})
    assert status == 201, body
    return body


async def broadcast(s: System, app: dict, payload: str = "to all", **extra) -> dict:
    status, body, _ = await call(s.api, "POST", "/v1/broadcast", {"payload": payload, **extra}, key=app["api_key"])
    assert status == 200, body
    return body


async def progress(s: System, bid: str, key: str = ADMIN_KEY) -> dict:
    status, body, _ = await call(s.api, "GET", f"/v1/broadcasts/{bid}", key=key)
    assert status == 200, body
    return body


async def wait_progress(s: System, bid: str, state: str, timeout_s: float = 20.0) -> dict:
    async def reached():
        p = await progress(s, bid)
        return p if p["state"] == state else None
    found = await wait_for(reached, timeout_s)
    assert found, f"broadcast {bid} never reached {state}: {await progress(s, bid)}"
    return found


async def connect(s: System, app: dict, room: int, user: str) -> WireClient:
    token, _ = tokens.sign(app["secret"], user, app["id"], 300, device_id="d1")
    c = await WireClient.connect(H, s.rooms[room][1])
    await c.auth(token, user, device_id="d1", net="wifi", heartbeat_hint_s=300)
    return c


async def pending(common) -> list[dict]:
    redis = runtime.redis_client(common.redis_url)
    try:
        return await redis.xpending_range(bc.TASKS_KEY, bc.GROUP, "-", "+", 100)
    finally:
        await redis.aclose()


async def stream_entries(common, bid: str) -> list:
    redis = runtime.redis_client(common.redis_url)
    try:
        return [e for e in await redis.xrange(bc.TASKS_KEY) if e[1][b"bid"] == bid.encode()]
    finally:
        await redis.aclose()


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def freeze(ps) -> None:
    for p in ps:
        os.kill(p.pid, signal.SIGSTOP)


def thaw(ps) -> None:
    for p in ps:
        os.kill(p.pid, signal.SIGCONT)


# ---------------------------------------------------------------- tests


async def test_queued_then_done_reaches_the_apps_sessions_only(system):
    app, other = await new_app(system), await new_app(system)
    # a unicast waits in the inbox: its arrival after AUTH_OK shows that the login's inbox read is
    # over, else a broadcast stored meanwhile comes with that read and the fan-out has nothing
    # left to write (delivered 0)
    status, sent, _ = await call(system.api, "POST", "/v1/push", {"uids": ["bcit-u1"], "payload": "stored"},
                                 key=app["api_key"])
    assert status == 200, sent
    bound = await connect(system, app, 0, "bcit-u1")
    _, push = await bound.expect(Op.PUSH)
    assert [x.payload for x in push.messages] == [b"stored"]
    elsewhere = await connect(system, other, 1, "bcit-u2")
    freeze(system.worker_procs())
    try:
        body = await broadcast(system, app, "hello all", ttl_s=600)
        assert body["subtasks"] == 2 and body["broadcast_id"].isdigit()
        queued = await progress(system, body["broadcast_id"], key=app["api_key"])
        assert queued["state"] == "queued" and queued["subtasks_done"] == 0 and queued["delivered"] == 0
        assert queued["app"] == app["id"] and queued["subtasks_total"] == 2
        assert queued["expires_ms"] - queued["created_ms"] == 600_000
    finally:
        thaw(system.worker_procs())
    done = await wait_progress(system, body["broadcast_id"], "done")
    assert done["subtasks_done"] == 2 and done["delivered"] == 1, done
    _, push = await bound.expect(Op.PUSH)
    (m,) = push.messages
    assert (str(m.msg_id), m.payload, m.broadcast, m.app) == (body["broadcast_id"], b"hello all", True, app["id"])
    # the other app's session got nothing: the next frame it gets is a unicast pushed after the broadcast was done
    status, sent, _ = await call(system.api, "POST", "/v1/push", {"uids": ["bcit-u2"], "payload": "just you"},
                                 key=other["api_key"])
    assert status == 200, sent
    _, push = await elsewhere.expect(Op.PUSH)
    assert [x.payload for x in push.messages] == [b"just you"]
    # another app's key does not see it; the admin list has it first
    status, err, _ = await call(system.api, "GET", f"/v1/broadcasts/{body['broadcast_id']}", key=other["api_key"])
    assert status == 404 and err["error"]["code"] == "unknown_broadcast"
    status, recent, _ = await call(system.api, "GET", "/v1/admin/broadcasts?limit=5")
    assert status == 200 and recent["broadcasts"][0] == done and len(recent["broadcasts"]) <= 5
    assert not await stream_entries(system.common, body["broadcast_id"])
    for c in (bound, elsewhere):
        await c.close()


async def test_expired_broadcast_is_not_delivered(system):
    app = await new_app(system)
    client = await connect(system, app, 0, "bcit-u3")
    expired_before = sum([await metric(u, "pylon_broadcast_subtasks_expired_total") for u in system.workers])
    freeze(system.worker_procs())
    try:
        body = await broadcast(system, app, "too late", ttl_s=1)
        bid = body["broadcast_id"]
        assert (await progress(system, bid))["state"] == "queued"
        late = await wait_progress(system, bid, "expired", timeout_s=5)
        assert late["subtasks_done"] == 0 and late["delivered"] == 0
    finally:
        thaw(system.worker_procs())

    async def dropped():
        return not await stream_entries(system.common, bid)
    assert await wait_for(dropped), "the workers never dropped the expired sub-tasks"
    assert (await progress(system, bid))["state"] == "expired"
    expired_after = sum([await metric(u, "pylon_broadcast_subtasks_expired_total") for u in system.workers])
    assert expired_after - expired_before == body["subtasks"]
    status, sent, _ = await call(system.api, "POST", "/v1/push", {"uids": ["bcit-u3"], "payload": "unicast"},
                                 key=app["api_key"])
    assert status == 200, sent
    _, push = await client.expect(Op.PUSH)
    assert [m.payload for m in push.messages] == [b"unicast"]
    await client.close()


async def test_room_instance_gone_is_done_with_zero(system):
    app = await new_app(system)
    proc, _, inst_id = await _start_room(system, "room-bcit-gone")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        body = await broadcast(system, app)
        assert body["subtasks"] == 3

        async def tried_on_gone_room():
            return any(e["times_delivered"] >= 2 for e in await pending(system.common))
        assert await wait_for(tried_on_gone_room), "the sub-task of the frozen instance was never retried"
        assert (await progress(system, body["broadcast_id"]))["state"] == "running"
        proc.signal(signal.SIGKILL)
        proc.proc.wait(10)
        redis = runtime.redis_client(system.common.redis_url)
        try:
            # what its record's expiry would do after the discovery TTL
            await Discovery(redis).withdraw(Instance(service="room", id=inst_id))
            done = await wait_progress(system, body["broadcast_id"], "done")
            assert done["subtasks_done"] == 3
            assert await redis.hget(bc.delivered_key(int(body["broadcast_id"])), inst_id) == b"0"
        finally:
            await redis.aclose()
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()


async def test_killed_center_sub_tasks_are_taken_over(system):
    app = await new_app(system)
    room = system.rooms[1][0]
    os.kill(room.pid, signal.SIGSTOP)
    try:
        body = await broadcast(system, app)
        bid = body["broadcast_id"]

        async def retried():
            entries = [e for e in await pending(system.common) if e["times_delivered"] >= 2]
            return entries[0] if entries else None
        entry = await wait_for(retried)
        assert entry, "the sub-task of the frozen room was never retried"
        consumer, entry_id = entry["consumer"].decode(), entry["message_id"].decode()
        (victim_url, victim), = [(u, p) for u, p in system.workers.items() if consumer.endswith(f"#{p.pid}")]
        (survivor_url,) = [u for u in system.workers if u != victim_url]
        done_before = await metric(survivor_url, "pylon_broadcast_subtasks_done_total")
        victim.signal(signal.SIGKILL)
        victim.proc.wait(10)
    finally:
        os.kill(room.pid, signal.SIGCONT)
    done = await wait_progress(system, bid, "done")
    assert done["subtasks_done"] == 2
    assert await metric(survivor_url, "pylon_broadcast_subtasks_done_total") > done_before
    assert not await stream_entries(system.common, bid)
    assert f"taking over broadcast sub-task {entry_id} " in system.workers[survivor_url].log_text()
    # the killed center comes back on its port for the tests after this one
    del system.workers[victim_url]
    url, proc = _start_center(system.env, system.logs, "center-bcit-w-again", worker=True,
                              port=int(victim_url.rsplit(":", 1)[1]))
    system.workers[url] = proc


async def test_pacing_share_and_gauge(system):
    app = await new_app(system, broadcast_deliveries_per_s=1001)
    assert app["broadcast_deliveries_per_s"] == 1001 and app["broadcasts_per_min"] == 60
    # the same fields through `pylon app create`
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "app", "create", "bcit-cli-" + uuid.uuid4().hex[:6],
        "--broadcasts-per-min", "5", "--broadcast-rate", "7", env=system.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    created = json.loads(out)
    assert (created["broadcasts_per_min"], created["broadcast_deliveries_per_s"]) == (5, 7)
    body = await broadcast(system, app)
    redis = runtime.redis_client(system.common.redis_url)
    try:
        # each of the 2 instances paces its share: ceil(1001 / 2)
        assert await redis.hget(bc.state_key(int(body["broadcast_id"])), "max_per_s") == b"501"
    finally:
        await redis.aclose()
    await wait_progress(system, body["broadcast_id"], "done")
    url = next(iter(system.workers))

    async def settled():
        figures = [await metric(url, f'pylon_broadcast_subtasks{{state="{s}"}}') for s in ("queued", "running", "stuck")]
        return figures == [0, 0, 0]
    assert await wait_for(settled, timeout_s=15), "pylon_broadcast_subtasks never showed an idle stream"


async def test_bad_input_is_4xx_json(system):
    app = await new_app(system)
    url, key = system.api, app["api_key"]
    cases = [
        ({"payload": "x", "app": "bcit-nosuchapp"}, ADMIN_KEY, 404, "unknown_app"),
        ({"payload": "x" * (60 * 1024 + 1)}, key, 413, "payload_too_large"),
        ({"payload": "x", "ttl_s": 0}, key, 400, "bad_ttl_s"),
        ({"payload": "x", "ttl_s": 7 * 86400 + 1}, key, 400, "bad_ttl_s"),
        ({"payload": "x", "ttl_s": "60"}, key, 400, "bad_ttl_s"),
        ({}, key, 400, "missing_payload"),
        ({"payload_b64": "not base64!"}, key, 400, "bad_payload_b64"),
    ]
    for body, k, want, code in cases:
        status, err, _ = await call(url, "POST", "/v1/broadcast", body, key=k)
        assert (status, err["error"]["code"]) == (want, code), (body, err)
    status, err, _ = await call(url, "POST", "/v1/broadcast", raw=b'{"payload": "x"', key=key)
    assert status == 400 and err["error"]["code"] == "malformed_json"
    status, err, _ = await call(url, "POST", "/v1/broadcast", {"payload": "x"}, key="pk_wrong")
    assert status == 401 and err["error"]["message"]
    for bad in ("abc", "0", "-1", "99999999999999999999999"):
        status, err, _ = await call(url, "GET", f"/v1/broadcasts/{bad}", key=key)
        assert status == 400 and err["error"]["code"] == "bad_broadcast_id", (bad, err)
    status, err, _ = await call(url, "GET", "/v1/broadcasts/123456789", key=key)
    assert status == 404 and err["error"]["code"] == "unknown_broadcast"
    for bad in ("0", "101", "x"):
        status, err, _ = await call(url, "GET", f"/v1/admin/broadcasts?limit={bad}")
        assert status == 400 and err["error"]["code"] == "bad_limit"
    status, err, _ = await call(url, "GET", "/v1/admin/broadcasts", key=key)
    assert status in (401, 403) and err["error"]["code"]
    status, err, _ = await call(url, "PATCH", f"/v1/apps/{app['id']}", {"broadcasts_per_min": -1})
    assert status == 400 and err["error"]["code"] == "bad_broadcasts_per_min"


async def test_broadcast_rate_limit_is_429_with_retry_after(system):
    app = await new_app(system, broadcasts_per_min=2)
    statuses = []
    for _ in range(3):
        status, body, headers = await call(system.api, "POST", "/v1/broadcast", {"payload": "p"}, key=app["api_key"])
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    status, changed, _ = await call(system.api, "PATCH", f"/v1/apps/{app['id']}", {"broadcasts_per_min": 0})
    assert status == 200 and changed["broadcasts_per_min"] == 0
    status, body, _ = await call(system.api, "POST", "/v1/broadcast", {"payload": "p"}, key=app["api_key"])
    assert status == 200, body
