import base64
import json

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


PUSH_REJECTIONS = [
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
]


@pytest.mark.parametrize("data, expected", PUSH_REJECTIONS)
def test_push_body_rejections(data, expected):
    assert code_of(v.push_body, data, LIMITS) == expected


def test_payload_at_the_limit_is_fine():
    assert len(v.push_body({"uids": ["u"], "payload": "x" * 10}, LIMITS).payload) == 10
    assert v.push_body({"uids": ["u"], "payload": "x", "ttl_s": 60.0}, LIMITS).ttl_s == 60


MALFORMED_BODIES = [
    (b"", "empty_body"),
    (b"  \n", "empty_body"),
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "malformed_json"),
    (b'"text"', "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
    (b'{"n": ' + b"9" * 5000 + b"}", "malformed_json"),
]


@pytest.mark.parametrize("raw, code", MALFORMED_BODIES)
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
    # a broadcast has a TTL default and maximum of its own (it is delivered at every connect until acked)
    assert v.broadcast_body({"app": "a", "payload": "p"}, LIMITS) == v.BroadcastBody("a", b"p", 86400)
    assert v.broadcast_body({"payload": "p", "ttl_s": 7 * 86400}, LIMITS).ttl_s == 7 * 86400
    for bad in (0, -1, 7 * 86400 + 1, "60", True, 1.5):
        assert code_of(v.broadcast_body, {"payload": "p", "ttl_s": bad}, LIMITS) == ("InvalidRequest", "bad_ttl_s")
    assert v.parse_broadcast_id("18446744073709551615") == (1 << 64) - 1
    for bad in ("0", "abc", "-1", "18446744073709551616", "1" * 21, "１"):
        assert code_of(v.parse_broadcast_id, bad) == ("InvalidRequest", "bad_broadcast_id")
    assert v.list_limit(None) == 20 and v.list_limit("1") == 1 and v.list_limit("100") == 100
    for bad in ("0", "101", "-5", "x", "1e3", "00000000001"):
        assert code_of(v.list_limit, bad) == ("InvalidRequest", "bad_limit")
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


# ---------------------------------------------------------------- batch form of POST /v1/push

BATCH_LIMITS = v.Limits(max_uids=3, max_messages=4, max_payload_bytes=10, max_uid_len=8, default_ttl_s=60,
                        max_ttl_s=3600)


def batch_error(data):
    with pytest.raises((InvalidRequest, PayloadTooLarge)) as err:
        v.push_request(data, BATCH_LIMITS)
    return type(err.value).__name__, err.value.code, getattr(err.value, "index", None), err.value.message


def test_batch_form_payloads_and_ttls_in_order():
    body = v.push_request({"app": "a1", "ttl_s": 30, "messages": [
        {"uid": "u1", "payload": "hi"},
        {"uid": "u2", "payload_b64": base64.b64encode(b"\x00\xff").decode(), "ttl_s": 5},
        {"uid": "u1", "payload": "", "extra": True},
    ]}, BATCH_LIMITS)
    assert body == v.BatchPushBody("a1", (v.BatchMessage("u1", b"hi", 30), v.BatchMessage("u2", b"\x00\xff", 5),
                                          v.BatchMessage("u1", b"", 30)))
    # without a top-level ttl_s a message gets the default
    assert v.push_request({"messages": [{"uid": "u", "payload": "x"}]}, BATCH_LIMITS).messages[0].ttl_s == 60


def test_uids_form_still_goes_through_push_request():
    assert v.push_request({"uids": ["u"], "payload": "p"}, BATCH_LIMITS) == v.PushBody(None, ("u",), b"p", 60)
    assert v.push_request({"uids": ["u"], "payload": "p", "messages": None}, BATCH_LIMITS).uids == ("u",)


def ok(i):
    return {"uid": f"u{i}", "payload": "p"}


