"""Concurrent pushes through real processes share their internal calls, and every request still
gets its own answer: its ids, its counts, its messages delivered once per session and acked."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid

import aiohttp

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from tests.integration.test_e2e import connect, wait_state
from tests.wire_client import WireClient

N_USERS = 60


def uid() -> str:
    return "pb-" + uuid.uuid4().hex[:12]


def center_rpc_counts(cluster) -> dict[str, float]:
    """Center's client-side RPC counts by "service.Method" (its /metrics)."""
    with urllib.request.urlopen(cluster.center_url + "/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^pylon_rpc_seconds_count\{([^}]*)\} (\S+)$', body, re.M):
        labels = dict(kv.split("=", 1) for kv in m.group(1).split(","))
        key = f"{labels['service'].strip(chr(34))}.{labels['method'].strip(chr(34))}"
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


async def test_concurrent_single_message_pushes_share_calls_and_each_gets_its_own_message(cluster):
    users = [uid() for _ in range(N_USERS)]
    # a second session of the first user on the other room: a message goes to both, once each
    clients = [await connect(cluster, u, room=i % 2) for i, u in enumerate(users)]
    token, _ = tokens.sign(cluster.app["secret"], users[0], cluster.app["id"], 300, device_id="dev2")
    headers = {"Authorization": f"Bearer {cluster.app['api_key']}"}
    # one message for the first user that the twin's login loads: its arrival proves that load is
    # over (a push while it is in flight is left to it, and counted delivered 0 by the push)
    warm = urllib.request.Request(cluster.center_url + "/v1/push", method="POST", headers=headers, data=json.dumps(
        {"app": cluster.app["id"], "uids": [users[0]], "payload": "warm"}).encode())
    with await asyncio.to_thread(urllib.request.urlopen, warm, timeout=10) as r:
        assert r.status == 200
    _, p = await clients[0][0].expect(Op.PUSH)
    twin = await WireClient.connect(*cluster.room_addresses[1])
    await twin.auth(token, users[0], device_id="dev2", net="wifi")
    _, loaded = await twin.expect(Op.PUSH)
    assert [m.payload for m in loaded.messages] == [b"warm"]
    for c in (clients[0][0], twin):
        c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in p.messages]))
    before = center_rpc_counts(cluster)
    connector = aiohttp.TCPConnector(limit=N_USERS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async def one(u: str) -> dict:
            body = {"app": cluster.app["id"], "uids": [u], "payload": f"for {u}"}
            async with http.post(cluster.center_url + "/v1/push", data=json.dumps(body)) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        replies = await asyncio.gather(*(one(u) for u in users))
    after = center_rpc_counts(cluster)
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in ("saver.Store", "register.Lookup", "room.Push")}
    # one call per request and hop would be N_USERS each; shared calls are far fewer
    assert calls["saver.Store"] < N_USERS / 2 and calls["register.Lookup"] < N_USERS / 2, calls
    assert calls["room.Push"] < N_USERS, calls

    for u, reply, (c, _) in zip(users, replies, clients, strict=True):
        assert len(reply["msg_ids"]) == 1 and reply["online"] == 1, reply
        assert reply["delivered"] == (2 if u == users[0] else 1), reply
        _, p = await c.expect(Op.PUSH)
        (m,) = p.messages
        assert str(m.msg_id) == reply["msg_ids"][0] and m.payload == f"for {u}".encode()
        c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id]))
    _, p = await twin.expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == replies[0]["msg_ids"]
    twin.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in p.messages]))
    for reply in replies[:10]:
        await wait_state(cluster, reply["msg_ids"][0], "acked")
    for c, _ in clients:
        await c.close()
    await twin.close()


async def test_concurrent_multicasts_keep_ids_in_order_and_deliver_once_per_session(cluster):
    users = [uid() for _ in range(8)]
    clients = {u: (await connect(cluster, u, room=i % 2))[0] for i, u in enumerate(users)}
    headers = {"Authorization": f"Bearer {cluster.app['api_key']}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async def multicast(k: int) -> dict:
            body = {"app": cluster.app["id"], "uids": users, "payload": f"m{k}"}
            async with http.post(cluster.center_url + "/v1/push", data=json.dumps(body)) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        replies = await asyncio.gather(*(multicast(k) for k in range(5)))
    for reply in replies:
        assert len(reply["msg_ids"]) == len(users) and reply["online"] == len(users)
        assert [int(i) for i in reply["msg_ids"]] == sorted(int(i) for i in reply["msg_ids"])
    for i, u in enumerate(users):
        want = {r["msg_ids"][i] for r in replies}
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < len(want) and time.monotonic() < deadline:
            _, p = await clients[u].expect(Op.PUSH)
            got += [str(m.msg_id) for m in p.messages]
        assert sorted(got) == sorted(want), (u, got, want)  # each once
        clients[u].send(Op.ACK, cpb.Ack(msg_ids=[int(x) for x in got]))
    for c in clients.values():
        await c.close()
