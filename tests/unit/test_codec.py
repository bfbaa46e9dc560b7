"""The sans-IO frame codec: fragmented, concatenated, oversized and garbage input."""

import random

import pytest

from services.common.codec import (
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    Op,
    encode,
    split,
)
from services.common.pb import client_pb2 as cpb


def test_header_layout_is_big_endian_12_bytes():
    raw = encode(Op.PING, b"\x08\x1e", seq=0x01020304, flags=0x0A0B)
    assert HEADER_SIZE == 12
    assert raw[:4] == (14).to_bytes(4, "big")
    assert raw[4] == 1 and raw[5] == Op.PING
    assert raw[6:8] == b"\x0a\x0b" and raw[8:12] == b"\x01\x02\x03\x04"
    assert raw[12:] == b"\x08\x1e"


def test_roundtrip_with_protobuf_body():
    body = cpb.Auth(token="t", uid="u", apps=["a", "b"], net="wifi").SerializeToString()
    (frame,) = FrameDecoder().feed(encode(Op.AUTH, body, seq=9))
    assert frame == Frame(Op.AUTH, 9, body)
    assert cpb.Auth.FromString(frame.body).apps == ["a", "b"]


def test_fragmented_byte_by_byte():
    frames = [encode(Op.PING, b"", 1), encode(Op.ACK, cpb.Ack(msg_ids=[1, 2, 3]).SerializeToString(), 2)]
    stream = b"".join(frames)
    d = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += d.feed(stream[i:i + 1])
    assert [(f.op, f.seq) for f in out] == [(Op.PING, 1), (Op.ACK, 2)]
    assert d.buffered == 0


def test_concatenated_and_random_split_points():
    rng = random.Random(7)
    frames = [encode(rng.choice([Op.PING, Op.ACK, Op.UPSTREAM]), rng.randbytes(rng.randint(0, 3000)), i)
              for i in range(200)]
    stream = b"".join(frames)
    d = FrameDecoder()
    out, pos = [], 0
    while pos < len(stream):
        n = rng.randint(1, 5000)
        out += d.feed(stream[pos:pos + n])
        pos += n
    assert [encode(f.op, f.body, f.seq) for f in out] == frames


def test_oversized_frame_rejected_from_header_alone():
    d = FrameDecoder(max_frame=1024)
    header = HEADER.pack(1025, 1, Op.UPSTREAM, 0, 1)
    with pytest.raises(FrameError) as err:
        d.feed(header)  # body not sent: rejected before buffering it
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE


def test_frame_at_exact_maximum_is_accepted():
    body = b"x" * (DEFAULT_MAX_FRAME - HEADER_SIZE)
    (f,) = FrameDecoder().feed(encode(Op.UPSTREAM, body))
    assert len(f.body) == len(body)


@pytest.mark.parametrize("raw, code", [
    (HEADER.pack(12, 2, Op.PING, 0, 0), ErrorCode.UNSUPPORTED_VERSION),
    (HEADER.pack(5, 1, Op.PING, 0, 0), ErrorCode.MALFORMED_FRAME),
    (HEADER.pack(12, 1, 99, 0, 0), ErrorCode.UNKNOWN_OP),
    (HEADER.pack(12, 1, 0, 0, 0), ErrorCode.UNKNOWN_OP),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.UNSUPPORTED_VERSION),
])
def test_garbage_is_a_typed_error(raw, code):
    with pytest.raises(FrameError) as err:
        FrameDecoder().feed(raw)
    assert err.value.code == code


def test_garbage_after_good_frames_keeps_nothing_buffered():
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(encode(Op.PING) + b"\xff" * 20)
    assert d.buffered == 0


def test_random_garbage_never_raises_anything_but_frame_error():
    rng = random.Random(1)
    for _ in range(2000):
        d = FrameDecoder(max_frame=4096)
        try:
            d.feed(rng.randbytes(rng.randint(0, 64)))
        except FrameError:
            pass


def test_split_reports_consumed_bytes():
    stream = encode(Op.PING, b"", 1) + encode(Op.PING, b"", 2)[:5]
    frames, used = split(stream, 1024)
    assert len(frames) == 1 and used == 12