BATCH_REJECTIONS = [
    ({"messages": "nope"}, ("InvalidRequest", "bad_messages", None)),
    ({"messages": {"uid": "u"}}, ("InvalidRequest", "bad_messages", None)),
    ({"messages": []}, ("InvalidRequest", "bad_messages", None)),
    ({"messages": [ok(i) for i in range(5)]}, ("InvalidRequest", "too_many_messages", None)),
    ({"messages": [ok(0)], "uids": ["u"]}, ("InvalidRequest", "bad_push_form", None)),
    ({"messages": [ok(0)], "payload": "top"}, ("InvalidRequest", "bad_payload", None)),
    ({"messages": [ok(0)], "ttl_s": 0}, ("InvalidRequest", "bad_ttl_s", None)),
    ({"messages": [ok(0)], "app": 5}, ("InvalidRequest", "bad_app", None)),
    ({"messages": [ok(0), "u1"]}, ("InvalidRequest", "bad_message", 1)),
    ({"messages": [ok(0), ok(1), None]}, ("InvalidRequest", "bad_message", 2)),
    ({"messages": [ok(0), {"payload": "x"}]}, ("InvalidRequest", "missing_uid", 1)),
    ({"messages": [{"uid": 7, "payload": "x"}]}, ("InvalidRequest", "bad_uid", 0)),
    ({"messages": [{"uid": "", "payload": "x"}]}, ("InvalidRequest", "bad_uid", 0)),
    ({"messages": [{"uid": "123456789", "payload": "x"}]}, ("InvalidRequest", "bad_uid", 0)),
    ({"messages": [{"uid": "a\nb", "payload": "x"}]}, ("InvalidRequest", "bad_uid", 0)),
    ({"messages": [{"uid": "\ud800", "payload": "x"}]}, ("InvalidRequest", "bad_uid", 0)),
    ({"messages": [ok(0), {"uid": "u"}]}, ("InvalidRequest", "missing_payload", 1)),
    ({"messages": [{"uid": "u", "payload": "x", "payload_b64": "eA=="}]}, ("InvalidRequest", "bad_payload", 0)),
    ({"messages": [{"uid": "u", "payload": ["x"]}]}, ("InvalidRequest", "bad_payload", 0)),
    ({"messages": [{"uid": "u", "payload": "\udc00"}]}, ("InvalidRequest", "bad_payload", 0)),
    ({"messages": [ok(0), ok(1), ok(2), {"uid": "u", "payload_b64": "not base64!"}]},
     ("InvalidRequest", "bad_payload_b64", 3)),
    ({"messages": [{"uid": "u", "payload_b64": 12}]}, ("InvalidRequest", "bad_payload_b64", 0)),
    ({"messages": [{"uid": "u", "payload": "x" * 11}]}, ("PayloadTooLarge", "payload_too_large", 0)),
    ({"messages": [ok(0), {"uid": "u", "payload_b64": base64.b64encode(b"y" * 11).decode()}]},
     ("PayloadTooLarge", "payload_too_large", 1)),
    ({"messages": [{"uid": "u", "payload": "x", "ttl_s": 3601}]}, ("InvalidRequest", "bad_ttl_s", 0)),
    ({"messages": [{"uid": "u", "payload": "x", "ttl_s": "60"}]}, ("InvalidRequest", "bad_ttl_s", 0)),
    ({"messages": [{"uid": "u", "payload": "x", "ttl_s": False}]}, ("InvalidRequest", "bad_ttl_s", 0)),
]


@pytest.mark.parametrize("data, expected", BATCH_REJECTIONS)
def test_batch_form_rejections(data, expected):
    kind, code, index, message = batch_error(data)
    assert (kind, code, index) == expected, message
    if index is not None:
        assert message.startswith(f"messages[{index}]"), message


