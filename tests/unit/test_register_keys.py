"""register: key layout, set members, request validation and config (pure)."""

from __future__ import annotations

import pytest

from services.common import config
from services.common.pb import internal_pb2 as pb
from services.register import keys
from services.register.config import RegisterConfig
from services.register.keys import RequestError


def test_keys_follow_the_shared_contract():
    assert keys.user_key("alice") == "pylon:u:alice"
    assert keys.instance_key("room-127.0.0.1:7100") == "pylon:r:room-127.0.0.1:7100"
    assert keys.member("alice", "s1") == "alice\x00s1"


@pytest.mark.parametrize("uid, sid", [("alice", "s1"), ("user:with:colons", "room-1/42"), ("nul\x00in\x00uid", "s"),
                                      ("ü", "ß")])
def test_member_round_trip(uid, sid):
    assert keys.split_member(keys.member(uid, sid).encode()) == (uid, sid)


@pytest.mark.parametrize("raw", [b"no-separator", b"\x00sid", b"uid\x00", b""])
def test_foreign_members_are_rejected(raw):
    assert keys.split_member(raw) is None


def _s(**kw):
    base = dict(uid="u", session_id="s", instance="room-1")
    base.update(kw)
    return pb.Session(**base)


def test_valid_sessions_pass():
    keys.check_sessions("Register", [_s(), _s(uid="v", session_id="t")], 10)


@pytest.mark.parametrize("session, fragment", [
    (_s(uid=""), "uid must not be empty"),
    (_s(session_id="a\x00b"), "NUL"),
    (_s(uid="x" * 129), "longer than 128"),
    (_s(session_id=""), "session_id must not be empty"),
    (_s(instance=""), "instance must not be empty"),
])
def test_invalid_sessions_name_the_item(session, fragment):
    with pytest.raises(RequestError, match=fragment) as info:
        keys.check_sessions("Register", [_s(), session], 10)
    assert "sessions[1]" in str(info.value)


def test_batch_bound():
    with pytest.raises(RequestError, match="11 items in one request, the limit is 10"):
        keys.check_sessions("Register", [_s()] * 11, 10)
    with pytest.raises(RequestError, match="limit is 2"):
        keys.check_uids("Lookup", ["a", "b", "c"], 2)
    assert keys.check_uids("Lookup", ("b", "a", "b"), 3) == ["b", "a", "b"]


def test_config_defaults_env_and_errors():
    cfg = config.build(RegisterConfig, "register", {}, env={})
    assert (cfg.grpc_port, cfg.max_items) == (7300, 5000)
    cfg = config.build(RegisterConfig, "register", {"grpc_port": 7301}, env={"PYLON_REGISTER_MAX_ITEMS": "100"})
    assert (cfg.grpc_port, cfg.max_items) == (7301, 100)
    with pytest.raises(config.ConfigError, match="register.grpc_port"):
        config.build(RegisterConfig, "register", {"grpc_port": 0}, env={})
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.build(RegisterConfig, "register", {"grpc-port": 1}, env={})
