"""Property tests of the frame codec: whatever bytes arrive, in whatever pieces, the decoder
yields the frames a reference reading of the whole stream finds, then raises FrameError with the
code for the first bad header, and nothing else. (A feed that meets a bad header raises at once;
frames earlier in that same feed are not returned: the error is fatal and the connection closes.)

Examples are derandomized (fixed seed, no example database) so CI runs the same cases every time.
"""

from __future__ import annotations

import struct

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.codec import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    VERSION,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    Op,
    encode,
    split,
)
from services.common.pb import client_pb2 as cpb

PROPERTY = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SMALL_MAX = 512  # a small max_frame so that "too large" lengths are cheap to generate

# every op's body message (DESIGN.md §3 table)
BODY_OF_OP = {
    Op.AUTH: cpb.Auth, Op.AUTH_OK: cpb.AuthOk, Op.PING: cpb.Ping, Op.PONG: cpb.Pong, Op.PUSH: cpb.Push,
    Op.ACK: cpb.Ack, Op.BIND: cpb.Bind, Op.UNBIND: cpb.Bind, Op.UPSTREAM: cpb.Upstream,
    Op.UPSTREAM_ACK: cpb.UpstreamAck, Op.KICK: cpb.Kick, Op.COMMAND: cpb.Command, Op.ERROR: cpb.Error,
}

ops = st.sampled_from(list(Op))
frames = st.builds(
    Frame,
    op=ops,
    seq=st.integers(0, 0xFFFFFFFF),
    body=st.binary(max_size=SMALL_MAX - HEADER_SIZE),
    flags=st.integers(0, 0xFFFF),
)


def reference(stream: bytes, max_frame: int) -> tuple[list[Frame], ErrorCode | None]:
    """The frames of ``stream`` read the slow, obvious way, and the error that stops it (if any)."""
    out: list[Frame] = []
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        length, ver, op, flags, seq = struct.unpack(">IBBHI", stream[pos : pos + HEADER_SIZE])
        if ver != VERSION:
            return out, ErrorCode.UNSUPPORTED_VERSION
        if length < HEADER_SIZE:
            return out, ErrorCode.MALFORMED_FRAME
        if length > max_frame:
            return out, ErrorCode.FRAME_TOO_LARGE
        if op not in {int(o) for o in Op}:
            return out, ErrorCode.UNKNOWN_OP
        if len(stream) - pos < length:
            break
        out.append(Frame(op, seq, stream[pos + HEADER_SIZE : pos + length], flags))
        pos += length
    return out, None


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def assert_prefix_then_error(got, error, expected, expected_error):
    if error is None:
        assert got == expected and expected_error is None
    else:
        assert got == expected[: len(got)]
        assert error == expected_error


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> tuple[list[Frame], ErrorCode | None]:
    got: list[Frame] = []
    for chunk in chunks:
        try:
            got.extend(decoder.feed(chunk))
        except FrameError as exc:
            assert isinstance(exc.code, ErrorCode) and exc.message
            return got, exc.code
    return got, None


@PROPERTY
@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 1 << 16), max_size=20))
def test_valid_streams_split_anywhere_give_back_every_frame(sent, cuts):
    stream = b"".join(encode(f.op, f.body, f.seq, f.flags) for f in sent)
    decoder = FrameDecoder(SMALL_MAX)
    got, error = feed_all(decoder, pieces(stream, cuts))
    assert error is None
    assert got == sent
    assert decoder.buffered == 0


@PROPERTY
@given(st.lists(frames, min_size=1, max_size=6), st.integers(1, SMALL_MAX))
def test_a_truncated_stream_holds_the_incomplete_frame(sent, drop):
    stream = b"".join(encode(f.op, f.body, f.seq, f.flags) for f in sent)
    cut = stream[: max(0, len(stream) - drop)]
    decoder = FrameDecoder(SMALL_MAX)
    got = decoder.feed(cut)
    expected, error = reference(cut, SMALL_MAX)
    assert error is None and got == expected
    assert decoder.buffered == len(cut) - sum(HEADER_SIZE + len(f.body) for f in got)
    assert decoder.buffered < SMALL_MAX


@PROPERTY
@given(st.binary(max_size=2048), st.lists(st.integers(0, 1 << 12), max_size=30))
def test_garbage_yields_the_reference_frames_or_its_error(garbage, cuts):
    expected, expected_error = reference(garbage, SMALL_MAX)
    got, error = feed_all(FrameDecoder(SMALL_MAX), pieces(garbage, cuts))
    assert_prefix_then_error(got, error, expected, expected_error)


@PROPERTY
@given(st.lists(frames, max_size=5), st.binary(min_size=1, max_size=300), st.lists(frames, max_size=5),
       st.lists(st.integers(0, 1 << 13), max_size=20))
