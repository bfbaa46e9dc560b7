"""The operator routes against a real system: parked messages listed and requeued, a user's whole
state, a room instance drained on request, the audit lines, the CLI, and bad input.

The system is this module's own (its own redis-server, its own MariaDB database): saver parks a
message at its 2nd delivery here (PYLON_SAVER_MAX_ATTEMPTS=2), and a drain must not touch the
session-wide cluster's rooms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid

import pymysql
import pytest
import redis

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from services.launcher import backing, procs
from services.launcher.cluster import LocalCluster, Ports
from tests.integration.conftest import TEST_ENV
from tests.integration.test_e2e import api, connect, push
from tests.wire_client import WireClient

MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def system(backing_stores):
    common, tmp = backing_stores
    base = os.path.join(tmp, "admin-api")
    port = backing.free_port()
    own_redis = backing.start_redis(os.path.join(base, "redis"), port)
    common = dataclasses.replace(common, redis_url=f"redis://127.0.0.1:{port}/0", mysql_database="pylon_admin_it")
    c = LocalCluster(base, Ports.free(2), room_instances=2, common=common,
                     env={**TEST_ENV, "PYLON_SAVER_MAX_ATTEMPTS": str(MAX_ATTEMPTS)})
    try:
        c.start()
        c.create_demo_app()
        yield c
    finally:
        c.stop()
        own_redis.stop()
    for name in ("center", "saver", "room"):
        log = c.services[name].log_text() if name in c.services else ""
        assert "Traceback" not in log, log[-4000:]


def uid() -> str:
    return "adm-" + uuid.uuid4().hex[:10]


async def admin(system, method, path, body=None):
    return await api(system, method, path, body, key=system.admin_key)


async def until(what: str, check, timeout: float = 15.0):
    """Poll ``check()`` (a coroutine function) until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


async def state_of(system, msg_id, app=None) -> dict:
    status, body = await api(system, "GET", f"/v1/messages/{msg_id}", key=(app or system.app)["api_key"])
    assert status == 200, body
    return body


async def park(system, user: str, payloads: list[str]) -> list[str]:
    """Store messages for ``user`` and get them delivered MAX_ATTEMPTS times without an ack: parked."""
    ids = await push(system, [user], payloads[0]) if len(payloads) == 1 else [
        i for p in payloads for i in await push(system, [user], p)]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        c, _ = await connect(system, user)
        got: list[str] = []
        while len(got) < len(ids):
            _, p = await c.expect(Op.PUSH)
            got += [str(m.msg_id) for m in p.messages if not m.broadcast]
        assert sorted(got) == sorted(ids)
        want = "parked" if attempt == MAX_ATTEMPTS else "delivered"

        async def counted(want=want, attempt=attempt):
            states = [await state_of(system, i) for i in ids]
            return all(s["state"] == want and s["attempts"] == attempt for s in states)

        await until(f"attempt {attempt} counted", counted)
        await c.close()
    return ids


def center_log(system) -> str:
    return system.services["center"].log_text()


async def test_a_never_acked_message_is_parked_listed_requeued_delivered_and_acked(system):
    user = uid()
    (msg_id,) = await park(system, user, ["poison?"])
    app = system.app["id"]

    status, body = await admin(system, "GET", f"/v1/admin/parked?app={app}&uid={user}")
    assert status == 200, body
    assert [m["msg_id"] for m in body["messages"]] == [msg_id] and body["next"] is None
    (listed,) = body["messages"]
    assert listed["uid"] == user and listed["app"] == app and listed["attempts"] == MAX_ATTEMPTS
    assert "payload" not in listed and "payload_b64" not in listed

    # parked: a new login gets nothing; it stays connected to receive the requeued message
    c, _ = await connect(system, user, room=1)
    with pytest.raises(asyncio.TimeoutError):
        await c.recv(timeout=0.5)
    seq = (await state_of(system, msg_id))["seq"]

    unknown = "123456789"
    status, body = await admin(system, "POST", "/v1/admin/parked/requeue", {"msg_ids": [msg_id, unknown]})
    assert status == 200, body
    assert body == {"requeued": [msg_id], "skipped": [unknown]}
    _, p = await c.expect(Op.PUSH)
    (m,) = p.messages
    assert str(m.msg_id) == msg_id and m.payload == b"poison?" and m.seq == seq
    state = await until("delivered again", lambda: _state_is(system, msg_id, "delivered"))
    assert state["attempts"] == 1  # counted afresh
    c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id]))
    await until("acked", lambda: _state_is(system, msg_id, "acked"))
    await c.close()

    # not parked any more: a second requeue skips it; the listing no longer has it
    status, body = await admin(system, "POST", "/v1/admin/parked/requeue", {"msg_ids": [msg_id]})
    assert status == 200 and body == {"requeued": [], "skipped": [msg_id]}, body
    status, body = await admin(system, "GET", f"/v1/admin/parked?uid={user}")
    assert status == 200 and body["messages"] == [], body
    assert "audit actor=admin action=requeue msg_ids=2 requeued=1 skipped=1" in center_log(system)


