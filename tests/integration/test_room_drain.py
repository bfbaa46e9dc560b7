"""Graceful drain: SIGTERM on a room instance sends its clients elsewhere and leaves register clean."""

from __future__ import annotations

import os
import signal
import uuid

from services.common import tokens
from services.common.codec import Op
from services.launcher import backing, procs
from tests.integration.conftest import TEST_ENV
from tests.integration.test_e2e import api
from tests.wire_client import WireClient


async def test_sigterm_drains_to_other_instances(cluster):
    port, grpc_port = backing.free_port(), backing.free_port()
    env = procs.common_env(cluster.common, TEST_ENV)
    room = procs.start("room-drain", ["room", "--host", cluster.host, "--port", str(port), "--grpc-port",
                                      str(grpc_port), "--instances", "1"], env,
                       os.path.join(cluster.var, "logs"), wait_for=[(cluster.host, port)])
    try:
        users = ["drain-" + uuid.uuid4().hex[:8] for _ in range(3)]
        clients = []
        for u in users:
            c = await WireClient.connect(cluster.host, port)
            await c.auth(tokens.sign(cluster.app["secret"], u, cluster.app["id"], 300)[0], u)
            clients.append(c)
        status, body = await api(cluster, "GET", f"/v1/users/{users[0]}")
        assert body["online"]
        room.signal(signal.SIGTERM)
        others = {f"{h}:{p}" for h, p in cluster.room_addresses}
        for c in clients:
            _, cmd = await c.expect(Op.COMMAND, timeout=10)
            assert cmd.kind == "RECONNECT" and set(cmd.addresses) and set(cmd.addresses) <= others
            assert await c.closed()
        assert room.proc.wait(15) == 0
        for u in users:
            status, body = await api(cluster, "GET", f"/v1/users/{u}")
            assert status == 200 and body["online"] is False, body
        assert "Traceback" not in room.log_text()
    finally:
        room.stop()
