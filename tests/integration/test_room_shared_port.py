"""A room host's instances also share one public port (SO_REUSEPORT): clients that connect there
land on every instance, and each session is a normal one of the instance that took it."""

from __future__ import annotations

import os
import uuid

from services.common import tokens
from services.launcher import backing, procs
from services.launcher.cluster import Ports
from tests.integration.conftest import TEST_ENV
from tests.integration.test_e2e import api
from tests.wire_client import WireClient


async def test_instances_share_one_port(cluster):
    runs = Ports.free(2)  # two consecutive free ports for each of client and gRPC
    port, grpc_port, shared = runs.room, runs.room_grpc, backing.free_port()
    env = procs.common_env(cluster.common, TEST_ENV)
    room = procs.start("room-shared", ["room", "--host", cluster.host, "--port", str(port), "--grpc-port",
                                       str(grpc_port), "--instances", "2", "--shared-port", str(shared)], env,
                       os.path.join(cluster.var, "logs"),
                       wait_for=[(cluster.host, port), (cluster.host, port + 1), (cluster.host, shared)])
    clients = []
    try:
        instances = set()
        users = ["shared-" + uuid.uuid4().hex[:8] for _ in range(24)]
        for u in users:
            # a new source address per client: the kernel picks the instance by the connection's hash
            c = await WireClient.connect(cluster.host, shared)
            ok = await c.auth(tokens.sign(cluster.app["secret"], u, cluster.app["id"], 300)[0], u)
            instances.add(ok.session_id.rsplit("/", 1)[0])
            clients.append(c)
        assert instances == {f"room-{cluster.host}:{port}", f"room-{cluster.host}:{port + 1}"}
        status, body = await api(cluster, "GET", f"/v1/users/{users[0]}")
        assert status == 200 and body["online"], body
        assert "Traceback" not in room.log_text()
        # SIGTERM to the supervisor drains every forked instance, and all of them exit
        instance_pids = procs.children(room.proc.pid)
        assert len(instance_pids) == 2
        assert room.stop() == 0
        assert not [pid for pid in instance_pids if os.path.exists(f"/proc/{pid}")]
    finally:
        for c in clients:
            await c.close()
        room.stop()