async def _state_is(system, msg_id, want, app=None):
    s = await state_of(system, msg_id, app)
    return s if s["state"] == want else None


async def test_a_requeue_whose_redis_step_failed_is_finished_by_asking_again(system):
    user = uid()
    ids = await park(system, user, ["a", "b"])
    # what a requeue leaves when Redis failed after the MySQL commit: rows stored with 0 attempts,
    # Redis records still parked and out of the inbox
    conn = pymysql.connect(host=system.common.mysql_host, port=system.common.mysql_port, user=system.common.mysql_user,
                           password=system.common.mysql_password, database=system.common.mysql_database)
    try:
        with conn.cursor() as cur:
            cur.execute(f"UPDATE messages SET state=0, attempts=0 WHERE msg_id={int(ids[0])}")
        conn.commit()
    finally:
        conn.close()
    fresh = (await push(system, [user], "never parked"))[0]
    status, body = await admin(system, "POST", "/v1/admin/parked/requeue", {"msg_ids": [*ids, fresh]})
    assert status == 200, body
    # both come back; a message that was never parked is not touched (and reported skipped)
    assert sorted(body["requeued"]) == sorted(ids) and body["skipped"] == [fresh], body
    c, _ = await connect(system, user)
    got = []
    while len(got) < 3:
        _, p = await c.expect(Op.PUSH)
        got += [m for m in p.messages if not m.broadcast]
    assert sorted(str(m.msg_id) for m in got) == sorted([*ids, fresh])
    c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in got]))
    for i in [*ids, fresh]:
        await until("acked", lambda i=i: _state_is(system, i, "acked"))
    await c.close()


async def test_parked_pages_and_requeue_of_a_users_parked_messages_for_the_next_login(system):
    user = uid()
    ids = await park(system, user, ["one", "two", "three"])
    seen, after, pages = [], None, 0
    while True:
        path = f"/v1/admin/parked?uid={user}&limit=1" + (f"&after={after}" if after else "")
        status, body = await admin(system, "GET", path)
        assert status == 200, body
        seen += [m["msg_id"] for m in body["messages"]]
        after, pages = body["next"], pages + 1
        if after is None:
            break
        assert pages < 10
    assert seen == sorted(ids, key=int) and pages == 3

    # the whole user's parked messages at once, while it is offline: stored, delivered at login
    status, body = await admin(system, "POST", "/v1/admin/parked/requeue", {"app": system.app["id"], "uid": user})
    assert status == 200 and sorted(body["requeued"]) == sorted(ids) and body["skipped"] == [], body
    for i in ids:
        s = await state_of(system, i)
        assert s["state"] == "stored" and s["attempts"] == 0, s
    c, _ = await connect(system, user)
    got = []
    while len(got) < 3:
        _, p = await c.expect(Op.PUSH)
        got += [m for m in p.messages]
    assert [str(m.msg_id) for m in got] == sorted(ids, key=int)
    c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in got]))
    for i in ids:
        await until("acked", lambda i=i: _state_is(system, i, "acked"))
    await c.close()
    assert f'action=requeue app={system.app["id"]} uid={user} limit=1000 requeued=3 skipped=0' in center_log(system)


