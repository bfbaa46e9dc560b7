"""Coordinator: real `pylon coordinator` and `pylon register` processes over the test Redis.

The webhook receiver is an aiohttp server inside the test (it plays the app's server). For kick,
a gRPC Room servicer inside the test records what the coordinator asks of it; the real room is
covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from aiohttp import web

from services.common import runtime
from services.common.apps import App, publish
from services.common.discovery import Discovery, Instance
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.coordinator.webhook_signing import verify
from services.launcher import backing, procs
from tests.stores import own_stores

COORD_ENV = {
    "PYLON_COORDINATOR_WEBHOOK_BACKOFF_BASE_S": "0.05",
    "PYLON_COORDINATOR_WEBHOOK_BACKOFF_CAP_S": "0.2",
    "PYLON_COORDINATOR_WEBHOOK_MAX_ATTEMPTS": "4",
    "PYLON_COORDINATOR_MAX_BATCH_ITEMS": "1000",
    "PYLON_COORDINATOR_SHUTDOWN_GRACE_S": "2",
}


@pytest.fixture(scope="module")
def common(backing_stores):
    cfg, _ = backing_stores
    return own_stores(cfg, "coordinator")  # the fake room announced here must not reach the cluster


@pytest.fixture(scope="module")
def register_port(common, backing_stores):
    _, tmp = backing_stores
    port = backing.free_port()
    proc = procs.start("coord-it-register", ["register", "--grpc-port", str(port), "--metrics-port", "0"],
                       env=procs.common_env(common), log_dir=tmp, wait_for=[("127.0.0.1", port)])
    yield port
    assert proc.stop() == 0, proc.log_text()[-3000:]


@pytest.fixture(scope="module")
def coordinator(common, backing_stores, register_port):
    _, tmp = backing_stores
    port, mport = backing.free_port(), backing.free_port()
    proc = procs.start("coord-it", ["coordinator", "--grpc-port", str(port), "--metrics-port", str(mport)],
                       env=procs.common_env(common, COORD_ENV), log_dir=tmp, wait_for=[("127.0.0.1", port)])
    yield proc, port, mport
    code = proc.stop()
    log = proc.log_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "webhook delivery stopped" in log


@pytest.fixture(scope="module")
async def stub(coordinator):
    _, port, _ = coordinator
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield pbg.CoordinatorStub(channel)
    await channel.close()


@pytest.fixture(scope="module")
async def redis(common):
    r = runtime.redis_client(common.redis_url)
    yield r
    await r.aclose()


class AppServer:
    """The apps' webhook endpoint: /hook/{app}; answers from a per-app script of statuses, then 200."""

    def __init__(self):
        self.requests: dict[str, list[tuple[dict, bytes]]] = {}
        self.scripts: dict[str, list[int]] = {}
        self.port = 0
        self._runner = None

    async def start(self):
        app = web.Application()
        app.router.add_post("/hook/{name}", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def _hook(self, request):
        name = request.match_info["name"]
        body = await request.read()
        self.requests.setdefault(name, []).append((dict(request.headers), body))
        script = self.scripts.get(name)
        status = script.pop(0) if script else 200
        return web.Response(status=status, text="ok")

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def events(self, name):
        return [e for _, body in self.requests.get(name, []) for e in json.loads(body)["events"]]

    async def stop(self):
        await self._runner.cleanup()


@pytest.fixture(scope="module")
async def app_server():
    s = await AppServer().start()
    yield s
    await s.stop()


async def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def item(app, uid="u1", payload=b"hello", kind="chat"):
    return pb.UpstreamItem(uid=uid, app=app, kind=kind, payload=payload, session_id="room-x/1", device_id="dev",
                           ts_ms=1700000000123)


async def test_upstream_reaches_the_webhook_signed(stub, redis, app_server):
    await publish(redis, App(id="it-hook", secret="sekrit", webhook_url=app_server.url("it-hook")))
    reply = await stub.Upstream(pb.UpstreamBatch(items=[item("it-hook"), item("it-hook", uid="u2", payload=b"\x00\xff")]),
                                timeout=5)
    assert list(reply.accepted) == [True, True]
    await until(lambda: len(app_server.events("it-hook")) == 2)
    headers, body = app_server.requests["it-hook"][0]
    ts = verify("sekrit", body, headers["X-Pylon-Timestamp"], headers["X-Pylon-Signature"])
    assert abs(ts - time.time()) < 60
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["app"] == "it-hook"
    assert app_server.events("it-hook") == [
        {"type": "upstream", "uid": "u1", "device_id": "dev", "session_id": "room-x/1", "kind": "chat",
         "payload_b64": base64.b64encode(b"hello").decode(), "ts_ms": 1700000000123},
        {"type": "upstream", "uid": "u2", "device_id": "dev", "session_id": "room-x/1", "kind": "chat",
         "payload_b64": base64.b64encode(b"\x00\xff").decode(), "ts_ms": 1700000000123},
    ]


async def test_5xx_is_retried_until_delivered(stub, redis, app_server):
    app_server.scripts["it-retry"] = [500, 500]
    await publish(redis, App(id="it-retry", secret="s2", webhook_url=app_server.url("it-retry")))
    reply = await stub.Upstream(pb.UpstreamBatch(items=[item("it-retry")]), timeout=5)
    assert list(reply.accepted) == [True]
    await until(lambda: len(app_server.requests.get("it-retry", [])) == 3)
    await asyncio.sleep(0.5)
    reqs = app_server.requests["it-retry"]
    assert len(reqs) == 3                                    # delivered on the third attempt, then no more
    assert len({h["X-Pylon-Delivery"] for h, _ in reqs}) == 1
    assert [h["X-Pylon-Attempt"] for h, _ in reqs] == ["1", "2", "3"]
    for h, body in reqs:
        verify("s2", body, h["X-Pylon-Timestamp"], h["X-Pylon-Signature"])


async def test_4xx_is_not_retried(stub, redis, app_server):
    app_server.scripts["it-gone"] = [410]
    await publish(redis, App(id="it-gone", secret="s", webhook_url=app_server.url("it-gone")))
    assert list((await stub.Upstream(pb.UpstreamBatch(items=[item("it-gone")]), timeout=5)).accepted) == [True]
    await until(lambda: app_server.requests.get("it-gone"))
    await asyncio.sleep(0.5)
    assert len(app_server.requests["it-gone"]) == 1


async def test_no_webhook_or_unknown_app_is_not_accepted(stub, redis, app_server):
    await publish(redis, App(id="it-nohook", secret="s"))
    await publish(redis, App(id="it-mixed", secret="s", webhook_url=app_server.url("it-mixed")))
    reply = await stub.Upstream(pb.UpstreamBatch(items=[item("it-nohook"), item("it-ghost"), item("it-mixed"),
                                                       item("it-mixed", payload=b"x" * 70_000)]), timeout=5)
    assert list(reply.accepted) == [False, False, True, False]
    await until(lambda: len(app_server.events("it-mixed")) == 1)


async def test_status_events_only_for_apps_that_want_them(stub, redis, app_server):
    await publish(redis, App(id="it-status", secret="st", webhook_url=app_server.url("it-status"), status_events=True))
    await publish(redis, App(id="it-quiet", secret="s", webhook_url=app_server.url("it-quiet")))
    apps = ["it-status", "it-quiet", "it-ghost"]
    events = [pb.StatusEvent(uid="u9", apps=apps, online=True, session_id="room-a/7", device_id="d9", ts_ms=11,
                             instance="room-a"),
              pb.StatusEvent(uid="u9", apps=apps, online=False, session_id="room-a/7", device_id="d9", ts_ms=12,
                             instance="room-a")]
    assert (await stub.Status(pb.StatusBatch(events=events), timeout=5)).n == 2
    await until(lambda: len(app_server.events("it-status")) == 2)
    assert app_server.events("it-status") == [
        {"type": "online", "uid": "u9", "device_id": "d9", "session_id": "room-a/7", "instance": "room-a", "ts_ms": 11},
        {"type": "offline", "uid": "u9", "device_id": "d9", "session_id": "room-a/7", "instance": "room-a", "ts_ms": 12},
    ]
    headers, body = app_server.requests["it-status"][0]
    verify("st", body, headers["X-Pylon-Timestamp"], headers["X-Pylon-Signature"])
    await asyncio.sleep(0.3)
    assert "it-quiet" not in app_server.requests


async def test_oversized_batch_is_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Upstream(pb.UpstreamBatch(items=[item("it-hook")] * 1001), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000" in e.value.details()


class RecordingRoom(pbg.RoomServicer):
    def __init__(self):
        self.kicks: list[pb.KickRequest] = []

    async def Kick(self, request, context):
        self.kicks.append(request)
        return pb.KickReply(kicked=len(request.session_ids))


async def test_kick_looks_up_register_and_tells_the_rooms(stub, common, redis, register_port):
    reg_channel = grpc.aio.insecure_channel(f"127.0.0.1:{register_port}")
    register = pbg.RegisterStub(reg_channel)
    rooms = [RecordingRoom(), RecordingRoom()]
    servers, instances = [], []
    discovery = Discovery(redis, common.discovery_ttl_s, common.discovery_refresh_s)
    try:
        for i, servicer in enumerate(rooms):
            port = backing.free_port()
            server = grpc.aio.server()
            pbg.add_RoomServicer_to_server(servicer, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            servers.append(server)
            inst = Instance(service="room", id=f"it-room-{i}", host="127.0.0.1", port=1, grpc=f"127.0.0.1:{port}")
            instances.append(inst)
            await discovery.announce(inst)
        sessions = [pb.Session(uid="k1", session_id="it-room-0/1", instance="it-room-0", apps=["a", "b"]),
                    pb.Session(uid="k1", session_id="it-room-1/1", instance="it-room-1", apps=["b"]),
                    pb.Session(uid="k2", session_id="it-room-0/2", instance="it-room-0", apps=["a"]),
                    pb.Session(uid="k3", session_id="dead-room/1", instance="dead-room", apps=["a"])]
        await register.Register(pb.SessionBatch(sessions=sessions), timeout=5)

        reply = await stub.Kick(pb.KickRequest(uids=["k1", "k2", "k3", "nobody"], reason="bye"), timeout=10)
        assert reply.kicked == 3
        assert [(list(k.session_ids), k.reason) for k in rooms[0].kicks] == [(["it-room-0/1", "it-room-0/2"], "bye")]
        assert sorted(rooms[0].kicks[0].uids) == ["k1", "k2"]
        assert [list(k.session_ids) for k in rooms[1].kicks] == [["it-room-1/1"]]

        reply = await stub.Kick(pb.KickRequest(uids=["k1"], app="a", reason="app"), timeout=10)
        assert reply.kicked == 1
        assert list(rooms[0].kicks[-1].session_ids) == ["it-room-0/1"] and rooms[0].kicks[-1].app == "a"
        assert len(rooms[1].kicks) == 1

        assert (await stub.Kick(pb.KickRequest(uids=["nobody"]), timeout=10)).kicked == 0
    finally:
        for inst in instances:
            await discovery.withdraw(inst)
        await discovery.close()
        for server in servers:
            await server.stop(0)
        await reg_channel.close()


async def test_announced_in_discovery_with_metrics(coordinator, common, redis, stub, app_server):
    _, port, mport = coordinator
    found = await Discovery(redis).instances("coordinator", fresh=True)
    assert [(i.id, i.grpc, i.metrics) for i in found] == [
        (f"coordinator-127.0.0.1:{port}", f"127.0.0.1:{port}", f"127.0.0.1:{mport}")]
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5)
                                   .read().decode())
    assert 'pylon_webhook_requests_total{outcome="ok"}' in text
    assert 'pylon_webhook_events_dropped_total{reason="no_app"}' in text
    assert "pylon_webhook_retries_total" in text
    assert "pylon_kick_sessions_total" in text


def test_bad_config_exits_1_with_a_message(common, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[coordinator]\nwebhook_max_attempts = 0\n")
    r = subprocess.run([sys.executable, "-m", "services.cli", "coordinator", "--config", str(bad)],
                       env=procs.common_env(common), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "webhook_max_attempts" in r.stderr and "Traceback" not in r.stderr
