"""Structured logs and request ids across real processes, and clients' mistakes without tracebacks.

One system of real processes (its own Redis, the shared MariaDB on a database of its own) with
``log_format = "json"`` and DEBUG logs:
  - ``LocalCluster`` reports each start-up step (what ``pylon up`` prints);
  - every line every service writes is one JSON object with the agreed fields;
  - a push with an ``X-Request-Id`` to an online user comes back with that header, and the id is
    on center's line for the request and on saver's, register's and room's lines for the calls
    that carried its message;
  - bad input of every kind (malformed frames to a room, bad JSON, an unknown app and wrong keys to
    center, bad arguments and bogus request-id metadata to the gRPC services) is refused, and no
    process logs a traceback for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.error
import urllib.request

import grpc
import pytest

from services.common import logs
from services.common.codec import HEADER, VERSION, ErrorCode, Op, encode
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing
from services.launcher.cluster import LocalCluster, Ports
from tests.integration.conftest import TEST_ENV
from tests.wire_client import WireClient

SERVICES = ("register", "saver", "coordinator", "center", "dispatcher", "room")
JSON_FIELDS = {"time", "level", "service", "instance", "pid", "logger", "message"}


@pytest.fixture(scope="module")
def system(backing_stores):
    common, tmp = backing_stores
    base = os.path.join(tmp, "request-logs")
    port = backing.free_port()
    own_redis = backing.start_redis(os.path.join(base, "redis"), port)
    common = dataclasses.replace(common, redis_url=f"redis://127.0.0.1:{port}/0", mysql_database="pylon_request_logs")
    steps: list[str] = []
    c = LocalCluster(base, Ports.free(2), room_instances=2, common=common, progress=steps.append,
                     env={**TEST_ENV, "PYLON_LOG_FORMAT": "json", "PYLON_LOG_LEVEL": "DEBUG"})
    try:
        c.start()
        c.create_demo_app()
        c.steps = steps
        yield c
    finally:
        c.stop()
        own_redis.stop()


def _log_lines(c: LocalCluster, name: str) -> list[dict]:
    out = []
    for line in c.services[name].log_text().splitlines():
        if line.strip():
            out.append(json.loads(line))  # a line that is not JSON fails the test here
    return out


def _http(c: LocalCluster, method: str, path: str, body: bytes | None, headers: dict[str, str]):
    req = urllib.request.Request(c.center_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def _wait_for(what: str, check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout_s}s: {what}")
        time.sleep(0.1)


def test_start_up_reports_each_step_with_its_elapsed_time(system):
    text = "\n".join(system.steps)
    for name in ("register", "saver", "coordinator", "center", "dispatcher"):
        assert any(f"  {name} ready on " in s for s in system.steps), text
    assert any("migrations: " in s and "applied" in s for s in system.steps), text
    assert any(s.endswith("room instances 2/2 listening") for s in system.steps), text
    assert any("room instances 2/2 in discovery" in s for s in system.steps), text
    assert system.steps[-1].endswith("  ready"), text
    elapsed = [float(s.split("s  ", 1)[0]) for s in system.steps]
    assert elapsed == sorted(elapsed), text


async def test_a_request_id_travels_from_center_through_saver_register_and_room(system):
    app = system.app if system.app else None
    assert app is not None
    uid = "rid-" + os.urandom(4).hex()
    status, _, body = _http(system, "POST", "/v1/tokens", json.dumps({"uid": uid}).encode(),
                            {"Authorization": f"Bearer {app['api_key']}", "Content-Type": "application/json"})
    assert status == 200, body
    host, port = system.room_addresses[0]
    key = {"Authorization": f"Bearer {app['api_key']}", "Content-Type": "application/json"}
    # stored before the login, so its arrival proves the login's inbox load is over: a push while
    # the load is in flight is left to it and counted delivered 0 by the push
    token = body["token"]
    status, _, body = await asyncio.to_thread(
        _http, system, "POST", "/v1/push", json.dumps({"app": app["id"], "uids": [uid], "payload": "first"}).encode(),
        key)
    assert status == 200 and body["online"] == 0, body
    client = await WireClient.connect(host, port)
    try:
        await client.auth(token, uid, apps=[app["id"]])
        _, first = await client.expect(Op.PUSH)
        client.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in first.messages]))
        rid = "trace-" + os.urandom(6).hex()
        status, headers, body = await asyncio.to_thread(
            _http, system, "POST", "/v1/push", json.dumps({"app": app["id"], "uids": [uid], "payload": "hi"}).encode(),
            {"Authorization": f"Bearer {app['api_key']}", "Content-Type": "application/json", "X-Request-Id": rid})
        assert status == 200 and body["delivered"] == 1, body
        assert headers.get("X-Request-Id") == rid
        await client.expect(Op.PUSH)
        # without one, center assigns its own and says which
        status, headers, _ = await asyncio.to_thread(
            _http, system, "GET", f"/v1/users/{uid}", None, {"Authorization": f"Bearer {app['api_key']}"})
        assert status == 200 and logs.sane_request_id(headers.get("X-Request-Id")), headers
        assert headers["X-Request-Id"] != rid
    finally:
        await client.close()

    def carried(name: str, key: str):
        return [line for line in _log_lines(system, name) if rid in (line.get(key) or ())]

    center = _wait_for("center's line for the request", lambda: carried("center", "request_id"))
    assert any(line["message"].startswith("POST /v1/push: 200") for line in center), center
    # DEBUG: one line per call received, naming the requests it carries
    for name, method in (("saver", "Saver/Store"), ("register", "Register/Lookup"), ("room", "Room/Push")):
        got = _wait_for(f"{name}'s line for {method}", lambda name=name: carried(name, "request_ids"))
        assert any(method in line["message"] for line in got), got
        assert all(line["service"] == name and line["instance"].startswith(f"{name}-") for line in got), got


async def test_bad_input_is_refused_and_no_process_logs_a_traceback(system):
    app = system.app
    key = {"Authorization": f"Bearer {app['api_key']}", "Content-Type": "application/json"}

    # --- center: bad JSON, unknown app, wrong keys, bad ids, a request id that is not sane
    cases = [
        ("POST", "/v1/push", b"{not json", key, 400),
        ("POST", "/v1/push", b"[]", key, 400),
        ("POST", "/v1/push", json.dumps({"app": app["id"], "uids": "alice", "payload": 1}).encode(), key, 400),
        ("POST", "/v1/push", json.dumps({"app": "no-such-app", "uids": ["a"], "payload": "x"}).encode(), key, 403),
        ("POST", "/v1/push", json.dumps({"app": app["id"], "uids": ["a"], "payload": "x"}).encode(),
         {"Authorization": "Bearer wrong-key"}, 401),
        ("POST", "/v1/push", b"{}", {}, 401),
        ("GET", "/v1/messages/not-a-number", None, key, 400),
        ("GET", "/v1/apps", None, key, 403),
        ("POST", "/v1/apps", b"\xff\xfe", {"Authorization": f"Bearer {system.admin_key}"}, 400),
        ("POST", "/v1/tokens", json.dumps({"uid": "u", "ttl_s": -5}).encode(), {**key, "X-Request-Id": "x" * 500}, 400),
    ]
    for method, path, body, headers, want in cases:
        status, got_headers, answer = await asyncio.to_thread(_http, system, method, path, body, headers)
        assert status == want and "code" in answer.get("error", {}), (method, path, status, answer)
        assert logs.sane_request_id(got_headers.get("X-Request-Id")), got_headers  # ours, not the 500-char one

    # --- room: malformed frames of every kind; each connection gets an ERROR or is closed
    host, port = system.room_addresses[0]
    bad_frames = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                                 # not our protocol
        HEADER.pack(5, VERSION, Op.AUTH, 0, 1),                                # length below the header
        HEADER.pack(1 << 30, VERSION, Op.AUTH, 0, 1),                          # far over the frame limit
        HEADER.pack(12, 99, Op.AUTH, 0, 1),                                    # unknown version
        HEADER.pack(12, VERSION, 200, 0, 1),                                   # unknown op
        encode(Op.AUTH, b"\xff\xff\xff\xff\x0f", 1),                           # a body that is no Auth
        encode(Op.AUTH, cpb.Auth(token="garbage", uid="u", apps=[app["id"]]).SerializeToString(), 1),
        encode(Op.PING, b"", 1),                                               # before AUTH
        encode(Op.PUSH, b"", 1),                                               # a server-to-client op
    ]
    for data in bad_frames:
        client = await WireClient.connect(host, port)
        try:
            client.send_raw(data)
            assert await client.closed(timeout=10), data
        finally:
            await client.close()
    # after AUTH: garbage bodies and names it may not use are refused without closing the server
    status, _, body = await asyncio.to_thread(_http, system, "POST", "/v1/tokens",
                                              json.dumps({"uid": "bad-input"}).encode(), key)
    client = await WireClient.connect(host, port)
    try:
        await client.auth(body["token"], "bad-input", apps=[app["id"]])
        client.send_raw(encode(Op.UPSTREAM, cpb.Upstream(app="not-bound", kind="k", payload=b"x").SerializeToString(), 7))
        await client.expect_error(ErrorCode.NOT_BOUND)
        client.send_raw(encode(Op.BIND, cpb.Bind(apps=["no-such-app"]).SerializeToString(), 8))
        _, err = await client.expect(Op.ERROR)
        assert err.code in (ErrorCode.UNKNOWN_APP, ErrorCode.BAD_TOKEN), err
        client.send_raw(encode(Op.ACK, b"\xff\xff\xff", 9))
        assert await client.closed(timeout=10)
    finally:
        await client.close()

    # --- gRPC: bad arguments, and request-id metadata that is not ours
    bogus = ((logs.METADATA_KEY, "x" * (logs.MAX_METADATA_CHARS + 100)),)
    calls = [
        ("saver", system.ports.saver, pbg.SaverStub, "Store", pb.StoreRequest(messages=[pb.StoredMessage(uid="")])),
        ("saver", system.ports.saver, pbg.SaverStub, "Store",
         pb.StoreRequest(messages=[pb.StoredMessage(uid="u" * 1000, app=app["id"], payload=b"x")])),
        ("register", system.ports.register, pbg.RegisterStub, "Lookup", pb.LookupRequest(uids=[""])),
        ("register", system.ports.register, pbg.RegisterStub, "Lookup", pb.LookupRequest(uids=["u" * 1000])),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{system.ports.saver}") as saver_ch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{system.ports.register}") as register_ch:
        channels = {"saver": saver_ch, "register": register_ch}
        for name, _port, stub_cls, method, request in calls:
            stub = stub_cls(channels[name])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(request, timeout=5, metadata=bogus)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, method, err.value.details())
    # empty and oversized fields everywhere: answered or refused, never UNKNOWN (a handler's
    # unhandled exception) or INTERNAL
    odd_calls = [
        (system.ports.saver, pbg.SaverStub, "LoadInbox", pb.LoadRequest(keys=[pb.InboxKey(uid="", apps=[""])])),
        (system.ports.saver, pbg.SaverStub, "Ack", pb.MessageRefs(refs=[pb.MessageRef(uid="", app="", msg_id=0)])),
        (system.ports.saver, pbg.SaverStub, "MarkDelivered", pb.MessageRefs(refs=[pb.MessageRef(uid="u" * 1000)])),
        (system.ports.saver, pbg.SaverStub, "GetMessage", pb.GetMessageRequest(msg_id=0)),
        (system.ports.register, pbg.RegisterStub, "Register", pb.SessionBatch(sessions=[pb.Session()])),
        (system.ports.register, pbg.RegisterStub, "Unregister", pb.SessionBatch(sessions=[pb.Session(uid="u" * 1000)])),
        (system.ports.register, pbg.RegisterStub, "DropInstance", pb.InstanceRequest(instance="")),
        (system.ports.room_grpc, pbg.RoomStub, "Push", pb.PushRequest(messages=[pb.StoredMessage()])),
        (system.ports.room_grpc, pbg.RoomStub, "Kick", pb.KickRequest(uids=["u" * 1000], reason="r" * 10_000)),
        (system.ports.room_grpc, pbg.RoomStub, "TakeSession", pb.TakeSessionRequest(session_id="bogus")),
        (system.ports.coordinator, pbg.CoordinatorStub, "Kick", pb.KickRequest(uids=[""])),
    ]
    for port, stub_cls, method, request in odd_calls:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                await getattr(stub_cls(ch), method)(request, timeout=5, metadata=bogus)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, exc.details())

    for name in SERVICES:
        lines = _log_lines(system, name)
        assert lines and all(JSON_FIELDS <= line.keys() for line in lines), name
        assert not [line for line in lines if "traceback" in line], (name, [x for x in lines if "traceback" in x][:2])
        text = system.services[name].log_text()
        assert "Traceback" not in text, (name, text[-3000:])
        assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")], name
