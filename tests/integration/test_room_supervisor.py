"""The room supervisor keeps its tier whole: an instance killed with -9 is forked again on the same
ports and is back in discovery within seconds; the supervisor still drains and stops cleanly.

The tier runs alone on a Redis of its own (rooms need only Redis to start and announce), so the
kills here never touch the session cluster."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.request

import pytest

from services.common import runtime
from services.common.config import CommonConfig
from services.common.discovery import Discovery
from services.launcher import backing, procs
from services.launcher.cluster import Ports
from tests.integration.conftest import TEST_ENV


@pytest.fixture(scope="module")
def own_redis():
    backing.ensure_installed(["redis-server"])
    tmp = tempfile.mkdtemp(prefix="pylon-supervisor-")
    port = backing.free_port()
    redis = backing.start_redis(os.path.join(tmp, "redis"), port)
    try:
        yield CommonConfig(redis_url=f"redis://127.0.0.1:{port}/0", discovery_ttl_s=3, discovery_refresh_s=0.5), tmp
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _start_tier(common: CommonConfig, tmp: str, k: int) -> tuple[procs.ServiceProcess, int]:
    ports = Ports.free(k)
    room = procs.start("room-supervised", ["room", "--host", "127.0.0.1", "--port", str(ports.room), "--grpc-port",
                                           str(ports.room_grpc), "--instances", str(k)],
                       procs.common_env(common, TEST_ENV), os.path.join(tmp, "logs"),
                       wait_for=[("127.0.0.1", ports.room + i) for i in range(k)])
    return room, ports.room


async def _room_records(common: CommonConfig) -> dict[str, object]:
    redis = runtime.redis_client(common.redis_url)
    try:
        return {i.id: i for i in await Discovery(redis).instances("room", fresh=True)}
    finally:
        await redis.aclose()


async def _wait_records(common, ids):
    records = await _room_records(common)
    return records if ids <= set(records) else None


async def _metrics(address: str) -> str:
    def get() -> str:
        return urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()

    return await asyncio.to_thread(get)


def _serving_pid(log_text: str, port: int) -> list[int]:
    """pids that logged serving clients on ``port``, in order."""
    return [int(p) for p in re.findall(rf"serving clients on 127\.0\.0\.1:{port}\b.*?pid (\d+)", log_text)]


async def _until(what: str, check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s}s")
        await asyncio.sleep(0.1)


async def test_killed_instance_is_forked_again_and_supervisor_still_stops(own_redis):
    common, tmp = own_redis
    room, base = _start_tier(common, tmp, 2)
    try:
        victim_id = f"room-127.0.0.1:{base + 1}"
        before = await _until("both instances in discovery",
                              lambda: _wait_records(common, {f"room-127.0.0.1:{base}", victim_id}), 20)
        old_pids = procs.children(room.pid)
        assert len(old_pids) == 2
        victim = _serving_pid(room.log_text(), base + 1)[-1]
        assert victim in old_pids
        os.kill(victim, signal.SIGKILL)

        async def restarted():
            pids = procs.children(room.pid)
            records = await _room_records(common)
            rec = records.get(victim_id)
            serving = _serving_pid(room.log_text(), base + 1)  # logged just after the announce
            if (len(pids) == 2 and victim not in pids and rec is not None and serving[-1] in pids
                    and rec.started_ms > before[victim_id].started_ms and backing.port_open("127.0.0.1", base + 1)):
                return pids
            return None

        new_pids = await _until("a new instance on the killed one's port, live in discovery", restarted, 10)
        text = room.log_text()
        new_pid = _serving_pid(text, base + 1)[-1]
        assert new_pid in new_pids and new_pid != victim
        assert f"room instance 1 (pid {victim}, port {base + 1}) was killed by SIGKILL" in text
        assert f"room instance 1 restarted as pid {new_pid} on port {base + 1} (restart 1)" in text
        assert set(old_pids) - {victim} <= set(new_pids)  # the other instance was left alone
        # the new process says on its /metrics that its slot was restarted once
        records = await _room_records(common)
        assert "pylon_room_instance_restarts 1.0" in await _metrics(records[victim_id].metrics)
        assert "pylon_room_instance_restarts 0.0" in await _metrics(records[f"room-127.0.0.1:{base}"].metrics)
        # no zombie: the killed instance was reaped
        assert not os.path.exists(f"/proc/{victim}")

        # an instance that drains on its own SIGTERM is replaced too (after a longer backoff: it died young)
        os.kill(new_pid, signal.SIGTERM)

        async def replaced_again():
            pids = procs.children(room.pid)
            serving = _serving_pid(room.log_text(), base + 1)
            return len(pids) == 2 and new_pid not in pids and serving[-1] != new_pid and serving[-1] in pids

        await _until("the drained instance replaced", replaced_again, 15)
        assert f"(pid {new_pid}, port {base + 1}) exited with code 0" in room.log_text()

        final_pids = procs.children(room.pid)
        assert room.stop(timeout_s=30) == 0, room.log_text()[-3000:]
        assert not [pid for pid in final_pids if os.path.exists(f"/proc/{pid}")]
        text = room.log_text()
        assert "Traceback" not in text, text[-3000:]
        assert "room supervisor stopped" in text
    finally:
        room.stop()


async def test_killed_supervisor_takes_its_instances_with_it(own_redis):
    """A supervisor killed with -9 leaves no orphan instances holding the ports: each gets SIGTERM
    from the kernel (parent-death signal), drains and exits."""
    common, tmp = own_redis
    room, base = _start_tier(common, tmp, 2)
    try:
        pids = procs.children(room.pid)
        assert len(pids) == 2
        room.proc.kill()
        room.proc.wait(5)

        async def gone():
            return not [p for p in pids if os.path.exists(f"/proc/{p}")]

        await _until("orphaned instances gone", gone, 20)
        assert not backing.port_open("127.0.0.1", base) and not backing.port_open("127.0.0.1", base + 1)
    finally:
        room.stop()


async def test_instance_that_keeps_dying_backs_off_then_recovers(own_redis):
    """Instance 1 cannot bind its gRPC port (held here): it dies at every start, the supervisor
    waits longer each time; once the port is free the next start serves."""
    import socket

    common, tmp = own_redis
    ports = Ports.free(2)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", ports.room_grpc + 1))
    blocker.listen()
    room = procs.start("room-crashloop", ["room", "--host", "127.0.0.1", "--port", str(ports.room), "--grpc-port",
                                          str(ports.room_grpc), "--instances", "2"],
                       procs.common_env(common, TEST_ENV), os.path.join(tmp, "logs"),
                       wait_for=[("127.0.0.1", ports.room)])
    try:
        async def delays():
            found = re.findall(r"room instance 1 \(pid \d+, port \d+\) exited with code 1 after [\d.]+ s; "
                               r"starting it again in ([\d.]+) s", room.log_text())
            return found if len(found) >= 3 else None

        found = await _until("three failed starts of instance 1", delays, 15)
        assert [float(d) for d in found[:3]] == [0.5, 1.0, 2.0]
        assert room.alive() and backing.port_open("127.0.0.1", ports.room)  # instance 0 is unaffected
        blocker.close()

        async def serving():
            return _serving_pid(room.log_text(), ports.room + 1)

        await _until("instance 1 serving once its port is free", serving, 20)
        assert room.stop(timeout_s=30) == 0, room.log_text()[-3000:]
    finally:
        blocker.close()
        room.stop()
