"""SDK frame decoding/encoding and route parsing (pure)."""

import pytest
from pylon_sdk import frames
from pylon_sdk.errors import AuthError, ProtocolError, RouteError, ServerError
from pylon_sdk.routing import Address, FixedRoutes, parse_route_reply, route_url

from services.common import codec
from services.common.codec import ErrorCode, Frame, Op
from services.common.pb import client_pb2 as pb


def test_decode_push():
    body = pb.Push(messages=[pb.Message(msg_id=7, app="a", payload=b"x", created_ms=5, seq=2),
                             pb.Message(msg_id=8, app="a", payload=b"y", broadcast=True)]).SerializeToString()
    ev = frames.decode(Frame(Op.PUSH, 0, body))
    assert [(m.msg_id, m.payload, m.seq, m.broadcast) for m in ev.messages] == [(7, b"x", 2, False), (8, b"y", 0, True)]


def test_decode_error_and_ack():
    body = pb.Error(code=ErrorCode.OVERLOADED, message="busy", fatal=True, retry_after_ms=250).SerializeToString()
    ev = frames.decode(Frame(Op.ERROR, 9, body))
    assert ev.seq == 9 and ev.error.code is ErrorCode.OVERLOADED and ev.error.retry_later and ev.error.fatal
    assert ev.error.retry_after_ms == 250
    ack = frames.decode(Frame(Op.UPSTREAM_ACK, 4, pb.UpstreamAck(accepted=True).SerializeToString()))
    assert (ack.seq, ack.accepted) == (4, True)


def test_auth_ok_defaults_max_frame():
    ev = frames.decode(Frame(Op.AUTH_OK, 1, pb.AuthOk(session_id="s", heartbeat_s=300).SerializeToString()))
    assert ev.max_frame == codec.DEFAULT_MAX_FRAME


def test_server_errors_know_their_kind():
    assert ServerError(ErrorCode.BAD_TOKEN, "x").permanent
    assert not ServerError(ErrorCode.IDLE_TIMEOUT, "x").permanent
    assert ServerError(999, "future code").code == 999
    assert isinstance(AuthError(ErrorCode.UNKNOWN_APP, "x"), ServerError)


@pytest.mark.parametrize("frame", [Frame(Op.PUSH, 0, b"\xff\xff\xff"), Frame(Op.AUTH, 0, b""),
                                   Frame(Op.ACK, 0, b"")])
def test_garbage_and_client_ops_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        frames.decode(frame)


def test_auth_body_carries_sdk_version():
    a = pb.Auth.FromString(frames.auth("t", "u", "d", ["a", "b"], "wifi", "r", 300, ["t2"]))
    assert (a.sdk, a.apps, a.heartbeat_hint_s, a.tokens, a.resume_token) == ("python/0.1.0", ["a", "b"], 300, ["t2"], "r")


@pytest.mark.parametrize("text,expected", [("10.0.0.1:7100", ("10.0.0.1", 7100)), ("[::1]:7100", ("::1", 7100)),
                                           ("room.example:1", ("room.example", 1))])
def test_parse_address(text, expected):
    assert frames.parse_address(text) == expected


@pytest.mark.parametrize("text", ["nohost", ":7100", "h:0", "h:99999", "h:x"])
def test_parse_bad_address(text):
    with pytest.raises(ProtocolError):
        frames.parse_address(text)


def test_route_reply_parsing():
    assert parse_route_reply(b'{"rooms": [{"host": "h", "port": 1}, {"host": "h", "port": 1}, {"host": "g", "port": 2}]}') \
        == [Address("h", 1), Address("g", 2)]
    for bad in (b"nope", b"[]", b'{"rooms": [{"host": "h"}]}', b'{"rooms": [{"host": "h", "port": true}]}',
                b'{"rooms": ["h:1"]}'):
        with pytest.raises(RouteError):
            parse_route_reply(bad)


def test_route_url_carries_exclude():
    url = route_url("http://d:8080/", "u 1", "wifi", "", [Address("h", 1), Address("::1", 2)])
    assert url == "http://d:8080/v1/route?uid=u+1&net=wifi&exclude=h%3A1%2C%5B%3A%3A1%5D%3A2"


async def test_fixed_routes_move_failed_to_the_end():
    r = FixedRoutes([("a", 1), ("b", 2), ("c", 3)])
    assert await r.get([Address("a", 1)]) == [Address("b", 2), Address("c", 3), Address("a", 1)]
