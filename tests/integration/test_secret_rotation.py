"""Rotating an app's signing secret and API key against a real center and room.

- secret: a token signed with the old secret logs in during the overlap and is refused
  (BAD_TOKEN) once it ends, never before; a token signed with the new one logs in.
- API key: the old key works during its grace period and is 401 once it ends, never before;
  without a grace period it stops at once; a key before the one replaced stops at once.
- secrets and keys are shown at create and rotate only: no listing or read carries them.
- ``pylon app rotate-key --grace`` and ``rotate-secret --overlap`` do the same from the CLI.

Waiting for a window to end is bounded polling; the check that the refusal did not come early
compares with the window's end (same machine, same clock), so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from services.common import runtime, tokens
from services.common.apps import App
from services.common.codec import ErrorCode, Op
from services.common.pb import client_pb2 as cpb
from services.launcher import procs
from services.launcher.cluster import LocalCluster, Ports
from tests.stores import own_stores
from tests.wire_client import WireClient


@pytest.fixture(scope="module")
def system(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "secret_rotation", mysql_database="pylon_secret_rotation")
    c = LocalCluster(os.path.join(tmp, "secret-rotation"), Ports.free(1), room_instances=1, common=common,
                     env={"PYLON_LOG_LEVEL": "INFO", "PYLON_ROOM_APP_REFRESH_S": "0.3"})
    c.start()
    try:
        yield c
    finally:
        c.stop()
    for name in ("center", "room"):
        log = c.services[name].log_text() if name in c.services else ""
        assert "Traceback" not in log, log[-4000:]


def api(system: LocalCluster, method: str, path: str, body=None, key: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(system.center_url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key or system.admin_key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw), raw
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw), raw


def new_app(system: LocalCluster) -> dict:
    status, body, _ = api(system, "POST", "/v1/apps", {"id": "rot-" + uuid.uuid4().hex[:8]})
    assert status == 201, body
    assert body["secret"] and body["api_key"].startswith("pk_")
    return body


async def login(system: LocalCluster, token: str, uid: str) -> int:
    """0 if the room accepts the token, else the ERROR code it answered."""
    host, port = system.room_addresses[0]
    client = await WireClient.connect(host, port)
    try:
        client.send(Op.AUTH, cpb.Auth(token=token, uid=uid))
        frame, body = await client.recv(timeout=10)
        if frame.op == Op.AUTH_OK:
            return 0
        assert frame.op == Op.ERROR, frame
        return body.code
    finally:
        await client.close()


async def until_login(system, token: str, uid: str, want: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := await login(system, token, uid)) != want:
        assert time.monotonic() < deadline, f"login answered {got}, expected {want}"
        await asyncio.sleep(0.1)


def sign(secret: str, app: dict, uid: str) -> str:
    return tokens.sign(secret, uid, app["id"], 3600)[0]


async def test_old_secret_logs_in_during_the_overlap_and_new_tokens_from_the_start(system):
    app = new_app(system)
    old_token = sign(app["secret"], app, "alice")
    assert await login(system, old_token, "alice") == 0
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-secret", {"overlap_s": 600})
    assert status == 200 and rotated["id"] == app["id"], rotated
    assert rotated["secret"] != app["secret"] and rotated["previous_secret_until"] >= time.time() + 590
    # the room has the new secret once a token signed with it logs in; the old one still does
    await until_login(system, sign(rotated["secret"], app, "alice"), "alice", 0)
    assert await login(system, old_token, "alice") == 0
    # center mints with the new secret at once
    status, minted, _ = api(system, "POST", "/v1/tokens", {"uid": "bob"}, key=app["api_key"])
    assert status == 200 and tokens.verify(minted["token"], rotated["secret"])["sub"] == "bob"
    # a second rotation drops the first secret at once (only one previous secret is kept)
    status, again, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-secret", {"overlap_s": 600})
    assert status == 200
    await until_login(system, old_token, "alice", ErrorCode.BAD_TOKEN)
    assert await login(system, sign(rotated["secret"], app, "alice"), "alice") == 0
    assert await login(system, sign(again["secret"], app, "alice"), "alice") == 0


async def test_old_secret_is_refused_once_the_overlap_ends_and_not_before(system):
    app = new_app(system)
    old_token = sign(app["secret"], app, "carol")
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-secret", {"overlap_s": 2})
    assert status == 200
    until = rotated["previous_secret_until"]
    await until_login(system, sign(rotated["secret"], app, "carol"), "carol", 0)
    await until_login(system, old_token, "carol", ErrorCode.BAD_TOKEN)
    assert time.time() >= until, "the old secret was refused before its overlap ended"


async def test_rotation_without_overlap_refuses_the_old_secret(system):
    app = new_app(system)
    old_token = sign(app["secret"], app, "dave")
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-secret")  # no body: no overlap
    assert status == 200 and rotated["previous_secret_until"] == 0
    await until_login(system, old_token, "dave", ErrorCode.BAD_TOKEN)
    assert await login(system, sign(rotated["secret"], app, "dave"), "dave") == 0


def test_old_api_key_works_during_its_grace_then_401(system):
    app = new_app(system)
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-key", {"grace_s": 600})
    assert status == 200 and rotated["api_key"] != app["api_key"] and rotated["previous_key_until"] > time.time()
    for key in (app["api_key"], rotated["api_key"]):
        status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=key)
        assert status == 200, body
    # the next rotation ends the first key's grace at once; the second key gets its own
    status, third, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-key", {"grace_s": 2})
    assert status == 200
    status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=app["api_key"])
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    deadline = time.monotonic() + 20
    while True:
        status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=rotated["api_key"])
        if status == 401:
            break
        assert status == 200 and time.monotonic() < deadline, body
        time.sleep(0.1)
    assert time.time() >= third["previous_key_until"], "the old key was refused before its grace ended"
    assert body["error"]["code"] == "invalid_api_key"
    status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=third["api_key"])
    assert status == 200, body


def test_key_rotation_without_grace_cuts_the_old_key_off(system):
    app = new_app(system)
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-key")
    assert status == 200 and rotated["previous_key_until"] == 0
    status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=app["api_key"])
    assert status == 401, body


@pytest.mark.parametrize("route,body", [
    ("rotate-key", {"grace_s": -1}), ("rotate-key", {"grace_s": "60"}), ("rotate-key", {"grace_s": 10**9}),
    ("rotate-secret", {"overlap_s": 1.5}), ("rotate-secret", {"overlap_s": 31 * 86400}),
])
def test_bad_rotation_windows_are_400(system, route, body):
    app = new_app(system)
    status, err, _ = api(system, "POST", f"/v1/apps/{app['id']}/{route}", body)
    assert status == 400 and err["error"]["code"] in ("bad_grace_s", "bad_overlap_s"), err


def test_secrets_and_keys_are_never_listed(system):
    app = new_app(system)
    status, rotated, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-secret", {"overlap_s": 60})
    assert status == 200
    status, key, _ = api(system, "POST", f"/v1/apps/{app['id']}/rotate-key", {"grace_s": 60})
    assert status == 200 and "secret" not in key and rotated["secret"]
    shown = [app["secret"], app["api_key"], rotated["secret"], key["api_key"]]
    for path in ("/v1/apps", f"/v1/apps/{app['id']}"):
        status, body, raw = api(system, "GET", path)
        assert status == 200
        assert not any(s.encode() in raw for s in shown), raw[:500]
    status, body, raw = api(system, "PATCH", f"/v1/apps/{app['id']}", {"push_rate_per_s": 5})
    assert status == 200 and not any(s.encode() in raw for s in shown), raw[:500]
    assert "secret" not in body and "api_key" not in body


async def test_cli_rotates_with_grace_and_overlap(system):
    app = new_app(system)
    env = procs.common_env(system.common)

    def pylon(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "services.cli", "app", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    key = pylon("rotate-key", app["id"], "--grace", "600")
    assert key["api_key"] != app["api_key"] and key["previous_key_until"] > time.time()
    for k in (app["api_key"], key["api_key"]):
        status, body, _ = api(system, "POST", "/v1/tokens", {"uid": "u"}, key=k)
        assert status == 200, body
    secret = pylon("rotate-secret", app["id"], "--overlap", "600")
    assert secret["secret"] != app["secret"] and secret["previous_secret_until"] > time.time()
    # published for the rooms at once (centers' own caches pick it up within their 10 s TTL)
    redis = runtime.redis_client(system.common.redis_url)
    try:
        published = App.from_json(await redis.hget("pylon:apps", app["id"]))
    finally:
        await redis.aclose()
    assert published.secret == secret["secret"] and published.previous_secret == app["secret"]
    assert published.previous_secret_until == secret["previous_secret_until"]
    listing = json.dumps(pylon("list"))
    assert app["id"] in listing and secret["secret"] not in listing and app["secret"] not in listing
