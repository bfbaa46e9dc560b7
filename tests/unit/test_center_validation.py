import base64

import pytest

from services.center import validation as v
from services.center.config import CenterConfig
from services.center.errors import InvalidRequest, PayloadTooLarge
from services.common.config import ConfigError, build

LIMITS = v.Limits(max_uids=3, max_payload_bytes=10, max_uid_len=8, default_ttl_s=60, max_ttl_s=3600)


def code_of(fn, *args):
    with pytest.raises((InvalidRequest, PayloadTooLarge)) as err:
        fn(*args)
    return type(err.value).__name__, err.value.code


def test_push_body_text_payload_and_defaults():
    body = v.push_body({"app": "a1", "uids": ["u1", "u2"], "payload": "hi", "extra": 1}, LIMITS)
    assert body == v.PushBody("a1", ("u1", "u2"), b"hi", 60)


def test_push_body_base64_payload_and_ttl():
    body = v.push_body({"uids": ["u"], "payload_b64": base64.b64encode(b"\x00\xff").decode(), "ttl_s": 5}, LIMITS)
    assert body.payload == b"\x00\xff" and body.ttl_s == 5 and body.app is None


@pytest.mark.parametrize("data, expected", [
    ({"payload": "x"}, ("InvalidRequest", "missing_uids")),
    ({"uids": "u1", "payload": "x"}, ("InvalidRequest", "bad_uids")),
    ({"uids": {"u": 1}, "payload": "x"}, ("InvalidRequest", "bad_uids")),
    ({"uids": [], "payload": "x"}, ("InvalidRequest", "bad_uids")),
    ({"uids": ["a", "b", "c", "d"], "payload": "x"}, ("InvalidRequest", "too_many_uids")),
    ({"uids": [1], "payload": "x"}, ("InvalidRequest", "bad_uid")),
    ({"uids": [""], "payload": "x"}, ("InvalidRequest", "bad_uid")),
    ({"uids": ["123456789"], "payload": "x"}, ("InvalidRequest", "bad_uid")),
    ({"uids": ["a\x00b"], "payload": "x"}, ("InvalidRequest", "bad_uid")),
    ({"uids": ["\ud800"], "payload": "x"}, ("InvalidRequest", "bad_uid")),
    ({"uids": ["u"]}, ("InvalidRequest", "missing_payload")),
    ({"uids": ["u"], "payload": "x", "payload_b64": "eA=="}, ("InvalidRequest", "bad_payload")),
    ({"uids": ["u"], "payload": 5}, ("InvalidRequest", "bad_payload")),
    ({"uids": ["u"], "payload": "\ud800"}, ("InvalidRequest", "bad_payload")),
    ({"uids": ["u"], "payload_b64": "not base64!"}, ("InvalidRequest", "bad_payload_b64")),
    ({"uids": ["u"], "payload_b64": 7}, ("InvalidRequest", "bad_payload_b64")),
    ({"uids": ["u"], "payload": "x" * 11}, ("PayloadTooLarge", "payload_too_large")),
    # 4 characters, 12 bytes in UTF-8: the limit counts bytes
    ({"uids": ["u"], "payload": "\u20ac" * 4}, ("PayloadTooLarge", "payload_too_large")),
    ({"uids": ["u"], "payload_b64": base64.b64encode(b"y" * 11).decode()}, ("PayloadTooLarge", "payload_too_large")),
    ({"uids": ["u"], "payload_b64": "A" * 10_000}, ("PayloadTooLarge", "payload_too_large")),
    ({"uids": ["u"], "payload": "x", "ttl_s": 0}, ("InvalidRequest", "bad_ttl_s")),
    ({"uids": ["u"], "payload": "x", "ttl_s": 3601}, ("InvalidRequest", "bad_ttl_s")),
    ({"uids": ["u"], "payload": "x", "ttl_s": True}, ("InvalidRequest", "bad_ttl_s")),
    ({"uids": ["u"], "payload": "x", "ttl_s": "60"}, ("InvalidRequest", "bad_ttl_s")),
    ({"uids": ["u"], "payload": "x", "app": ""}, ("InvalidRequest", "bad_app")),
    ({"uids": ["u"], "payload": "x", "app": 3}, ("InvalidRequest", "bad_app")),
])
def test_push_body_rejections(data, expected):
    assert code_of(v.push_body, data, LIMITS) == expected