def test_batch_form_error_messages_name_the_field():
    _, _, _, message = batch_error({"messages": [ok(0), {"uid": "u", "payload_b64": "%%"}]})
    assert message == "messages[1].payload_b64 is not valid base64"
    _, _, _, message = batch_error({"messages": [{"uid": "u", "payload": "x" * 11}]})
    assert message == "messages[0].payload is 11 bytes; the limit is 10 bytes after decoding"
    _, _, _, message = batch_error({"messages": [{"uid": "u", "payload": "x", "ttl_s": 0}]})
    assert message == "messages[0].ttl_s must be between 1 and 3600"


def test_batch_form_at_its_limits():
    body = v.push_request({"messages": [{"uid": "u", "payload": "x" * 10, "ttl_s": 3600.0}] * 4}, BATCH_LIMITS)
    assert len(body.messages) == 4 and body.messages[0].ttl_s == 3600


def test_max_messages_follows_the_config():
    assert v.Limits.from_config(CenterConfig(max_messages_per_push=7)).max_messages == 7
    with pytest.raises(ConfigError):
        build(CenterConfig, "center", {"max_messages_per_push": 0}, {})


# ---------------------------------------------------------------- the msgspec fast path agrees with the reference


def outcome(fn):
    try:
        return "ok", fn()
    except (InvalidRequest, PayloadTooLarge) as exc:
        return type(exc).__name__, exc.code, exc.message, getattr(exc, "index", None)


ACCEPTED = [
    {"uids": ["u1", "u2"], "payload": "hi", "extra": {"nested": [1, 2]}},
    {"uids": ["u"], "payload_b64": "AP8=", "ttl_s": 5, "app": "a1"},
    {"uids": ["u"], "payload": "x", "ttl_s": 60.0},
    {"uids": ["u"], "payload": "", "payload_b64": None, "messages": None},
    {"messages": [{"uid": "u1", "payload": "p"}, {"uid": "u2", "payload_b64": "AP8=", "ttl_s": 7}], "ttl_s": 30},
    {"messages": [{"uid": "u", "payload": "x" * 10, "ttl_s": 3600.0}] * 4, "uids": None},
    {"messages": [{"uid": "\u20ac", "payload": "\u20ac\u20ac\u20ac", "junk": None}]},
]


def equivalent_bodies():
    bodies = [json.dumps(d).encode() for d in ACCEPTED]
    bodies += [json.dumps(d).encode() for d, _ in PUSH_REJECTIONS + BATCH_REJECTIONS]
    bodies += [raw for raw, _ in MALFORMED_BODIES]
    bodies += [b'\xef\xbb\xbf{"uids": ["u"], "payload": "bom"}', b'{"uids": ["u"], "payload": "\\ud800"}',
               b'{"uids": ["u"], "uids": ["v"], "payload": "dup"}', b'{"pad": ' + b"[" * 5000 + b"]" * 5000 + b"}",
               b'{"uids": ["u"], "payload": "x", "ttl_s": 99999999999999999999999}', b'{"uids": ["u"], "payload": NaN}',
               b'{"messages": [{"uid": null, "payload": "x"}]}', b'{"messages": [{"uid": "a\\u0000", "payload": "x"}]}']
    return bodies


@pytest.mark.parametrize("raw", equivalent_bodies())
def test_fast_decoder_matches_the_reference(raw):
    from services.center.push_decoding import decode_push

    reference = outcome(lambda: v.push_request(v.parse_json(raw), BATCH_LIMITS))
    assert outcome(lambda: decode_push(raw, BATCH_LIMITS)) == reference


@pytest.mark.parametrize("data", ACCEPTED[:2] + ACCEPTED[4:5] + ACCEPTED[6:])
def test_fast_decoder_needs_no_reference_for_good_bodies(data, monkeypatch):
    from services.center import push_decoding

    def not_called(*args):
        raise AssertionError("fell back to validation.py")

    expected = v.push_request(data, BATCH_LIMITS)
    monkeypatch.setattr(push_decoding.validation, "push_request", not_called)
    assert push_decoding.decode_push(json.dumps(data).encode(), BATCH_LIMITS) == expected
