"""The admin routes' request parsing and the audit line format (pure, no network)."""

import json
import re

import pytest

from services.center import audit
from services.center.admin_api import Cursor, drain_body, instance_param, query_flag, query_limit, requeue_body
from services.center.auth import Principal
from services.center.errors import InvalidRequest
from services.center.validation import Limits
from services.common.apps import App

ADMIN = Principal(admin=True, app=None)
APP = Principal(admin=False, app=App(id="shop", secret="s"))


def _pairs(line: str) -> dict[str, str]:
    """Parse an audit line back: key=value, values plain words or JSON strings."""
    assert line.startswith("audit ")
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line[len("audit "):]):
        value = m.group(2)
        out[m.group(1)] = json.loads(value) if value.startswith('"') else value
    return out


def test_audit_names_the_key_never_the_key_itself():
    assert audit.line(ADMIN, "drain", instance="room-10.0.0.5:7100", restart=True) == \
        "audit actor=admin action=drain instance=room-10.0.0.5:7100 restart=true"
    assert audit.line(APP, "kick", uid="alice", app="shop", kicked=2) == \
        "audit actor=shop action=kick uid=alice app=shop kicked=2"
    assert audit.line(ADMIN, "requeue", app=None, fields=["a", "b"]).endswith("app=- fields=a,b")


@pytest.mark.parametrize("uid", ['bob smith', 'x=1 actor=admin', 'quote"d', "nul\x00", "ünï", "a" * 500, ""])
def test_audit_values_that_are_not_plain_words_cannot_forge_fields(uid):
    line = audit.line(APP, "kick", uid=uid, kicked=1)
    assert "\n" not in line and len(line) < 400
    fields = _pairs(line)
    assert fields["actor"] == "shop" and fields["action"] == "kick" and fields["kicked"] == "1"
    assert fields["uid"] == (uid if len(uid) <= audit.MAX_VALUE_CHARS else uid[:audit.MAX_VALUE_CHARS - 3] + "...")


def test_cursor_round_trip_and_refusals():
    c = Cursor("shop", 386118361127325696)
    assert Cursor.parse(str(c)) == c
    assert Cursor.parse(None) is None
    for bad in ("", "shop", ":12", "shop:", "shop:0", "Shop:1", "shop:-1", "shop:1e3", "shop:" + "9" * 21):
        with pytest.raises(InvalidRequest) as exc:
            Cursor.parse(bad)
        assert exc.value.code == "bad_after"


def test_requeue_body_forms():
    limits = Limits()
    body = requeue_body({"msg_ids": ["12", 12, "13"]}, limits)
    assert body.msg_ids == (12, 13) and body.app is None
    body = requeue_body({"app": "shop", "uid": "alice", "limit": 5}, limits)
    assert (body.msg_ids, body.app, body.uid, body.limit) == ((), "shop", "alice", 5)
    for data, code in [({}, "missing_msg_ids"), ({"uid": "alice"}, "missing_msg_ids"),
                       ({"msg_ids": "12"}, "bad_msg_ids"), ({"msg_ids": []}, "bad_msg_ids"),
                       ({"msg_ids": [None]}, "bad_msg_id"), ({"msg_ids": [1.5]}, "bad_msg_id"),
                       ({"msg_ids": ["0"]}, "bad_msg_id"), ({"msg_ids": [str(1 << 64)]}, "bad_msg_id"),
                       ({"msg_ids": ["1"] * 1001}, "too_many_msg_ids"),
                       ({"msg_ids": ["1"], "uid": "alice"}, "bad_requeue_form"),
                       ({"app": "Shop!"}, "bad_app"), ({"app": "shop", "uid": ""}, "bad_uid"),
                       ({"app": "shop", "limit": True}, "bad_limit"), ({"app": "shop", "limit": 1001}, "bad_limit")]:
        with pytest.raises(InvalidRequest) as exc:
            requeue_body(data, limits)
        assert exc.value.code == code, data


def test_query_parameters():
    assert query_limit(None, 100, 1000) == 100 and query_limit("1000", 100, 1000) == 1000
    for bad in ("0", "1001", "-1", "1.0", "١٢", "99999999999"):
        with pytest.raises(InvalidRequest):
            query_limit(bad, 100, 1000)
    assert query_flag(None, "payload") is False and query_flag("true", "payload") is True
    with pytest.raises(InvalidRequest):
        query_flag("yes", "payload")
    assert drain_body({}) is True and drain_body({"restart": False}) is False
    with pytest.raises(InvalidRequest):
        drain_body({"restart": 0})
    assert instance_param("room-127.0.0.1:7100") == "room-127.0.0.1:7100"
    for bad in ("", "x" * 257, "röom", "a\nb"):
        with pytest.raises(InvalidRequest):
            instance_param(bad)
