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
