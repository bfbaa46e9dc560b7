"""Broadcast end to end through real processes (DESIGN.md §3): POST /v1/broadcast reaches every open
session bound to the app and none other; a user offline at the time gets it at connect (or BIND),
once; after an ack it never comes again, across reconnects; an expired one is not delivered.

Every test broadcasts to an app of its own: a live broadcast reaches every later login of its app,
and the other tests of the shared cluster log in to the demo app."""

from __future__ import annotations

import asyncio
import time
import uuid

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from tests.integration.test_e2e import api, connect, uid
from tests.wire_client import WireClient


def new_app(cluster, prefix: str = "bc") -> dict:
    return cluster.create_app(f"{prefix}-{uuid.uuid4().hex[:8]}")


async def broadcast(cluster, app, payload: str, ttl_s: int = 60) -> int:
    status, body = await api(cluster, "POST", "/v1/broadcast", {"app": app["id"], "payload": payload, "ttl_s": ttl_s},
                             key=app["api_key"])
    assert status == 200, body
    return int(body["broadcast_id"])


async def broadcasts_received(client: WireClient, want: set[int], timeout: float = 5.0) -> list[cpb.Message]:
    """Copies of the broadcasts in ``want`` read until each came (or the time is up); other live
    broadcasts of the app (earlier tests') are read and left out."""
    got: list[cpb.Message] = []
    deadline = time.monotonic() + timeout
    while not want <= {m.msg_id for m in got} and time.monotonic() < deadline:
        try:
            frame, body = await client.recv(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        if frame.op == Op.PUSH:
            got += [m for m in body.messages if m.broadcast]
    return [m for m in got if m.msg_id in want]


async def nothing_more(client: WireClient, ids: set[int], wait_s: float = 0.7) -> None:
    extra = await broadcasts_received(client, ids | {-1}, timeout=wait_s)
    assert not extra, f"delivered again: {extra}"


async def progress(cluster, app, bid: int) -> dict:
    status, body = await api(cluster, "GET", f"/v1/broadcasts/{bid}", key=app["api_key"])
    assert status == 200, body
    return body


async def connect_after_its_inbox(cluster, app, room: int) -> WireClient:
    """A login whose inbox read is over when this returns: a unicast stored before the login
    comes with that read. Else a broadcast stored while the read is in flight comes with it and
    the fan-out has nothing left to write for that session (not counted in ``delivered``)."""
    user = uid()
    status, body = await api(cluster, "POST", "/v1/push", {"app": app["id"], "uids": [user], "payload": "stored"},
                             key=app["api_key"])
    assert status == 200, body
    client, _ = await connect(cluster, user, app=app, room=room)
    frame, push = await client.recv(timeout=5)
    assert frame.op == Op.PUSH and [m.payload for m in push.messages] == [b"stored"], (frame, push)
    return client


async def test_online_sessions_of_the_app_get_it_once_and_others_do_not(cluster):
    app, other = new_app(cluster), new_app(cluster, "bco")
    a = await connect_after_its_inbox(cluster, app, room=0)
    b = await connect_after_its_inbox(cluster, app, room=1)
    outsider, _ = await connect(cluster, uid(), app=other)
    bid = await broadcast(cluster, app, "to all of app")
    for c in (a, b):
        (m,) = await broadcasts_received(c, {bid})
        assert m.msg_id == bid and m.payload == b"to all of app" and m.app == app["id"] and m.seq == 0
        c.send(Op.ACK, cpb.Ack(msg_ids=[bid]))
    await nothing_more(outsider, {bid})
    deadline = time.monotonic() + 10
    while (p := await progress(cluster, app, bid))["state"] != "done":
        assert time.monotonic() < deadline, p
        await asyncio.sleep(0.1)
    assert p["subtasks_total"] == p["subtasks_done"] == len(cluster.room_addresses)
    assert p["delivered"] == 2 and p["broadcast_id"] == str(bid)
    for c in (a, b, outsider):
        await c.close()


async def test_a_user_offline_at_the_time_gets_it_at_connect_once_and_never_after_the_ack(cluster):
    app, user = new_app(cluster), uid()
    bid = await broadcast(cluster, app, "while you were away")
    c, _ = await connect(cluster, user, app=app, room=0)
    (m,) = await broadcasts_received(c, {bid})
    assert m.payload == b"while you were away"
    await nothing_more(c, {bid})
    await c.close()
    # not acked: it comes again at the next connect (on the other instance too)
    c, _ = await connect(cluster, user, app=app, room=1)
    assert [m.msg_id for m in await broadcasts_received(c, {bid})] == [bid]
    c.send(Op.ACK, cpb.Ack(msg_ids=[bid]))
    await asyncio.sleep(1.5)  # the ack waits broadcast_ack_linger_ms (1 s) in the room, then goes to saver
    await c.close()
    for room in (0, 1):
        c, _ = await connect(cluster, user, app=app, room=room)
        await nothing_more(c, {bid})
        await c.close()


async def test_binding_the_app_later_loads_its_live_broadcasts(cluster):
    app, other = new_app(cluster), new_app(cluster, "bcb")
    user = uid()
    bid = await broadcast(cluster, other, "for binders")
    c, _ = await connect(cluster, user, app=app)
    await nothing_more(c, {bid}, wait_s=0.3)
    token, _ = tokens.sign(other["secret"], user, other["id"], 300)
    c.send(Op.BIND, cpb.Bind(apps=[other["id"]], tokens=[token]))
    got = await broadcasts_received(c, {bid})
    assert [m.msg_id for m in got] == [bid] and got[0].app == other["id"]
    await c.close()


async def test_an_expired_broadcast_is_not_delivered_and_reads_expired(cluster):
    app, user = new_app(cluster), uid()
    bid = await broadcast(cluster, app, "short-lived", ttl_s=1)
    await asyncio.sleep(1.3)
    c, _ = await connect(cluster, user, app=app)
    await nothing_more(c, {bid})
    await c.close()
    # done if every room instance wrote it before it expired (no session was bound), else expired
    assert (await progress(cluster, app, bid))["state"] in ("done", "expired")
