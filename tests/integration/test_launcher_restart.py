"""A restart on the same var dir keeps the system's identity and its stored messages: the same demo
app (id, secret, API key), the same admin key, and a message stored for an offline user before the
restart is still stored afterwards with the same seq. LocalCluster.restart() brings back a killed
service with its arguments. The cluster runs its own Redis and MariaDB under its var dir."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid

import pytest

from services.launcher import backing
from services.launcher.cluster import LocalCluster, Ports
from tests.integration.conftest import TEST_ENV


@pytest.fixture(scope="module")
def var_dir():
    backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
    tmp = tempfile.mkdtemp(prefix="pylon-restart-")
    try:
        yield os.path.join(tmp, "var")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cluster(var: str, ports: Ports) -> LocalCluster:
    return LocalCluster(var, ports, room_instances=2, env=TEST_ENV)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _message(c: LocalCluster, msg_id: str, key: str) -> dict:
    status, body = c.api("GET", f"/v1/messages/{msg_id}", key=key)
    assert status == 200, body
    return body


def test_restart_keeps_identity_and_stored_messages(var_dir):
    ports = Ports.free(2)
    first = _cluster(var_dir, ports)
    try:
        first.start()
        app = first.ensure_demo_app()
        assert first.app_created and app["id"] == "demo"
        admin_key = first.admin_key
        first.write_local_json(os.path.join(var_dir, "local.json"))
        uid = "offline-" + uuid.uuid4().hex[:8]
        status, body = first.api("POST", "/v1/push", {"app": app["id"], "uids": [uid], "payload": "kept"},
                                 key=app["api_key"])
        assert status == 200, body
        msg_id = body["msg_ids"][0]
        before = _message(first, msg_id, app["api_key"])
        assert before["state"] == "stored", before
    finally:
        first.stop()
    assert _mode(os.path.join(var_dir, "identity.json")) == 0o600
    assert _mode(os.path.join(var_dir, "local.json")) == 0o600
    with open(os.path.join(var_dir, "local.json")) as fh:
        local_before = json.load(fh)

    second = _cluster(var_dir, ports)
    try:
        second.start()
        again = second.ensure_demo_app()
        assert not second.app_created
        assert again == app  # same id, secret and API key: no demo-2
        assert second.admin_key == admin_key
        second.write_local_json(os.path.join(var_dir, "local.json"))
        with open(os.path.join(var_dir, "local.json")) as fh:
            assert json.load(fh) == local_before
        # the old API key still authenticates, the admin key still opens admin routes
        status, body = second.api("POST", "/v1/tokens", {"uid": uid}, key=app["api_key"])
        assert status == 200 and body["token"], body
        status, body = second.api("GET", "/v1/apps/demo", key=admin_key)
        assert status == 200 and body["id"] == app["id"] and "secret" not in body, body
        status, body = second.api("GET", "/v1/apps/demo-2", key=admin_key)
        assert status == 404, body

        # Redis (append-only file) and MariaDB keep their data under var/
        after = _message(second, msg_id, app["api_key"])
        assert after["state"] == "stored", after
        assert after["seq"] == before["seq"], (before, after)
    finally:
        second.stop()


def test_restart_brings_back_a_killed_service(var_dir):
    ports = Ports.free(2)
    c = _cluster(var_dir + "-kill", ports)
    try:
        c.start()
        app = c.ensure_demo_app()
        for name in ("saver", "room"):
            old = c.services[name].pid
            c.services[name].proc.kill()
            c.services[name].proc.wait(5)
            assert not c.alive(name) and c.exit_code(name) == -9
            c.restart(name)
            assert c.alive(name) and c.services[name].pid != old
        c._wait_discovered()
        status, body = c.api("POST", "/v1/push", {"app": app["id"], "uids": ["after-kill"], "payload": "x"},
                             key=app["api_key"])
        assert status == 200, body
        # a service that is running is stopped and started again
        old = c.services["register"].pid
        c.restart("register")
        assert c.alive("register") and c.services["register"].pid != old
        with pytest.raises(KeyError):
            c.restart("nonesuch")
    finally:
        c.stop()
