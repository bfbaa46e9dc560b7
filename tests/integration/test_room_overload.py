"""Overload: past its bound on waiting handshakes a room answers ERROR OVERLOADED with a retry-after,
counts what it shed, and keeps serving the connections it accepted."""

from __future__ import annotations

import asyncio
import os
import urllib.request
import uuid

from services.common import tokens
from services.common.codec import ErrorCode, Op
from services.common.pb import client_pb2 as cpb
from services.launcher import backing, procs
from tests.integration.conftest import TEST_ENV
from tests.wire_client import WireClient


async def test_handshake_storm_past_the_bound_gets_overloaded_with_retry_after(cluster):
    port, grpc_port, metrics_port = backing.free_port(), backing.free_port(), backing.free_port()
    # at most 2 handshakes may wait on register, and they wait 200 ms for company
    env = procs.common_env(cluster.common, {**TEST_ENV, "PYLON_ROOM_MAX_PENDING_AUTH": "2",
                                            "PYLON_ROOM_CONNECT_BATCH_DELAY_MS": "200"})
    room = procs.start("room-overload", ["room", "--host", cluster.host, "--port", str(port), "--grpc-port",
                                         str(grpc_port), "--metrics-port", str(metrics_port), "--instances", "1"],
                       env, os.path.join(cluster.var, "logs"), wait_for=[(cluster.host, port)])
    try:
        clients = [await WireClient.connect(cluster.host, port) for _ in range(10)]
        # every AUTH written before the room reads any, so they reach it together; when it reads
        # them in two goes, one more may get in while the first registration is in flight
        for c in clients:
            user = "storm-" + uuid.uuid4().hex[:8]
            c.send(Op.AUTH, cpb.Auth(token=tokens.sign(cluster.app["secret"], user, cluster.app["id"], 300)[0],
                                     uid=user))
        outcomes = await asyncio.gather(*(c.recv(timeout=10) for c in clients))
        ok = [c for c, (f, _) in zip(clients, outcomes, strict=True) if f.op == Op.AUTH_OK]
        refused = [body for f, body in outcomes if f.op == Op.ERROR]
        assert len(ok) in (2, 3) and len(ok) + len(refused) == 10, (len(ok), len(refused))
        for err in refused:
            assert err.code == ErrorCode.OVERLOADED and err.fatal and err.retry_after_ms > 0
        # the accepted sessions still work
        for c in ok:
            c.send(Op.PING)
            await c.expect(Op.PONG)
        with urllib.request.urlopen(f"http://{cluster.host}:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'pylon_shed_total{{queue="room_register"}} {len(refused)}.0' in text
        assert f'pylon_room_auths_total{{result="overloaded"}} {len(refused)}.0' in text
        # refused by the register bound, not by accept-queue shedding (the queue was never deep)
        assert "pylon_room_accept_queue 0.0" in text and "pylon_room_accept_shedding 0.0" in text
        assert 'pylon_room_accept_wait_sampled_total{waited="over_10s"} 0.0' in text
        for c in clients:
            await c.close()
    finally:
        room.stop()