async def test_user_inspection_shows_sessions_inbox_and_broadcast_position(system):
    # an app of its own: its live broadcasts reach no other test's logins
    created = system.create_app(f"adm-bc-{uuid.uuid4().hex[:6]}")
    own = {"id": created["id"], "secret": created["secret"], "api_key": created["api_key"]}
    app = own["id"]
    user = uid()
    c, ok = await connect(system, user, app=own)
    ids = await push(system, [user], "first", app=own) + await push(system, [user], "second", app=own)
    for _ in ids:
        await c.expect(Op.PUSH)
    for i in ids:
        await until("delivered", lambda i=i: _state_is(system, i, "delivered", own))
    bids = []
    for text in ("news 1", "news 2"):
        status, body = await api(system, "POST", "/v1/broadcast", {"app": app, "payload": text}, key=own["api_key"])
        assert status == 200, body
        bids.append(body["broadcast_id"])
        _, p = await c.expect(Op.PUSH, timeout=10)
        assert p.messages[0].broadcast and str(p.messages[0].msg_id) == body["broadcast_id"]
    c.send(Op.ACK, cpb.Ack(msg_ids=[int(bids[0])]))  # the first broadcast only

    async def inspected():
        status, body = await admin(system, "GET", f"/v1/admin/users/{user}?app={app}")
        assert status == 200, body
        (box,) = body["inboxes"]
        acked = {b["broadcast_id"]: b["acked"] for b in box["broadcasts"]}
        return body if acked == {bids[0]: True, bids[1]: False} else None

    body = await until("broadcast ack recorded", inspected)
    assert body["uid"] == user and body["online"] is True
    (session,) = body["sessions"]
    assert session["session_id"] == ok.session_id and app in session["apps"]
    (box,) = body["inboxes"]
    assert box["app"] == app and box["pending"] == 2 and box["broadcasts_acked"] == 1
    assert [(m["msg_id"], m["state"], m["attempts"]) for m in box["messages"]] == [(i, "delivered", 1) for i in ids]
    assert all("payload_b64" not in m for m in box["messages"])

    # payloads on request; without ?app= the user's apps are found (its session's)
    status, body = await admin(system, "GET", f"/v1/admin/users/{user}?payload=true&limit=1")
    assert status == 200, body
    (box,) = [b for b in body["inboxes"] if b["app"] == app]
    assert box["pending"] == 2 and [m["payload_b64"] for m in box["messages"]] == ["Zmlyc3Q="]  # "first"
    await c.close()

    status, body = await admin(system, "GET", f"/v1/admin/users/{uid()}")
    assert status == 200 and body["online"] is False and body["sessions"] == [] and body["inboxes"] == [], body


async def test_admin_actions_are_audited_with_the_acting_key(system):
    other = f"adm-app-{uuid.uuid4().hex[:6]}"
    created = system.create_app(other)
    status, body = await admin(system, "PATCH", f"/v1/apps/{other}", {"push_rate_per_s": 50})
    assert status == 200, body
    status, body = await admin(system, "POST", f"/v1/apps/{other}/rotate-key", {"grace_s": 60})
    assert status == 200, body
    new_key = body["api_key"]
    status, body = await admin(system, "POST", f"/v1/apps/{other}/rotate-secret", {})
    assert status == 200, body
    user = uid()
    c, _ = await connect(system, user)
    status, body = await api(system, "POST", f"/v1/users/{user}/kick", {"reason": "bye now"})  # the demo app's key
    assert status == 200 and body["kicked"] == 1, body
    await c.close()

    def lines():
        return [line for line in center_log(system).splitlines() if " audit " in line or line.startswith("audit ")]

    text = "\n".join(lines())
    assert f"audit actor=admin action=app_create app={other}" in text
    assert f"audit actor=admin action=app_update app={other} fields=push_rate_per_s" in text
    assert f"audit actor=admin action=rotate_key app={other} grace_s=60" in text
    assert f"audit actor=admin action=rotate_secret app={other} overlap_s=0" in text
    # an app's key is named by its app, a free-text reason is quoted
    assert (f'audit actor={system.app["id"]} action=kick uid={user} app={system.app["id"]} reason="bye now" kicked=1'
            in text)
    status, body = await admin(system, "POST", "/v1/broadcast", {"app": other, "payload": "from the operator"})
    assert status == 200, body
    assert f"audit actor=admin action=broadcast app={other} broadcast_id={body['broadcast_id']}" in center_log(system)
    log = center_log(system)
    for secret in (system.admin_key, system.app["api_key"], created["api_key"], new_key):
        assert secret not in log


