"""Register epoch with a real `pylon register` process: stable while the data lives (across calls
and across a register restart), new once the data is gone, carried by every Register reply."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from services.common import runtime
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing, procs
from services.register import keys
from tests.stores import own_stores


@pytest.fixture(scope="module")
def epoch_cfg(backing_stores):
    cfg, tmp = backing_stores
    return own_stores(cfg, "register_epoch"), tmp


@pytest.fixture
async def redis(epoch_cfg):
    cfg, _ = epoch_cfg
    client = runtime.redis_client(cfg.redis_url)
    await client.flushdb()  # this module's own database only
    yield client
    await client.aclose()


def _start(cfg, tmp, grpc_port: int, metrics_port: int) -> procs.ServiceProcess:
    return procs.start("register-epoch", ["register", "--grpc-port", str(grpc_port), "--metrics-port",
                                          str(metrics_port)],
                       env=procs.common_env(cfg), log_dir=tmp, wait_for=[("127.0.0.1", grpc_port)])


def _session(uid: str, sid: str) -> pb.Session:
    return pb.Session(uid=uid, session_id=sid, instance="room-E", apps=["app1"], connected_ms=1)


async def _epoch(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (await pbg.RegisterStub(channel).Epoch(pb.Empty(), timeout=5)).epoch


async def _register(port: int, sessions) -> pb.RegisterReply:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await pbg.RegisterStub(channel).Register(pb.SessionBatch(sessions=sessions), timeout=5)


def _metrics(mport: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()


async def test_epoch_stable_across_calls_and_restart_new_after_flush(epoch_cfg, redis):
    cfg, tmp = epoch_cfg
    port, mport = backing.free_port(), backing.free_port()
    proc = _start(cfg, tmp, port, mport)
    try:
        first = await _epoch(port)
        assert len(first) == 16
        assert await redis.get(keys.EPOCH_KEY) == first.encode()
        assert [await _epoch(port) for _ in range(3)] == [first] * 3
        reply = await _register(port, [_session("ep-a", "s1"), _session("ep-b", "s2")])
        assert (reply.n, reply.epoch) == (2, first)
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]

    # a register restart over the same data keeps the epoch
    proc = _start(cfg, tmp, port, mport)
    try:
        assert await _epoch(port) == first
        assert (await _register(port, [_session("ep-a", "s1")])).epoch == first  # registering again is harmless

        # the data is lost: the first Register into the empty database creates and returns a new epoch,
        # and its own writes are there under it
        await redis.flushdb()
        reply = await _register(port, [_session("ep-c", "s3")])
        second = reply.epoch
        assert reply.n == 1 and second and second != first
        assert await redis.hexists(keys.user_key("ep-c"), "s3")
        assert await _epoch(port) == second
        assert (await _register(port, [_session("ep-a", "s1")])).epoch == second

        # and after a loss noticed by Epoch first
        await redis.flushdb()
        third = await _epoch(port)
        assert third not in ("", first, second)
        assert (await _register(port, [_session("ep-a", "s1")])).epoch == third

        body = await asyncio.to_thread(_metrics, mport)
        assert "pylon_register_epochs_started_total 2.0" in body, body
        assert "pylon_register_epoch_changes_total 2.0" in body
        assert f'pylon_register_epoch_info{{epoch="{third}"}} 1.0' in body
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]
    text = proc.log_text()
    assert "Traceback" not in text
    assert f"register started a new epoch {second}" in text and f"register started a new epoch {third}" in text
    assert f"register epoch {first}" in text  # logged at start, read from Redis


async def test_empty_register_batch_still_answers_the_epoch(epoch_cfg, redis):
    cfg, tmp = epoch_cfg
    port, mport = backing.free_port(), backing.free_port()
    proc = _start(cfg, tmp, port, mport)
    try:
        reply = await _register(port, [])
        assert reply.n == 0 and reply.epoch == (await redis.get(keys.EPOCH_KEY)).decode()
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]