def test_payload_at_the_limit_is_fine():
    assert len(v.push_body({"uids": ["u"], "payload": "x" * 10}, LIMITS).payload) == 10
    assert v.push_body({"uids": ["u"], "payload": "x", "ttl_s": 60.0}, LIMITS).ttl_s == 60


@pytest.mark.parametrize("raw, code", [
    (b"", "empty_body"),
    (b"  \n", "empty_body"),
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "malformed_json"),
    (b'"text"', "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
    (b'{"n": ' + b"9" * 5000 + b"}", "malformed_json"),
])
def test_parse_json_rejections(raw, code):
    assert code_of(v.parse_json, raw) == ("InvalidRequest", code)


def test_parse_json_accepts_objects_and_optional_empty():
    assert v.parse_json(b'{"a": 1}') == {"a": 1}
    assert v.parse_json(b"", allow_empty=True) == {}


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "1.5", "99999999999999999999999", "18446744073709551616",
                                  "\u0661\u0662"])
def test_bad_message_ids(text):
    assert code_of(v.parse_msg_id, text) == ("InvalidRequest", "bad_msg_id")


def test_message_id_range():
    assert v.parse_msg_id("18446744073709551615") == 2**64 - 1
    assert v.parse_msg_id("7281903821239902208") == 7281903821239902208


def test_token_body():
    body = v.token_body({"uid": "u1", "device_id": "d1"}, LIMITS)
    assert (body.uid, body.device_id, body.ttl_s) == ("u1", "d1", LIMITS.token_ttl_s)
    assert v.token_body({"uid": "u1"}, LIMITS).device_id == ""
    assert code_of(v.token_body, {"device_id": "d"}, LIMITS) == ("InvalidRequest", "bad_uid")
    assert code_of(v.token_body, {"uid": "u", "ttl_s": 10}, LIMITS) == ("InvalidRequest", "bad_ttl_s")
    assert code_of(v.token_body, {"uid": "u", "device_id": 5}, LIMITS) == ("InvalidRequest", "bad_device_id")


def test_broadcast_and_kick_bodies():
    assert v.broadcast_body({"app": "a", "payload": "p"}, LIMITS) == v.BroadcastBody("a", b"p", 60)
    assert v.kick_body({}) == v.KickBody(None, "")
    assert v.kick_body({"reason": "bye", "app": "a"}) == v.KickBody("a", "bye")
    assert code_of(v.kick_body, {"reason": ["x"]}) == ("InvalidRequest", "bad_reason")


def test_app_bodies():
    assert v.new_app_body({"id": "my-app.1"}) == v.NewAppBody("my-app.1", "", False, 0)
    body = v.new_app_body({"id": "a", "webhook_url": "https://x.example/h", "status_events": True, "push_rate_per_s": 5})
    assert body == v.NewAppBody("a", "https://x.example/h", True, 5)
    assert code_of(v.new_app_body, {}) == ("InvalidRequest", "missing_id")
    assert code_of(v.new_app_body, {"id": "Bad App"}) == ("InvalidRequest", "bad_app_id")
    assert code_of(v.new_app_body, {"id": "a", "webhook_url": "ftp://x"}) == ("InvalidRequest", "bad_webhook_url")
    assert code_of(v.new_app_body, {"id": "a", "status_events": "yes"}) == ("InvalidRequest", "bad_status_events")
    assert code_of(v.new_app_body, {"id": "a", "push_rate_per_s": -1}) == ("InvalidRequest", "bad_push_rate_per_s")
    assert v.app_changes_body({"push_rate_per_s": 3}) == v.AppChangesBody(None, None, 3)
    assert v.app_changes_body({"webhook_url": ""}) == v.AppChangesBody("", None, None)
    assert code_of(v.app_changes_body, {}) == ("InvalidRequest", "empty_change")


def test_limits_follow_the_config():
    cfg = CenterConfig(max_uids_per_push=5, max_payload_bytes=100)
    limits = v.Limits.from_config(cfg)
    assert limits.max_uids == 5 and limits.max_payload_bytes == 100


@pytest.mark.parametrize("values, needle", [
    ({"max_payload_bytes": 70_000}, "center.max_payload_bytes"),
    ({"admin_key": "short"}, "center.admin_key"),
    ({"default_ttl_s": 10, "max_ttl_s": 5}, "center.default_ttl_s"),
    ({"port": 70000}, "center.port"),
])
def test_bad_center_config(values, needle):
    with pytest.raises(ConfigError) as err:
        build(CenterConfig, "center", values, {})
    assert needle in str(err.value)