def test_garbage_between_valid_frames(before, garbage, after, cuts):
    stream = b"".join(encode(f.op, f.body, f.seq, f.flags) for f in before) + garbage + b"".join(
        encode(f.op, f.body, f.seq, f.flags) for f in after)
    expected, expected_error = reference(stream, SMALL_MAX)
    assert expected[: len(before)] == before
    # one frame per feed: nothing is lost to a later bad header in the same chunk
    got, error = feed_all(FrameDecoder(SMALL_MAX), [encode(f.op, f.body, f.seq, f.flags) for f in before])
    assert (got, error) == (before, None)
    got, error = feed_all(FrameDecoder(SMALL_MAX), pieces(stream, cuts))
    assert_prefix_then_error(got, error, expected, expected_error)


lengths = st.one_of(
    st.integers(0, HEADER_SIZE + 1),  # tiny: shorter than the header, empty body, one byte
    st.integers(SMALL_MAX - 1, SMALL_MAX + 1),  # around the limit
    st.integers(SMALL_MAX + 2, 0xFFFFFFFF),  # huge, up to the largest u32
    st.just(0xFFFFFFFF),
)


@PROPERTY
@given(lengths, ops, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
def test_huge_and_tiny_lengths_are_refused_on_the_header_alone(length, op, flags, seq):
    header = struct.pack(">IBBHI", length, VERSION, op, flags, seq)
    decoder = FrameDecoder(SMALL_MAX)
    try:
        got = decoder.feed(header)
    except FrameError as exc:
        expected = ErrorCode.MALFORMED_FRAME if length < HEADER_SIZE else ErrorCode.FRAME_TOO_LARGE
        assert exc.code == expected
        assert decoder.buffered == 0  # nothing kept after a fatal error
        return
    assert HEADER_SIZE <= length <= SMALL_MAX
    if length == HEADER_SIZE:
        assert got == [Frame(op, seq, b"", flags)]
    else:
        assert got == [] and decoder.buffered == HEADER_SIZE  # waits for the body, never more than max_frame


@PROPERTY
@given(st.integers(0, 255).filter(lambda v: v != VERSION), st.integers(0, 255), st.integers(0, 0xFFFFFFFF))
def test_other_versions_and_unknown_ops(ver, op, length):
    header = struct.pack(">IBBHI", length, ver, op, 0, 0)
    try:
        split(header, DEFAULT_MAX_FRAME)
    except FrameError as exc:
        assert exc.code == ErrorCode.UNSUPPORTED_VERSION
    else:
        raise AssertionError("a frame of another version was accepted")
    header = struct.pack(">IBBHI", HEADER_SIZE, VERSION, op, 0, 0)
    if op in {int(o) for o in Op}:
        assert split(header, DEFAULT_MAX_FRAME) == ([Frame(op, 0, b"")], HEADER_SIZE)
    else:
        try:
            split(header, DEFAULT_MAX_FRAME)
        except FrameError as exc:
            assert exc.code == ErrorCode.UNKNOWN_OP
        else:
            raise AssertionError(f"unknown op {op} was accepted")


@PROPERTY
@given(ops, st.binary(max_size=SMALL_MAX - HEADER_SIZE), st.integers(0, 0xFFFFFFFF))
def test_every_op_with_a_random_body_frames_and_parses_or_raises_decode_error(op, body, seq):
    (frame,) = FrameDecoder(SMALL_MAX).feed(encode(op, body, seq))
    assert frame == Frame(op, seq, body)
    # the room catches DecodeError around every body parse; nothing else may come out of it
    try:
        BODY_OF_OP[op].FromString(frame.body)
    except DecodeError:
        pass


@PROPERTY
@given(st.data())
def test_every_op_with_a_valid_random_message_round_trips(data):
    op = data.draw(ops)
    cls = BODY_OF_OP[op]
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        name = field.name
        if field.type == field.TYPE_STRING:
            value = st.text(max_size=20)
        elif field.type == field.TYPE_BYTES:
            value = st.binary(max_size=40)
        elif field.type == field.TYPE_BOOL:
            value = st.booleans()
        elif field.type in (field.TYPE_UINT32, field.TYPE_FIXED32):
            value = st.integers(0, 0xFFFFFFFF)
        elif field.type in (field.TYPE_UINT64, field.TYPE_FIXED64):
            value = st.integers(0, 0xFFFFFFFFFFFFFFFF)
        else:
            continue  # sub-messages (Push.messages) are covered by the random-bytes test
        if field.is_repeated:
            getattr(msg, name).extend(data.draw(st.lists(value, max_size=4)))
        else:
            setattr(msg, name, data.draw(value))
    body = msg.SerializeToString()
    (frame,) = FrameDecoder().feed(encode(op, body, 7))
    assert cls.FromString(frame.body) == msg
