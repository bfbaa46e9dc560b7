"""Center HTTP API against real processes: register, saver, coordinator and center on the test Redis/MariaDB.

Runs on its own Redis database and MySQL schema so that other modules' processes and data
cannot leak into the answers (presence, stats, discovery).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sys
import time
import uuid

import aiohttp
import grpc
import pytest

from services.common import runtime, tokens
from services.common.discovery import Discovery, Instance
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing, procs
from tests.stores import own_stores

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex[:8]


def uid() -> str:
    return "cu-" + uuid.uuid4().hex[:12]


@dataclasses.dataclass
class Center:
    url: str
    common: object
    register_port: int
    procs: dict


@pytest.fixture(scope="module")
def center(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "center_api", mysql_database="pylon_center_it")
    env = procs.common_env(common, {"PYLON_CENTER_ADMIN_KEY": ADMIN_KEY})
    logs = f"{tmp}/center-it"
    h = "127.0.0.1"
    ports = {name: backing.free_port() for name in ("register", "saver", "coordinator", "center")}
    started: dict[str, procs.ServiceProcess] = {}
    try:
        for name in ("register", "saver", "coordinator"):
            started[name] = procs.start(f"{name}-cit", [name, "--host", h, "--grpc-port", str(ports[name]),
                                                        "--metrics-port", "0"], env, logs, wait_for=[(h, ports[name])])
        started["center"] = procs.start("center-cit", ["center", "--host", h, "--port", str(ports["center"])], env,
                                        logs, wait_for=[(h, ports["center"])])
        yield Center(f"http://{h}:{ports['center']}", common, ports["register"], started)
    finally:
        codes = {name: started[name].stop() for name in ("center", "coordinator", "saver", "register") if name in started}
    log = started["center"].log_text() if "center" in started else ""
    assert codes.get("center") == 0 and "Traceback" not in log, log[-4000:]


async def call(center: Center, method: str, path: str, body=None, key: str | None = None, raw: bytes | None = None,
               headers: dict | None = None):
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with aiohttp.ClientSession() as s:
        async with s.request(method, center.url + path, data=data, headers=hdrs) as r:
            text = await r.read()
            ctype = r.headers.get("Content-Type", "")
            parsed = json.loads(text) if ctype.startswith("application/json") else text
            return r.status, parsed, r.headers


def assert_error(status, body, want_status, want_code=None):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if want_code:
        assert body["error"]["code"] == want_code, body


async def new_app(center: Center, **fields) -> dict:
    status, body, _ = await call(center, "POST", "/v1/apps", {"id": "cit-" + uuid.uuid4().hex[:8], **fields},
                                 key=ADMIN_KEY)
    assert status == 201, body
    return body


@pytest.fixture(scope="module")
async def app(center):
    return await new_app(center)


@pytest.fixture(scope="module")
async def redis(center):
    client = runtime.redis_client(center.common.redis_url)
    yield client
    await client.aclose()


# ---------------------------------------------------------------- apps (admin)


async def test_admin_creates_app_once(center):
    app_id = "cit-admin-" + uuid.uuid4().hex[:6]
    status, body, _ = await call(center, "POST", "/v1/apps", {"id": app_id, "webhook_url": "http://127.0.0.1:9/h",
                                                              "status_events": True}, key=ADMIN_KEY)
    assert status == 201, body
    assert body["id"] == app_id and body["secret"] and body["api_key"].startswith("pk_")
    assert body["webhook_url"] == "http://127.0.0.1:9/h" and body["status_events"] is True
    status, err, _ = await call(center, "POST", "/v1/apps", {"id": app_id}, key=ADMIN_KEY)
    assert_error(status, err, 409, "app_exists")
    # listed and read without the secret or the API key (shown once, above); published to Redis for rooms
    status, listing, _ = await call(center, "GET", "/v1/apps", key=ADMIN_KEY)
    assert status == 200
    (mine,) = [a for a in listing["apps"] if a["id"] == app_id]
    assert "api_key" not in mine and "secret" not in mine and mine["webhook_url"] == body["webhook_url"]
    status, one, _ = await call(center, "GET", f"/v1/apps/{app_id}", key=ADMIN_KEY)
    assert status == 200 and one["id"] == app_id and "secret" not in one and "api_key" not in one
    client = runtime.redis_client(center.common.redis_url)
    try:
        published = json.loads(await client.hget("pylon:apps", app_id))
    finally:
        await client.aclose()
    assert published["secret"] == body["secret"] and published["status_events"] is True


async def test_admin_routes_reject_wrong_keys(center, app):
    status, body, _ = await call(center, "POST", "/v1/apps", {"id": "cit-nope"}, key="wrong-admin-key")
    assert_error(status, body, 401, "invalid_api_key")
    status, body, _ = await call(center, "POST", "/v1/apps", {"id": "cit-nope"})
    assert_error(status, body, 401, "missing_api_key")
    status, body, _ = await call(center, "GET", "/v1/apps", key=app["api_key"])
    assert_error(status, body, 403, "admin_required")
    status, body, _ = await call(center, "POST", "/v1/apps", {"id": "Not Valid"}, key=ADMIN_KEY)
    assert_error(status, body, 400, "bad_app_id")


async def test_update_and_rotate_key(center):
    created = await new_app(center)
    status, body, _ = await call(center, "PATCH", f"/v1/apps/{created['id']}", {"push_rate_per_s": 7}, key=ADMIN_KEY)
    assert status == 200 and body["push_rate_per_s"] == 7
    status, body, _ = await call(center, "GET", f"/v1/apps/{created['id']}", key=ADMIN_KEY)
    assert status == 200 and body["push_rate_per_s"] == 7
    status, rotated, _ = await call(center, "POST", f"/v1/apps/{created['id']}/rotate-key", key=ADMIN_KEY)
    assert status == 200 and rotated["api_key"] != created["api_key"]
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "u"}, key=rotated["api_key"])
    assert status == 200, body
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "u"}, key=created["api_key"])
    assert_error(status, body, 401, "invalid_api_key")
    status, body, _ = await call(center, "GET", "/v1/apps/cit-missing-app", key=ADMIN_KEY)
    assert_error(status, body, 404, "unknown_app")


# ---------------------------------------------------------------- tokens and auth


async def test_token_minting(center, app):
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "alice", "device_id": "dev-1", "ttl_s": 600},
                                 key=app["api_key"])
    assert status == 200, body
    claims = tokens.verify(body["token"], app["secret"])
    assert claims["sub"] == "alice" and claims["dev"] == "dev-1" and claims["app"] == app["id"]
    assert claims["exp"] == body["expires_at"] and abs(body["expires_at"] - (time.time() + 600)) < 5
    # the admin mints for any app it names
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "bob", "app": app["id"]}, key=ADMIN_KEY)
    assert status == 200 and tokens.verify(body["token"], app["secret"])["app"] == app["id"]
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "bob"}, key=ADMIN_KEY)
    assert_error(status, body, 400, "missing_app")


async def test_wrong_api_key_is_401_json(center, app):
    for key in ("pk_wrong", "x" * 500, None):
        status, body, _ = await call(center, "POST", "/v1/push", {"uids": ["u"], "payload": "p"}, key=key)
        assert_error(status, body, 401)
    status, body, _ = await call(center, "POST", "/v1/push", {"uids": ["u"], "payload": "p"},
                                 headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_error(status, body, 401, "missing_api_key")


async def test_key_of_one_app_cannot_act_for_another(center, app):
    other = await new_app(center)
    status, body, _ = await call(center, "POST", "/v1/push", {"app": other["id"], "uids": ["u"], "payload": "p"},
                                 key=app["api_key"])
    assert_error(status, body, 403, "app_forbidden")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "malformed_json"),
    (b"", "empty_body"),
    (b"[1,2,3]", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[" * 50_000, "malformed_json"),
])
async def test_malformed_json_is_400_json(center, app, raw, code):
    status, body, _ = await call(center, "POST", "/v1/push", raw=raw, key=app["api_key"])
    assert_error(status, body, 400, code)


@pytest.mark.parametrize("body, status_code, code", [
    ({"uids": "not-a-list", "payload": "p"}, 400, "bad_uids"),
    ({"uids": [], "payload": "p"}, 400, "bad_uids"),
    ({"uids": [["nested"]], "payload": "p"}, 400, "bad_uid"),
    ({"uids": ["u" * 129], "payload": "p"}, 400, "bad_uid"),
    ({"uids": [f"u{i}" for i in range(1001)], "payload": "p"}, 400, "too_many_uids"),
    ({"uids": ["u"]}, 400, "missing_payload"),
    ({"uids": ["u"], "payload_b64": "%%%"}, 400, "bad_payload_b64"),
    ({"uids": ["u"], "payload": "p", "ttl_s": -5}, 400, "bad_ttl_s"),
    ({"uids": ["u"], "payload": "p", "ttl_s": 10**9}, 400, "bad_ttl_s"),
    ({"uids": ["u"], "payload": "x" * (60 * 1024 + 1)}, 413, "payload_too_large"),
    ({"uids": ["u"], "payload_b64": base64.b64encode(b"\x00" * (60 * 1024 + 1)).decode()}, 413, "payload_too_large"),
])
async def test_bad_push_bodies(center, app, body, status_code, code):
    status, reply, _ = await call(center, "POST", "/v1/push", body, key=app["api_key"])
    assert_error(status, reply, status_code, code)


async def test_payload_at_the_limit_and_body_over_the_limit(center, app):
    status, body, _ = await call(center, "POST", "/v1/push", {"uids": [uid()], "payload": "x" * (60 * 1024)},
                                 key=app["api_key"])
    assert status == 200, body
    status, body, _ = await call(center, "POST", "/v1/push", raw=b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}',
                                 key=app["api_key"])
    assert_error(status, body, 413, "body_too_large")
    # the batch form of 1,000 messages of 3 KiB of text each fits
    status, body, _ = await call(center, "POST", "/v1/push", {"messages": [
        {"uid": f"{uid()}", "payload": "y" * 3072} for _ in range(1000)]}, key=app["api_key"])
    assert status == 200 and len(body["msg_ids"]) == 1000, body


async def test_unknown_route_and_wrong_method_are_json(center, app):
    status, body, _ = await call(center, "GET", "/v1/nothing-here", key=app["api_key"])
    assert_error(status, body, 404, "not_found")
    status, body, _ = await call(center, "GET", "/v1/push", key=app["api_key"])
    assert_error(status, body, 405, "method_not_allowed")


# ---------------------------------------------------------------- push and message state


async def test_push_to_offline_user_is_stored(center, app):
    user = uid()
    status, body, _ = await call(center, "POST", "/v1/push", {"uids": [user], "payload": "hello", "ttl_s": 300},
                                 key=app["api_key"])
    assert status == 200, body
    (msg_id,) = body["msg_ids"]
    assert isinstance(msg_id, str) and msg_id.isdigit() and int(msg_id) > 2**53
    assert body["online"] == 0 and body["delivered"] == 0
    status, state, _ = await call(center, "GET", f"/v1/messages/{msg_id}", key=app["api_key"])
    assert status == 200, state
    assert state["msg_id"] == msg_id and state["state"] == "stored" and state["uid"] == user
    assert state["app"] == app["id"] and state["attempts"] == 0 and state["acked_ms"] == 0 and state["seq"] >= 1
    assert state["expires_ms"] - state["created_ms"] == 300_000
    # the admin sees it too; another app does not
    status, _, _ = await call(center, "GET", f"/v1/messages/{msg_id}", key=ADMIN_KEY)
    assert status == 200
    other = await new_app(center)
    status, err, _ = await call(center, "GET", f"/v1/messages/{msg_id}", key=other["api_key"])
    assert_error(status, err, 404, "unknown_message")


async def test_multicast_ids_in_order_and_sequences_per_user(center, app):
    users = [uid() for _ in range(5)]
    status, body, _ = await call(center, "POST", "/v1/push",
                                 {"app": app["id"], "uids": users + [users[0]], "payload_b64": "AAEC"},
                                 key=app["api_key"])
    assert status == 200, body
    ids = body["msg_ids"]
    assert len(ids) == 6 and len(set(ids)) == 6 and [int(i) for i in ids] == sorted(int(i) for i in ids)
    states = [(await call(center, "GET", f"/v1/messages/{i}", key=app["api_key"]))[1] for i in ids]
    assert [s["uid"] for s in states] == users + [users[0]]
    assert states[5]["seq"] == states[0]["seq"] + 1


async def test_batch_form_thousand_messages_ids_in_order(center, app):
    """1,000 messages with their own uids, payloads (text and base64) and TTLs: one id each, in order."""
    users = [uid() for _ in range(10)]
    messages = []
    for i in range(1000):
        m = {"uid": users[i % 10]}
        if i % 2:
            m["payload_b64"] = base64.b64encode(i.to_bytes(2, "big") + b"\x00\xff").decode()
        else:
            m["payload"] = f"text {i} \u20ac"
        if i % 3 == 0:
            m["ttl_s"] = 100 + i
        messages.append(m)
    status, body, _ = await call(center, "POST", "/v1/push", {"app": app["id"], "messages": messages, "ttl_s": 90},
                                 key=app["api_key"])
    assert status == 200, body
    ids = body["msg_ids"]
    assert len(ids) == 1000 and len(set(ids)) == 1000 and all(isinstance(i, str) and i.isdigit() for i in ids)
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert body["online"] == 0 and body["delivered"] == 0
    for i in (0, 1, 3, 500, 998, 999):
        status, state, _ = await call(center, "GET", f"/v1/messages/{ids[i]}", key=app["api_key"])
        assert status == 200, state
        assert state["uid"] == users[i % 10] and state["state"] == "stored" and state["app"] == app["id"]
        assert state["expires_ms"] - state["created_ms"] == (100 + i if i % 3 == 0 else 90) * 1000
        # the tenth message of each user: sequences follow the order within the batch
        assert state["seq"] == i // 10 + 1


async def test_batch_form_payloads_arrive_intact(center, app, redis):
    """What the saver stored is exactly the decoded payload of each message."""
    from services.saver import keys

    user = uid()
    blobs = [b"\x00\x01binary\xff", "caf\u00e9".encode(), b""]
    status, body, _ = await call(center, "POST", "/v1/push", {"messages": [
        {"uid": user, "payload_b64": base64.b64encode(blobs[0]).decode()},
        {"uid": user, "payload": "caf\u00e9"},
        {"uid": user, "payload": ""},
    ]}, key=app["api_key"])
    assert status == 200, body
    assert len(body["msg_ids"]) == 3
    stored = await redis.zrange(keys.inbox_key(user, app["id"]), 0, -1)
    assert sorted(int(m) for m in stored) == [int(i) for i in body["msg_ids"]]
    for msg_id, blob in zip(body["msg_ids"], blobs, strict=True):
        assert await redis.hget(keys.message_key(int(msg_id)), "payload") == blob


@pytest.mark.parametrize("bad, status_code, code", [
    ({"uid": "placeholder", "payload_b64": "%%% not base64"}, 400, "bad_payload_b64"),
    ({"uid": "placeholder", "payload": "x", "payload_b64": "eA=="}, 400, "bad_payload"),
    ({"uid": "placeholder"}, 400, "missing_payload"),
    ({"payload": "no uid"}, 400, "missing_uid"),
    ({"uid": ["not", "a", "string"], "payload": "x"}, 400, "bad_uid"),
    ({"uid": "placeholder", "payload": {"nested": 1}}, 400, "bad_payload"),
    ({"uid": "placeholder", "payload": "x", "ttl_s": 0}, 400, "bad_ttl_s"),
    ("just a string", 400, "bad_message"),
    ({"uid": "placeholder", "payload": "x" * (60 * 1024 + 1)}, 413, "payload_too_large"),
])
async def test_batch_form_one_bad_message_fails_all_and_stores_nothing(center, app, redis, bad, status_code, code):
    from services.saver import keys

    users = [uid() for _ in range(30)]
    messages = [{"uid": u, "payload": "fine"} for u in users]
    if isinstance(bad, dict) and bad.get("uid") == "placeholder":
        bad = {**bad, "uid": users[17]}
    messages[17] = bad
    status, body, _ = await call(center, "POST", "/v1/push", {"messages": messages}, key=app["api_key"])
    assert status == status_code, body
    assert body["error"]["code"] == code and body["error"]["index"] == 17, body
    assert body["error"]["message"].startswith("messages[17]"), body
    for u in users:
        assert not await redis.exists(keys.inbox_key(u, app["id"]))
    # the users' sequences never moved: their first stored message is number 1
    status, body, _ = await call(center, "POST", "/v1/push", {"uids": [users[0]], "payload": "after"},
                                 key=app["api_key"])
    status, state, _ = await call(center, "GET", f"/v1/messages/{body['msg_ids'][0]}", key=app["api_key"])
    assert state["seq"] == 1, state


@pytest.mark.parametrize("body, code", [
    ({"messages": []}, "bad_messages"),
    ({"messages": "u1"}, "bad_messages"),
    ({"messages": [{"uid": f"u{i}", "payload": "p"} for i in range(1001)]}, "too_many_messages"),
    ({"messages": [{"uid": "u", "payload": "p"}], "uids": ["u"]}, "bad_push_form"),
    ({"messages": [{"uid": "u", "payload": "p"}], "payload": "top level"}, "bad_payload"),
    ({"messages": [{"uid": "u", "payload": "p"}], "ttl_s": "soon"}, "bad_ttl_s"),
])
async def test_bad_batch_forms(center, app, body, code):
    status, reply, _ = await call(center, "POST", "/v1/push", body, key=app["api_key"])
    assert_error(status, reply, 400, code)


async def test_batch_form_to_an_online_user_on_an_unreachable_room(center, app, redis):
    """Multicast rules hold for the batch form: online counts users, a dead room keeps messages stored."""
    user, other = uid(), uid()
    discovery = Discovery(redis, ttl_s=30)
    dead_room = Instance(service="room", id="room-cit-dead-batch", host="127.0.0.1", port=1, grpc="127.0.0.1:1",
                         capacity=100)
    await discovery.announce(dead_room)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{center.register_port}")
    stub = pbg.RegisterStub(channel)
    session = pb.Session(uid=user, session_id="s-" + user, instance=dead_room.id, apps=[app["id"]], device_id="d1",
                         connected_ms=int(time.time() * 1000), net="wifi")
    try:
        await stub.Register(pb.SessionBatch(sessions=[session]), timeout=5)
        status, body, _ = await call(center, "POST", "/v1/push", {"messages": [
            {"uid": user, "payload": "one"}, {"uid": other, "payload": "two"}, {"uid": user, "payload": "three"}]},
            key=app["api_key"])
        assert status == 200, body
        assert len(body["msg_ids"]) == 3 and body["online"] == 1 and body["delivered"] == 0
    finally:
        await stub.Unregister(pb.SessionBatch(sessions=[session]), timeout=5)
        await channel.close()
        await discovery.withdraw()


async def test_unknown_and_malformed_message_ids(center, app):
    status, body, _ = await call(center, "GET", "/v1/messages/123456789", key=app["api_key"])
    assert_error(status, body, 404, "unknown_message")
    for bad in ("abc", "-1", "0", "99999999999999999999999"):
        status, body, _ = await call(center, "GET", f"/v1/messages/{bad}", key=app["api_key"])
        assert_error(status, body, 400, "bad_msg_id")


async def test_push_to_online_user_whose_room_is_unreachable_still_stores(center, app, redis):
    """Register says the user is on a room instance that does not answer: the message waits in the inbox."""
    user = uid()
    discovery = Discovery(redis, ttl_s=30)
    dead_room = Instance(service="room", id="room-cit-dead", host="127.0.0.1", port=1, grpc="127.0.0.1:1",
                         capacity=100)
    await discovery.announce(dead_room)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{center.register_port}")
    stub = pbg.RegisterStub(channel)
    session = pb.Session(uid=user, session_id="s-" + user, instance=dead_room.id, apps=[app["id"]], device_id="d1",
                         connected_ms=int(time.time() * 1000), net="wifi")
    try:
        await stub.Register(pb.SessionBatch(sessions=[session]), timeout=5)
        status, body, _ = await call(center, "POST", "/v1/push", {"uids": [user], "payload": "x"}, key=app["api_key"])
        assert status == 200, body
        assert body["online"] == 1 and body["delivered"] == 0
        status, state, _ = await call(center, "GET", f"/v1/messages/{body['msg_ids'][0]}", key=app["api_key"])
        assert state["state"] == "stored"
        # presence: the app sees its session; another app sees the user offline; the admin sees all
        status, presence, _ = await call(center, "GET", f"/v1/users/{user}", key=app["api_key"])
        assert status == 200 and presence["online"] is True
        (s,) = presence["sessions"]
        assert s == {"session_id": session.session_id, "instance": dead_room.id, "apps": [app["id"]],
                     "device_id": "d1", "connected_ms": session.connected_ms, "net": "wifi"}
        other = await new_app(center)
        status, presence, _ = await call(center, "GET", f"/v1/users/{user}", key=other["api_key"])
        assert status == 200 and presence == {"uid": user, "online": False, "sessions": []}
        status, presence, _ = await call(center, "GET", f"/v1/users/{user}", key=ADMIN_KEY)
        assert presence["online"] is True
        # broadcast: a sub-task is queued for the dead room too (retried until it leaves discovery)
        status, bc, _ = await call(center, "POST", "/v1/broadcast", {"payload": "all"}, key=app["api_key"])
        assert status == 200 and bc["broadcast_id"].isdigit() and bc["subtasks"] >= 1
    finally:
        await stub.Unregister(pb.SessionBatch(sessions=[session]), timeout=5)
        await channel.close()
        await discovery.withdraw()


async def test_presence_of_offline_user(center, app):
    user = uid()
    status, body, _ = await call(center, "GET", f"/v1/users/{user}", key=app["api_key"])
    assert status == 200 and body == {"uid": user, "online": False, "sessions": []}
    status, body, _ = await call(center, "GET", "/v1/users/" + "u" * 129, key=app["api_key"])
    assert_error(status, body, 400, "bad_uid")


async def test_kick_offline_user(center, app):
    status, body, _ = await call(center, "POST", f"/v1/users/{uid()}/kick", {"reason": "bye"}, key=app["api_key"])
    assert status == 200 and body == {"kicked": 0}
    status, body, _ = await call(center, "POST", f"/v1/users/{uid()}/kick", key=app["api_key"])
    assert status == 200 and body == {"kicked": 0}
    status, body, _ = await call(center, "POST", f"/v1/users/{uid()}/kick", {"app": "cit-unknown"}, key=ADMIN_KEY)
    assert_error(status, body, 404, "unknown_app")


async def test_broadcast_with_no_rooms(center, app):
    status, body, _ = await call(center, "POST", "/v1/broadcast", {"payload": "all", "ttl_s": 60}, key=app["api_key"])
    assert status == 200, body
    assert body["broadcast_id"].isdigit() and body["subtasks"] == 0
    # no room instance to write it: done at once (users get it from the inbox load when they connect)
    status, progress, _ = await call(center, "GET", f"/v1/broadcasts/{body['broadcast_id']}", key=app["api_key"])
    assert status == 200 and progress["state"] == "done" and progress["subtasks_total"] == 0, progress


async def test_rate_limit_is_429_with_retry_after(center):
    limited = await new_app(center, push_rate_per_s=2)
    statuses = []
    for _ in range(4):
        status, body, headers = await call(center, "POST", "/v1/push", {"uids": [uid()], "payload": "p"},
                                           key=limited["api_key"])
        statuses.append(status)
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    assert_error(status, body, 429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1


# ---------------------------------------------------------------- ops


async def test_stats(center, app):
    status, body, _ = await call(center, "GET", "/v1/stats", key=app["api_key"])
    assert status == 200, body
    assert body["instances"]["saver"] >= 1 and body["instances"]["register"] >= 1 and body["instances"]["center"] == 1
    assert body["rooms"]["count"] == 0 and body["counters"]["pushes"] >= 1 and body["counters"]["messages"] >= 1
    assert body["center"]["processes"] == 1 and body["center"]["pid"] == center.procs["center"].pid
    status, body, _ = await call(center, "GET", "/v1/stats")
    assert_error(status, body, 401)


async def test_health_metrics_dashboard(center):
    status, body, _ = await call(center, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["center"].startswith("center-")
    assert body["pid"] == center.procs["center"].pid
    status, text, _ = await call(center, "GET", "/metrics")
    assert status == 200
    assert b'pylon_center_http_requests_total{method="POST",route="/v1/push",status="200"}' in text
    assert b"pylon_center_push_seconds_bucket" in text and b"pylon_center_rate_limited_total" in text
    status, html, headers = await call(center, "GET", "/dashboard")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/v1/admin/overview" in html and b"<script src" not in html and b"<link" not in html


async def test_openapi_lists_every_route(center):
    status, doc, _ = await call(center, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    expected = {
        ("/healthz", "get"), ("/metrics", "get"), ("/openapi.json", "get"), ("/dashboard", "get"),
        ("/v1/tokens", "post"), ("/v1/push", "post"), ("/v1/broadcast", "post"), ("/v1/messages/{id}", "get"),
        ("/v1/users/{uid}", "get"), ("/v1/users/{uid}/kick", "post"), ("/v1/stats", "get"), ("/v1/apps", "post"),
        ("/v1/admin/overview", "get"), ("/v1/broadcasts/{id}", "get"), ("/v1/admin/broadcasts", "get"),
        ("/v1/apps/{id}/rotate-secret", "post"),
        ("/v1/apps", "get"), ("/v1/apps/{id}", "get"), ("/v1/apps/{id}", "patch"), ("/v1/apps/{id}/rotate-key", "post"),
        ("/v1/admin/parked", "get"), ("/v1/admin/parked/requeue", "post"), ("/v1/admin/users/{uid}", "get"),
        ("/v1/admin/rooms/{instance}/drain", "post"),
    }
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert documented == expected
    for path, method in expected:
        op = doc["paths"][path][method]
        assert op["responses"] and op["summary"]


async def test_admin_cli_creates_and_lists(center):
    env = procs.common_env(center.common)
    app_id = "cit-cli-" + uuid.uuid4().hex[:6]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "app", "create", app_id, "--webhook", "https://h.example/x",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    created = json.loads(out)
    assert created["id"] == app_id and created["api_key"] and created["webhook_url"] == "https://h.example/x"
    # the running center accepts the new key at once
    status, body, _ = await call(center, "POST", "/v1/tokens", {"uid": "u"}, key=created["api_key"])
    assert status == 200, body
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "app", "create", app_id,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"app_exists" in err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "app", "list",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert app_id in {a["id"] for a in json.loads(out)["apps"]}


async def test_saver_down_is_503_then_recovers(center, app):
    """Last in the module: stops the saver, then brings a new one up."""
    saver = center.procs["saver"]
    saver.stop()
    status, body, _ = await call(center, "POST", "/v1/push", {"uids": [uid()], "payload": "p"}, key=app["api_key"])
    assert_error(status, body, 503, "backend_unavailable")
    status, body, _ = await call(center, "GET", "/v1/messages/123456789", key=app["api_key"])
    assert_error(status, body, 503, "backend_unavailable")
    port = backing.free_port()
    env = procs.common_env(center.common, {"PYLON_CENTER_ADMIN_KEY": ADMIN_KEY})
    center.procs["saver"] = procs.start("saver-cit-2", ["saver", "--host", "127.0.0.1", "--grpc-port", str(port),
                                                         "--metrics-port", "0"], env, saver.log_path.rsplit("/", 1)[0],
                                        wait_for=[("127.0.0.1", port)])
    deadline = time.monotonic() + 10
    while True:
        status, body, _ = await call(center, "POST", "/v1/push", {"uids": [uid()], "payload": "p"}, key=app["api_key"])
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200, body


# ---------------------------------------------------------------- batch form through the whole system


async def test_batch_form_reaches_online_clients_in_order_and_ends_acked(cluster):
    """The session-wide system (rooms, SDK-level wire clients): each online user gets exactly its
    messages of the batch, payloads intact and in order; acks end them acked; the offline one waits."""
    from services.common.codec import Op
    from services.common.pb import client_pb2 as cpb
    from tests.wire_client import WireClient

    app = cluster.app
    alice, bob, away = uid(), uid(), uid()
    clients = {}
    for i, user in enumerate((alice, bob)):
        token, _ = tokens.sign(app["secret"], user, app["id"], 300, device_id="dev1")
        host, port = cluster.room_addresses[i % len(cluster.room_addresses)]
        clients[user] = await WireClient.connect(host, port)
        await clients[user].auth(token, user, device_id="dev1", net="wifi")
    messages, expected = [], {alice: [], bob: [], away: []}
    for i in range(60):
        user = (alice, bob, away)[i % 3]
        blob = f"m{i}".encode() + bytes([i])
        messages.append({"uid": user, "payload_b64": base64.b64encode(blob).decode()} if i % 2 else
                        {"uid": user, "payload": blob.decode("latin-1")})
        expected[user].append(blob if i % 2 else blob.decode("latin-1").encode())
    center = Center(cluster.center_url, None, 0, {})
    status, body, _ = await call(center, "POST", "/v1/push", {"app": app["id"], "messages": messages, "ttl_s": 300},
                                 key=app["api_key"])
    assert status == 200, body
    ids = body["msg_ids"]
    assert len(ids) == 60 and body["online"] == 2
    try:
        for user in (alice, bob):
            got = []
            while len(got) < 20:
                _, push_frame = await clients[user].expect(Op.PUSH)
                got += list(push_frame.messages)
            assert [m.payload for m in got] == expected[user]
            assert [str(m.msg_id) for m in got] == ids[(alice, bob).index(user)::3]
            assert [m.seq for m in got] == sorted(m.seq for m in got)
            clients[user].send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in got]))
        deadline = time.monotonic() + 10
        for i, msg_id in enumerate(ids):
            want = "stored" if i % 3 == 2 else "acked"
            while True:
                status, state, _ = await call(center, "GET", f"/v1/messages/{msg_id}", key=app["api_key"])
                if state.get("state") == want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert state["state"] == want, (i, state)
    finally:
        for c in clients.values():
            await c.close()