async def test_bad_input_is_a_json_4xx(system):
    app = system.app["id"]
    cases = [
        ("GET", "/v1/admin/parked?limit=0", None, 400, "bad_limit"),
        ("GET", "/v1/admin/parked?limit=abc", None, 400, "bad_limit"),
        ("GET", "/v1/admin/parked?after=nonsense", None, 400, "bad_after"),
        ("GET", "/v1/admin/parked?after=demo:-1", None, 400, "bad_after"),
        ("GET", "/v1/admin/parked?app=NOT_AN_APP", None, 400, "bad_app"),
        ("GET", "/v1/admin/parked?app=no-such-app", None, 404, "unknown_app"),
        ("GET", "/v1/admin/parked?uid=" + "x" * 200, None, 400, "bad_uid"),
        ("POST", "/v1/admin/parked/requeue", {}, 400, "missing_msg_ids"),
        ("POST", "/v1/admin/parked/requeue", {"msg_ids": []}, 400, "bad_msg_ids"),
        ("POST", "/v1/admin/parked/requeue", {"msg_ids": ["12x"]}, 400, "bad_msg_id"),
        ("POST", "/v1/admin/parked/requeue", {"msg_ids": [True]}, 400, "bad_msg_id"),
        ("POST", "/v1/admin/parked/requeue", {"msg_ids": ["1"] * 1001}, 400, "too_many_msg_ids"),
        ("POST", "/v1/admin/parked/requeue", {"msg_ids": ["1"], "app": app}, 400, "bad_requeue_form"),
        ("POST", "/v1/admin/parked/requeue", {"app": app, "limit": 0}, 400, "bad_limit"),
        ("POST", "/v1/admin/parked/requeue", {"app": "no-such-app"}, 404, "unknown_app"),
        ("GET", "/v1/admin/users/someone?payload=maybe", None, 400, "bad_payload"),
        ("GET", "/v1/admin/users/someone?limit=1001", None, 400, "bad_limit"),
        ("POST", "/v1/admin/rooms/room-nowhere:1/drain", None, 404, "unknown_instance"),
        ("POST", "/v1/admin/rooms/room-nowhere:1/drain", {"restart": "yes"}, 400, "bad_restart"),
    ]
    for method, path, body, want_status, want_code in cases:
        status, answer = await admin(system, method, path, body)
        assert (status, answer.get("error", {}).get("code")) == (want_status, want_code), (method, path, answer)
        assert answer["error"]["message"]
    status, answer = await api(system, "POST", "/v1/admin/parked/requeue", raw=b"{nope", key=system.admin_key)
    assert status == 400 and answer["error"]["code"] == "malformed_json", answer
    # the app's key (403) and a key nobody has (401)
    for key, want in ((system.app["api_key"], 403), ("pk_nothing", 401)):
        for method, path in (("GET", "/v1/admin/parked"), ("POST", "/v1/admin/parked/requeue"),
                             ("GET", "/v1/admin/users/someone"), ("POST", "/v1/admin/rooms/x/drain")):
            status, answer = await api(system, method, path, {"msg_ids": ["1"]}, key=key)
            assert status == want and answer["error"]["code"], (key, method, path, answer)


def _run_cli(system, local: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "admin", *argv, "--local", local],
                          capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))


async def test_cli_lists_requeues_and_inspects(system, tmp_path):
    local = str(tmp_path / "local.json")
    system.write_local_json(local)
    user = uid()
    (msg_id,) = await park(system, user, ["cli"])
    out = await asyncio.to_thread(_run_cli, system, local, "parked", "--uid", user)
    assert out.returncode == 0, out.stderr
    assert msg_id in out.stdout and user in out.stdout
    out = await asyncio.to_thread(_run_cli, system, local, "parked", "--uid", user, "--json")
    assert [m["msg_id"] for m in json.loads(out.stdout)["messages"]] == [msg_id]
    out = await asyncio.to_thread(_run_cli, system, local, "requeue", msg_id)
    assert out.returncode == 0 and f"requeued 1: {msg_id}" in out.stdout, out.stderr
    out = await asyncio.to_thread(_run_cli, system, local, "user", user, "--json")
    assert out.returncode == 0, out.stderr
    (box,) = json.loads(out.stdout)["inboxes"]
    assert [(m["msg_id"], m["state"]) for m in box["messages"]] == [(msg_id, "stored")]
    out = await asyncio.to_thread(_run_cli, system, local, "user", user)
    assert out.returncode == 0 and f"user {user}: " in out.stdout and msg_id in out.stdout, out.stderr
    odd = f"odd/{uid()}?#"  # path characters in a uid travel as one segment
    out = await asyncio.to_thread(_run_cli, system, local, "user", odd)
    assert out.returncode == 0 and f"user {odd}: offline" in out.stdout, out.stderr
    out = await asyncio.to_thread(_run_cli, system, local, "drain", "room-nowhere:1")
    assert out.returncode == 1 and "unknown_instance" in out.stderr and "Traceback" not in out.stderr
    out = await asyncio.to_thread(_run_cli, system, str(tmp_path / "missing.json"), "parked")
    assert out.returncode == 1 and "not found" in out.stderr


