"""The launcher's identity across restarts: the admin key of a var dir is made once and kept in a
0600 file (no network; the demo app's checks against a live center are in the integration test)."""

from __future__ import annotations

import json
import os
import stat

from services.launcher.cluster import LocalCluster, read_json, write_private_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_json_is_0600_and_replaced_whole(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_private_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_read_json_tolerates_missing_and_broken_files(tmp_path):
    assert read_json(str(tmp_path / "none.json")) == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(str(tmp_path / "bad.json")) == {}
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(str(tmp_path / "list.json")) == {}


def test_admin_key_made_once_then_kept(tmp_path):
    first = LocalCluster(str(tmp_path))._persisted_admin_key()
    assert first.startswith("ak_") and len(first) > 20
    assert _mode(tmp_path / "identity.json") == 0o600
    assert LocalCluster(str(tmp_path))._persisted_admin_key() == first


def test_admin_key_of_a_var_dir_from_before_identity_json(tmp_path):
    (tmp_path / "local.json").write_text(json.dumps({"admin_key": "ak_from_old_local_json"}))
    assert LocalCluster(str(tmp_path))._persisted_admin_key() == "ak_from_old_local_json"
    assert read_json(str(tmp_path / "identity.json"))["admin_key"] == "ak_from_old_local_json"


class FakeCenter(LocalCluster):
    """A LocalCluster whose center is a dict of apps (id -> (secret, api_key))."""

    def __init__(self, var, apps=None):
        super().__init__(var)
        self.admin_key = "ak_test_admin_key"
        self.apps = dict(apps or {})
        self.calls = []

    def api(self, method, path, body=None, key=None):
        self.calls.append((method, path))
        key = key or self.admin_key
        if method == "GET" and path.startswith("/v1/apps/"):
            app_id = path.rsplit("/", 1)[1]
            if app_id not in self.apps:
                return 404, {"error": "unknown_app"}
            return 200, {"id": app_id, "secret": self.apps[app_id][0]}
        if method == "POST" and path == "/v1/tokens":
            owner = next((a for a, (_, k) in self.apps.items() if k == key), None)
            if owner is None:
                return 401, {"error": "invalid_api_key"}
            return (200, {"token": "t"}) if body.get("app") in (None, owner) else (403, {"error": "app_forbidden"})
        if method == "POST" and path.endswith("/rotate-key"):
            app_id = path.split("/")[3]
            self.apps[app_id] = (self.apps[app_id][0], "pk_rotated")
            return 200, {"id": app_id, "api_key": "pk_rotated"}
        if method == "POST" and path == "/v1/apps":
            if body["id"] in self.apps:
                return 409, {"error": "app_exists"}
            self.apps[body["id"]] = ("new-secret", "pk_new")
            return 201, {"id": body["id"], "secret": "new-secret", "api_key": "pk_new"}
        raise AssertionError((method, path))


def _remember(tmp_path, app):
    write_private_json(str(tmp_path / "identity.json"), {"admin_key": "ak_test_admin_key", "app": app})


def test_demo_app_created_once_then_reused(tmp_path):
    c = FakeCenter(str(tmp_path))
    app = c.ensure_demo_app()
    assert c.app_created and app == {"id": "demo", "secret": "new-secret", "api_key": "pk_new"}
    assert read_json(str(tmp_path / "identity.json"))["app"] == app
    again = FakeCenter(str(tmp_path), apps=c.apps)
    assert again.ensure_demo_app() == app and not again.app_created
    assert ("POST", "/v1/apps") not in again.calls


def test_demo_app_lost_with_its_database_is_created_again(tmp_path):
    _remember(tmp_path, {"id": "demo", "secret": "s", "api_key": "pk_old"})
    c = FakeCenter(str(tmp_path))
    assert c.ensure_demo_app()["api_key"] == "pk_new" and c.app_created


def test_demo_app_whose_key_was_rotated_keeps_its_id_and_secret(tmp_path):
    _remember(tmp_path, {"id": "demo", "secret": "s", "api_key": "pk_old"})
    c = FakeCenter(str(tmp_path), apps={"demo": ("s", "pk_someone_rotated")})
    app = c.ensure_demo_app()
    assert app == {"id": "demo", "secret": "s", "api_key": "pk_rotated"} and not c.app_created
    assert read_json(str(tmp_path / "identity.json"))["app"] == app


def test_demo_app_of_a_var_dir_from_before_identity_json(tmp_path):
    old = {"id": "demo", "secret": "s", "api_key": "pk_old"}
    (tmp_path / "local.json").write_text(json.dumps({"app": old, "admin_key": "ak_test_admin_key"}))
    c = FakeCenter(str(tmp_path), apps={"demo": ("s", "pk_old")})
    assert c.ensure_demo_app() == old and not c.app_created
