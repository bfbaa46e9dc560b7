"""``pylon status``: where it finds the center and key, and the clear errors when it cannot."""

import argparse
import json

import pytest

from services.center import status_cli


def args(**kw):
    p = argparse.ArgumentParser()
    status_cli.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_center_and_key_come_from_local_json_or_the_flags(tmp_path):
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"center": "http://h:1/", "admin_key": "k" * 10}))
    assert status_cli.target(args(local=str(local))) == ("http://h:1", "k" * 10)
    assert status_cli.target(args(local=str(local), center="http://o:2")) == ("http://o:2", "k" * 10)
    assert status_cli.target(args(local=str(tmp_path / "none"), center="http://o:2", admin_key="x")) == ("http://o:2", "x")


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("{", "cannot read"), ("[]", "JSON object"),
    ('{"admin_key": "k"}', "no center URL"), ('{"center": "http://h:1"}', "no admin key"),
])
def test_unusable_local_json_is_a_clear_error(tmp_path, content, message):
    local = tmp_path / "local.json"
    if content is not None:
        local.write_text(content)
    with pytest.raises(status_cli.StatusError, match=message):
        status_cli.target(args(local=str(local)))


def test_an_unreachable_center_is_exit_code_1_with_a_message(tmp_path, capsys):
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"center": "http://127.0.0.1:1", "admin_key": "k" * 10}))
    assert status_cli.main(args(local=str(local))) == 1
    assert "cannot reach center at http://127.0.0.1:1" in capsys.readouterr().err