def discovered(system) -> dict[str, dict]:
    client = redis.Redis.from_url(system.common.redis_url)
    try:
        now = int(time.time() * 1000)
        live = {m.decode() for m in client.zrangebyscore("pylon:disc:room", now, "+inf")}
        info = client.hgetall("pylon:discinfo:room")
        return {k.decode(): json.loads(v) for k, v in info.items() if k.decode() in live}
    finally:
        client.close()


async def test_drain_moves_the_clients_and_the_instance_comes_back_without_counting_a_crash(system):
    first, second = (f"{h}:{p}" for h, p in system.room_addresses)
    by_addr = {f"{r['host']}:{r['port']}": r for r in discovered(system).values()}
    target, other = by_addr[first], by_addr[second]
    users = [uid() for _ in range(3)]
    clients = [await connect(system, u, room=0) for u in users]
    (msg_id,) = await push(system, [users[0]], "held while draining")
    await clients[0][0].expect(Op.PUSH)

    status, body = await admin(system, "POST", f"/v1/admin/rooms/{target['id']}/drain", {})
    assert status == 200, body
    assert body == {"instance": target["id"], "sessions": 3, "restart": True, "already_draining": False}
    moved = []
    for (c, ok), u in zip(clients, users, strict=True):
        _, cmd = await c.expect(Op.COMMAND, timeout=10)
        assert cmd.kind == "RECONNECT" and list(cmd.addresses) == [second], cmd
        assert await c.closed()
        host, port = second.rsplit(":", 1)
        c2 = await WireClient.connect(host, int(port))
        token, _ = tokens.sign(system.app["secret"], u, system.app["id"], 300, device_id="dev1")
        ok2 = await c2.auth(token, u, device_id="dev1", net="wifi", resume_token=ok.resume_token)
        assert ok2.resumed, "the session moved with its client"
        moved.append(c2)
    # the unacked message came along with the session and is acked on the new instance
    _, p = await moved[0].expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == [msg_id]
    moved[0].send(Op.ACK, cpb.Ack(msg_ids=[int(msg_id)]))
    await until("acked", lambda: _state_is(system, msg_id, "acked"))
    status, body = await admin(system, "GET", f"/v1/users/{users[1]}")
    assert status == 200 and [s["instance"] for s in body["sessions"]] == [other["id"]], body

    # a fresh process on the same ports, started at once: not a death, no restart counted
    room_log = system.services["room"]

    def back():
        now = discovered(system).get(target["id"])
        return now if now and now["started_ms"] > target["started_ms"] else None

    fresh = await until("the drained instance is back", lambda: asyncio.to_thread(back), timeout=40)
    log = room_log.log_text()
    assert "drained on request; starting a fresh one" in log and "started again after its drain" in log
    assert "starting it again in" not in log and "Traceback" not in log
    assert f"audit actor=admin action=drain instance={target['id']} restart=true sessions=3" in center_log(system)
    metrics = await asyncio.to_thread(_metrics, fresh["metrics"])
    assert "pylon_room_instance_restarts 0.0" in metrics
    for c in moved:
        await c.close()


def _metrics(address: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_drain_without_restart_leaves_the_slot_empty(system):
    # the module's last test: one room instance fewer afterwards
    host, port = system.room_addresses[1]
    second = f"{host}:{port}"
    target = next(r for r in discovered(system).values() if f"{r['host']}:{r['port']}" == second)
    status, body = await admin(system, "POST", f"/v1/admin/rooms/{target['id']}/drain", {"restart": False})
    assert status == 200 and body["restart"] is False and body["already_draining"] is False, body
    room = system.services["room"]
    await until("the drained instance exits", lambda: asyncio.to_thread(
        lambda: "drained on request; its slot stays empty" in room.log_text()), timeout=40)
    assert target["id"] not in discovered(system)
    assert len(procs.children(room.pid)) == 1 and room.alive()
    assert "starting it again in" not in room.log_text()
    assert f"action=drain instance={target['id']} restart=false" in center_log(system)
