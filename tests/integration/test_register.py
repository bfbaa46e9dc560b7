"""Register service: a real `pylon register` process over the test Redis, called through gRPC."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from services.common import runtime
from services.common.discovery import Discovery
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing, procs
from tests.stores import own_stores


def _start(cfg, tmp, name: str):
    port, mport = backing.free_port(), backing.free_port()
    proc = procs.start(name, ["register", "--grpc-port", str(port), "--metrics-port", str(mport)],
                       env=procs.common_env(cfg), log_dir=tmp, wait_for=[("127.0.0.1", port)])
    return proc, port, mport


@pytest.fixture(scope="module")
def register_cfg(backing_stores):
    cfg, tmp = backing_stores
    return own_stores(cfg, "register"), tmp


@pytest.fixture(scope="module")
def register_proc(register_cfg):
    cfg, tmp = register_cfg
    proc, port, mport = _start(cfg, tmp, "register-it")
    yield proc, port, mport
    assert proc.stop() == 0, proc.log_text()[-3000:]
    assert "Traceback" not in proc.log_text()


@pytest.fixture(scope="module")
async def stub(register_proc):
    _, port, _ = register_proc
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield pbg.RegisterStub(channel)
    await channel.close()


def session(uid: str, sid: str, instance: str, apps=("app1",), ms: int = 1) -> pb.Session:
    return pb.Session(uid=uid, session_id=sid, instance=instance, apps=list(apps), device_id="d-" + sid,
                      connected_ms=ms, net="wifi")


async def lookup(stub, uids):
    reply = await stub.Lookup(pb.LookupRequest(uids=uids), timeout=5)
    return {u.uid: u.sessions for u in reply.users}, [u.uid for u in reply.users]


async def test_register_lookup_in_request_order(stub):
    n = await stub.Register(pb.SessionBatch(sessions=[
        session("reg-a", "s1", "room-A", ms=10), session("reg-a", "s2", "room-B", apps=("app1", "app2"), ms=20),
        session("reg-b", "s3", "room-B")]), timeout=5)
    assert n.n == 3
    by_uid, order = await lookup(stub, ["reg-b", "reg-offline", "reg-a"])
    assert order == ["reg-b", "reg-offline", "reg-a"]
    assert list(by_uid["reg-offline"]) == []
    assert [(s.session_id, s.instance) for s in by_uid["reg-a"]] == [("s1", "room-A"), ("s2", "room-B")]
    assert list(by_uid["reg-a"][1].apps) == ["app1", "app2"]
    assert by_uid["reg-b"][0].device_id == "d-s3" and by_uid["reg-b"][0].net == "wifi"


async def test_unregister_removes_only_owned_sessions(stub):
    await stub.Register(pb.SessionBatch(sessions=[session("reg-u", "s1", "room-A"),
                                                  session("reg-u", "s2", "room-A")]), timeout=5)
    n = await stub.Unregister(pb.SessionBatch(sessions=[session("reg-u", "s1", "room-A")]), timeout=5)
    assert n.n == 1
    again = await stub.Unregister(pb.SessionBatch(sessions=[session("reg-u", "s1", "room-A")]), timeout=5)
    assert again.n == 0
    by_uid, _ = await lookup(stub, ["reg-u"])
    assert [s.session_id for s in by_uid["reg-u"]] == ["s2"]


async def test_session_resumed_elsewhere_survives_old_instance(stub, register_cfg):
    cfg, _ = register_cfg
    await stub.Register(pb.SessionBatch(sessions=[session("reg-r", "sr", "room-OLD"),
                                                  session("reg-r2", "sx", "room-OLD")]), timeout=5)
    # the client flash-reconnects to another instance with its resume token: same session id
    await stub.Register(pb.SessionBatch(sessions=[session("reg-r", "sr", "room-NEW", ms=99)]), timeout=5)
    n = await stub.Unregister(pb.SessionBatch(sessions=[session("reg-r", "sr", "room-OLD")]), timeout=5)
    assert n.n == 0
    by_uid, _ = await lookup(stub, ["reg-r"])
    assert [(s.session_id, s.instance) for s in by_uid["reg-r"]] == [("sr", "room-NEW")]

    await stub.Register(pb.SessionBatch(sessions=[session("reg-r", "sr", "room-OLD")]), timeout=5)
    await stub.Register(pb.SessionBatch(sessions=[session("reg-r", "sr", "room-NEW", ms=100)]), timeout=5)
    dropped = await stub.DropInstance(pb.InstanceRequest(instance="room-OLD"), timeout=5)
    assert dropped.n == 1  # reg-r2/sx only
    by_uid, _ = await lookup(stub, ["reg-r", "reg-r2"])
    assert [(s.session_id, s.instance) for s in by_uid["reg-r"]] == [("sr", "room-NEW")]
    assert list(by_uid["reg-r2"]) == []
    redis = runtime.redis_client(cfg.redis_url)
    try:
        assert await redis.exists("pylon:r:room-OLD") == 0
        assert await redis.smembers("pylon:r:room-NEW") == {b"reg-r\x00sr"}
    finally:
        await redis.aclose()


async def test_drop_instance_in_chunks(stub):
    sessions = [session(f"reg-d{i}", f"s{i}", "room-BIG") for i in range(2500)]
    assert (await stub.Register(pb.SessionBatch(sessions=sessions), timeout=10)).n == 2500
    assert (await stub.DropInstance(pb.InstanceRequest(instance="room-BIG"), timeout=10)).n == 2500
    by_uid, _ = await lookup(stub, [s.uid for s in sessions[:50]])
    assert all(not v for v in by_uid.values())
    assert (await stub.DropInstance(pb.InstanceRequest(instance="room-BIG"), timeout=5)).n == 0


async def test_uid_with_nul_survives_drop_instance(stub):
    uid = "reg-nul\x00uid"
    await stub.Register(pb.SessionBatch(sessions=[session(uid, "room-N/1", "room-N")]), timeout=5)
    by_uid, _ = await lookup(stub, [uid])
    assert [s.session_id for s in by_uid[uid]] == ["room-N/1"]
    assert (await stub.DropInstance(pb.InstanceRequest(instance="room-N"), timeout=5)).n == 1
    by_uid, _ = await lookup(stub, [uid])
    assert list(by_uid[uid]) == []


@pytest.mark.parametrize("call", [
    lambda st: st.Lookup(pb.LookupRequest(uids=[f"u{i}" for i in range(5001)]), timeout=5),
    lambda st: st.Lookup(pb.LookupRequest(uids=["ok", ""]), timeout=5),
    lambda st: st.Register(pb.SessionBatch(sessions=[pb.Session(uid="x", session_id="s")]), timeout=5),
    lambda st: st.Register(pb.SessionBatch(sessions=[session("x", "s", "r")] * 5001), timeout=5),
    lambda st: st.DropInstance(pb.InstanceRequest(instance=""), timeout=5),
])
async def test_bad_requests_are_invalid_argument(stub, call):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(stub)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("register.")


async def test_announced_in_discovery_with_metrics(register_proc, register_cfg, stub):
    cfg, _ = register_cfg
    _, port, mport = register_proc
    redis = runtime.redis_client(cfg.redis_url)
    try:
        found = await Discovery(redis).instances("register", fresh=True)
    finally:
        await redis.aclose()
    assert any(i.grpc == f"127.0.0.1:{port}" and i.metrics == f"127.0.0.1:{mport}" for i in found)
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read())
    assert b"pylon_register_sessions_registered_total" in body
    assert b"pylon_register_lookups_total" in body


async def test_dead_redis_is_unavailable(backing_stores):
    cfg, tmp = backing_stores
    import dataclasses

    dead = dataclasses.replace(cfg, redis_url=f"redis://127.0.0.1:{backing.free_port()}/0")
    proc, port, _ = _start(dead, tmp, "register-deadredis")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.RegisterStub(channel)
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Lookup(pb.LookupRequest(uids=["a"]), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Redis unavailable" in info.value.details()
    finally:
        assert proc.stop() == 0
    text = proc.log_text()
    assert "Traceback" not in text
    assert text.count("Redis unavailable") == 1, text
