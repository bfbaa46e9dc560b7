"""End to end through real processes: HTTP API -> center -> saver/register -> room -> client, and back."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from services.common import tokens
from services.common.codec import HEADER, ErrorCode, Op, encode
from services.common.pb import client_pb2 as cpb
from tests.wire_client import WireClient


def uid() -> str:
    return "u-" + uuid.uuid4().hex[:12]


async def api(cluster, method, path, body=None, key=None, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key if key is not None else cluster.app['api_key']}"}
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with s.request(method, cluster.center_url + path, data=data, headers=headers) as r:
            return r.status, await r.json(content_type=None)


async def connect(cluster, user, app=None, room=0, rcvbuf=0, **auth_kw) -> tuple[WireClient, cpb.AuthOk]:
    app = app or cluster.app
    token, _ = tokens.sign(app["secret"], user, app["id"], 300, device_id="dev1")
    host, port = cluster.room_addresses[room]
    c = await WireClient.connect(host, port, rcvbuf=rcvbuf)
    ok = await c.auth(token, user, device_id="dev1", net="wifi", **auth_kw)
    return c, ok


async def push(cluster, users, payload="hi", app=None, **extra):
    app = app or cluster.app
    status, body = await api(cluster, "POST", "/v1/push", {"app": app["id"], "uids": users, "payload": payload, **extra},
                             key=app["api_key"])
    assert status == 200, body
    return body["msg_ids"]


async def message_state(cluster, msg_id, app=None) -> str:
    status, body = await api(cluster, "GET", f"/v1/messages/{msg_id}", key=(app or cluster.app)["api_key"])
    assert status == 200, body
    return body["state"]


async def wait_state(cluster, msg_id, want, timeout=5.0):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = await message_state(cluster, msg_id)
        if state == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"message {msg_id} is {state!r}, expected {want!r}")


async def test_online_unicast_delivered_acked_and_state_visible(cluster):
    user = uid()
    c, ok = await connect(cluster, user)
    assert ok.session_id and ok.heartbeat_s == 360 and ok.max_frame == 65536
    (msg_id,) = await push(cluster, [user], "hello")
    assert isinstance(msg_id, str) and msg_id.isdigit()
    _, p = await c.expect(Op.PUSH)
    (m,) = p.messages
    assert str(m.msg_id) == msg_id and m.payload == b"hello" and m.app == cluster.app["id"] and m.seq >= 1
    await wait_state(cluster, msg_id, "delivered")
    c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id]))
    await wait_state(cluster, msg_id, "acked")
    await c.close()
    # acked means deleted from the inbox: a new connection gets nothing
    c2, _ = await connect(cluster, user)
    with pytest.raises(asyncio.TimeoutError):
        await c2.recv(timeout=0.5)
    await c2.close()


async def test_offline_message_stored_then_delivered_at_next_connect(cluster):
    user = uid()
    ids = await push(cluster, [user], "while you were away")
    assert await message_state(cluster, ids[0]) == "stored"
    more = await push(cluster, [user], "second")
    c, _ = await connect(cluster, user, room=1)
    _, p = await c.expect(Op.PUSH)
    got = [(str(m.msg_id), m.payload) for m in p.messages]
    assert got == [(ids[0], b"while you were away"), (more[0], b"second")]
    assert p.messages[0].seq < p.messages[1].seq
    c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in p.messages]))
    await wait_state(cluster, more[0], "acked")
    await c.close()


async def test_unacked_message_is_redelivered_on_reconnect(cluster):
    user = uid()
    c, _ = await connect(cluster, user)
    (msg_id,) = await push(cluster, [user], "ack me later")
    await c.expect(Op.PUSH)
    await c.close()  # gone without acking
    await asyncio.sleep(0.2)
    c2, _ = await connect(cluster, user)
    _, p = await c2.expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == [msg_id]
    await c2.close()


async def test_multi_app_binding_on_one_connection(cluster):
    other = cluster.create_app("e2e-second-" + uuid.uuid4().hex[:6])
    user = uid()
    c, ok = await connect(cluster, user)
    assert list(ok.apps) == [cluster.app["id"]]
    token2, _ = tokens.sign(other["secret"], user, other["id"], 300)
    seq = c.send(Op.BIND, cpb.Bind(apps=[other["id"]], tokens=[token2]))
    f, cmd = await c.expect(Op.COMMAND)
    assert f.seq == seq and cmd.kind == "BOUND" and set(cmd.apps) == {cluster.app["id"], other["id"]}
    await asyncio.sleep(0.1)
    await push(cluster, [user], "from app 1")
    await push(cluster, [user], "from app 2", app=other)
    got = set()
    while len(got) < 2:
        _, p = await c.expect(Op.PUSH)
        got |= {(m.app, m.payload) for m in p.messages}
    assert got == {(cluster.app["id"], b"from app 1"), (other["id"], b"from app 2")}
    # presence shows both apps on the one session
    status, body = await api(cluster, "GET", f"/v1/users/{user}")
    assert status == 200 and body["online"] and set(body["sessions"][0]["apps"]) == {cluster.app["id"], other["id"]}
    # unbind: app 2 messages no longer arrive on this connection
    c.send(Op.UNBIND, cpb.Bind(apps=[other["id"]]))
    _, cmd = await c.expect(Op.COMMAND)
    assert list(cmd.apps) == [cluster.app["id"]]
    await push(cluster, [user], "after unbind", app=other)
    with pytest.raises(asyncio.TimeoutError):
        await c.recv(timeout=0.5)
    await c.close()


async def test_bind_with_a_token_for_another_uid_is_refused_without_closing(cluster):
    other = cluster.create_app("e2e-third-" + uuid.uuid4().hex[:6])
    user = uid()
    c, _ = await connect(cluster, user)
    wrong, _ = tokens.sign(other["secret"], "someone-else", other["id"], 300)
    c.send(Op.BIND, cpb.Bind(apps=[other["id"]], tokens=[wrong]))
    err = await c.expect_error(ErrorCode.UID_MISMATCH)
    assert not err.fatal
    c.send(Op.PING)
    await c.expect(Op.PONG)
    await c.close()


async def test_upstream_reaches_webhook_with_valid_signature(cluster):
    received: asyncio.Queue = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await received.put((dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    server = web.Application()
    server.router.add_post("/hook", hook)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        app = cluster.create_app("e2e-hook-" + uuid.uuid4().hex[:6], webhook_url=f"http://127.0.0.1:{port}/hook",
                                 status_events=True)
        user = uid()
        c, _ = await connect(cluster, user, app=app)
        seq = c.send(Op.UPSTREAM, cpb.Upstream(app=app["id"], kind="chat", payload=b"\x00\x01 up"))
        f, ack = await c.expect(Op.UPSTREAM_ACK)
        assert f.seq == seq and ack.accepted
        events = []
        while not any(e["type"] == "upstream" for e in events):
            headers, raw = await asyncio.wait_for(received.get(), 10)
            ts = headers["X-Pylon-Timestamp"]
            want = hmac.new(app["secret"].encode(), f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
            assert headers["X-Pylon-Signature"] == f"sha256={want}"
            body = json.loads(raw)
            assert body["app"] == app["id"]
            events += body["events"]
        up = next(e for e in events if e["type"] == "upstream")
        assert up["uid"] == user and up["kind"] == "chat" and up["payload_b64"] == "AAEgdXA="
        # upstream for an app this connection is not bound to: refused, connection stays
        c.send(Op.UPSTREAM, cpb.Upstream(app="not-mine", kind="x"))
        err = await c.expect_error(ErrorCode.NOT_BOUND)
        assert not err.fatal
        await c.close()
        # the app subscribed to status events: it hears the offline one
        deadline = time.monotonic() + 10
        seen = {e["type"] for e in events}
        while "offline" not in seen and time.monotonic() < deadline:
            _, raw = await asyncio.wait_for(received.get(), 10)
            seen |= {e["type"] for e in json.loads(raw)["events"]}
        assert {"online", "offline"} <= seen
    finally:
        await runner.cleanup()


async def test_kick_closes_the_session(cluster):
    user = uid()
    c, _ = await connect(cluster, user)
    status, body = await api(cluster, "POST", f"/v1/users/{user}/kick", {"reason": "bye"})
    assert status == 200 and body["kicked"] == 1
    _, kick = await c.expect(Op.KICK)
    assert kick.reason == "bye"
    assert await c.closed()
    await asyncio.sleep(0.2)
    status, body = await api(cluster, "GET", f"/v1/users/{user}")
    assert status == 200 and body["online"] is False


@pytest.mark.parametrize("case", ["bad_signature", "expired", "unknown_app", "uid_mismatch", "no_token"])
async def test_bad_auth_rejected_with_the_right_error(cluster, case):
    app = cluster.app
    user = uid()
    if case == "bad_signature":
        token, code = tokens.sign("not-the-secret", user, app["id"], 60)[0], ErrorCode.BAD_TOKEN
    elif case == "expired":
        token, code = tokens.sign(app["secret"], user, app["id"], 60, now=time.time() - 3600)[0], ErrorCode.TOKEN_EXPIRED
    elif case == "unknown_app":
        token, code = tokens.sign("whatever", user, "no-such-app", 60)[0], ErrorCode.UNKNOWN_APP
    elif case == "uid_mismatch":
        token, code = tokens.sign(app["secret"], "someone-else", app["id"], 60)[0], ErrorCode.UID_MISMATCH
    else:
        token, code = "", ErrorCode.BAD_TOKEN
    c = await WireClient.connect(*cluster.room_addresses[0])
    c.send(Op.AUTH, cpb.Auth(token=token, uid=user))
    err = await c.expect_error(code)
    assert err.fatal
    assert await c.closed()


async def test_token_minted_by_the_api_authenticates(cluster):
    user = uid()
    status, body = await api(cluster, "POST", "/v1/tokens", {"uid": user, "device_id": "d9"})
    assert status == 200 and body["expires_at"] > time.time()
    c = await WireClient.connect(*cluster.room_addresses[1])
    ok = await c.auth(body["token"], user)
    assert ok.session_id
    await c.close()


async def test_first_frame_must_be_auth(cluster):
    c = await WireClient.connect(*cluster.room_addresses[0])
    c.send(Op.PING)
    await c.expect_error(ErrorCode.PROTOCOL_VIOLATION)
    assert await c.closed()


async def test_oversized_frame_closes_only_that_connection(cluster):
    user = uid()
    bystander, _ = await connect(cluster, user)
    bad, _ = await connect(cluster, uid())
    bad.send_raw(HEADER.pack(1_000_000, 1, Op.UPSTREAM, 0, 1))
    err = await bad.expect_error(ErrorCode.FRAME_TOO_LARGE)
    assert err.fatal and await bad.closed()
    # garbage on another connection: same, and still nothing else affected
    junk = await WireClient.connect(*cluster.room_addresses[0])
    junk.send_raw(b"GET / HTTP/1.1\r\n\r\n")
    await junk.expect_error(ErrorCode.UNSUPPORTED_VERSION)
    bystander.send(Op.PING)
    await bystander.expect(Op.PONG)
    await push(cluster, [user], "still here")
    _, p = await bystander.expect(Op.PUSH)
    assert p.messages[0].payload == b"still here"
    await bystander.close()


async def test_malformed_body_gets_error_and_close(cluster):
    c, _ = await connect(cluster, uid())
    c.send_raw(encode(Op.ACK, b"\xff\xff\xff\xff"))
    await c.expect_error(ErrorCode.MALFORMED_FRAME)
    assert await c.closed()


async def test_heartbeat_negotiation_and_idle_close(cluster):
    c, ok = await connect(cluster, uid(), heartbeat_hint_s=2)
    assert ok.heartbeat_s == 2
    seq = c.send(Op.PING, cpb.Ping(propose_heartbeat_s=1))
    f, pong = await c.expect(Op.PONG)
    assert f.seq == seq and pong.heartbeat_s == 1
    # a proposal outside the bounds is clamped to them
    c.send(Op.PING, cpb.Ping(propose_heartbeat_s=100_000))
    _, pong = await c.expect(Op.PONG)
    assert pong.heartbeat_s == 900
    c.send(Op.PING, cpb.Ping(propose_heartbeat_s=1))
    await c.expect(Op.PONG)
    # silent now: closed after 1 * 1.5 + 1 s grace (wheel granularity 1 s)
    started = time.monotonic()
    err = await c.expect_error(ErrorCode.IDLE_TIMEOUT, timeout=6)
    assert err.fatal and 1.5 <= time.monotonic() - started <= 5
    assert await c.closed()


async def test_pings_keep_a_session_alive(cluster):
    c, _ = await connect(cluster, uid(), heartbeat_hint_s=1)
    for _ in range(6):
        await asyncio.sleep(0.6)
        c.send(Op.PING)
        await c.expect(Op.PONG)
    await c.close()


async def test_handshake_deadline(cluster):
    c = await WireClient.connect(*cluster.room_addresses[1])
    await c.expect_error(ErrorCode.HANDSHAKE_TIMEOUT, timeout=6)
    assert await c.closed()


async def test_client_that_does_not_read_is_closed_and_loses_nothing(cluster):
    user = uid()
    # a tiny receive window, and we never read: the server's write buffer has to fill
    c, _ = await connect(cluster, user, rcvbuf=4096)
    c.writer.transport.pause_reading()
    payload = "x" * 50_000
    ids = []
    closed = False
    # until its link is dropped and, after the resume grace, its session ends
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        ids += await push(cluster, [user], payload)
        status, body = await api(cluster, "GET", f"/v1/users/{user}")
        if not body["online"]:
            closed = True
            break
    assert closed, "a client that never reads must be disconnected"
    c.writer.transport.abort()
    # every message is still stored and arrives on the next connection
    c2, _ = await connect(cluster, user)
    got = []
    while len(got) < min(len(ids), 100):
        _, p = await c2.expect(Op.PUSH)
        got += [str(m.msg_id) for m in p.messages]
    assert got == ids[:len(got)]
    await c2.close()


async def test_broadcast_reaches_every_online_session_of_the_app(cluster):
    app = cluster.create_app("e2e-bc-" + uuid.uuid4().hex[:6])
    clients = [(await connect(cluster, uid(), app=app, room=i % 2))[0] for i in range(4)]
    status, body = await api(cluster, "POST", "/v1/broadcast", {"app": app["id"], "payload": "to all"},
                             key=app["api_key"])
    assert status == 200 and body["broadcast_id"].isdigit()
    for c in clients:
        _, p = await c.expect(Op.PUSH)
        assert p.messages[0].payload == b"to all" and p.messages[0].broadcast
        await c.close()


async def test_api_errors_are_json(cluster):
    status, body = await api(cluster, "POST", "/v1/push", {"app": cluster.app["id"], "uids": ["x"], "payload": "p"},
                             key="wrong-key")
    assert status == 401 and body["error"]["code"]
    status, body = await api(cluster, "POST", "/v1/push", raw=b"{not json")
    assert status == 400 and body["error"]["code"] and body["error"]["message"]
    status, body = await api(cluster, "GET", "/v1/messages/123456789")
    assert status == 404 and body["error"]["code"]


async def test_dispatcher_routes_to_live_rooms_sticky(cluster):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{cluster.dispatcher_url}/v1/route", params={"uid": "sticky-user"}) as r:
            first = (await r.json())["rooms"]
        async with s.get(f"{cluster.dispatcher_url}/v1/route", params={"uid": "sticky-user"}) as r:
            again = (await r.json())["rooms"]
    assert first == again and len(first) == 2
    assert {(x["host"], x["port"]) for x in first} == set(cluster.room_addresses)
