"""The room's access policy at accept time: connect-rate buckets, per-address and pre-auth counts,
CIDR lists, the instance cap, and the bound on remembered addresses."""

from __future__ import annotations

import pytest

from services.common.codec import ErrorCode, FrameDecoder, Op
from services.common.config import ConfigError
from services.common.pb import client_pb2 as cpb
from services.room.access import DENIED, FULL, PER_SOURCE, PREAUTH, RATE, AccessPolicy, CidrSet, parse_ip
from services.room.config import RoomConfig
from services.room.connection import ClientConnection
from services.room.core import RoomInstance
from tests.unit.room_harness import FakeTransport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(clock, **kw) -> AccessPolicy:
    args = dict(max_connections=0, rate_per_source=0, burst_per_source=1, max_per_source=0,
                max_preauth_per_source=0, clock=clock)
    args.update(kw)
    return AccessPolicy(**args)


def test_token_bucket_allows_the_burst_then_the_rate_and_says_when_to_come_back():
    clock = Clock()
    p = policy(clock, rate_per_source=10, burst_per_source=5)
    admitted = [p.admit("10.0.0.1", 0) for _ in range(5)]
    assert all(src is not None and why is None for src, why in admitted)
    src, why = p.admit("10.0.0.1", 0)
    assert src is None and why.reason == RATE and why.code == ErrorCode.RATE_LIMITED
    assert 100 <= why.retry_after_ms <= 101  # one token at 10/s: 100 ms
    assert p.admit("10.0.0.2", 0)[1] is None  # another address has its own bucket
    clock.now += 0.1
    assert p.admit("10.0.0.1", 0)[1] is None  # one token refilled
    assert p.admit("10.0.0.1", 0)[1].reason == RATE
    clock.now += 3600
    assert sum(p.admit("10.0.0.1", 0)[1] is None for _ in range(10)) == 5  # refilled up to the burst only


def test_concurrent_and_preauth_limits_per_address_are_released_when_connections_end():
    p = policy(Clock(), max_per_source=3, max_preauth_per_source=2)
    a, _ = p.admit("10.0.0.1", 0)
    b, _ = p.admit("10.0.0.1", 0)
    assert p.admit("10.0.0.1", 0)[1].reason == PREAUTH  # two handshakes in progress already
    p.authenticated(a)
    c, _ = p.admit("10.0.0.1", 0)
    assert c is a  # one state object per address
    p.authenticated(b)
    src, why = p.admit("10.0.0.1", 0)
    assert why.reason == PER_SOURCE and why.code == ErrorCode.TOO_MANY_CONNECTIONS and why.retry_after_ms > 0
    p.released(a, preauth=False)
    assert p.admit("10.0.0.1", 0)[1] is None
    assert a.conns == 3 and a.preauth == 2


def test_instance_cap_answers_before_any_per_address_work():
    p = policy(Clock(), max_connections=10)
    assert p.admit("10.0.0.1", 9)[1] is None
    src, why = p.admit("10.0.0.9", 10)
    assert why.reason == FULL and why.code == ErrorCode.INSTANCE_FULL and why.retry_after_ms > 0
    assert "10.0.0.9" not in p.sources


@pytest.mark.parametrize("ip, allowed", [
    ("10.1.2.3", True), ("10.9.9.9", False), ("192.168.1.1", False), ("2001:db8::1", True),
    ("::ffff:10.1.2.3", True), ("2001:db9::1", False), ("127.0.0.1", False)])
def test_allow_and_deny_lists(ip, allowed):
    p = policy(Clock(), allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.9.0.0/16"])
    src, why = p.admit(ip, 0)
    assert (why is None) == allowed
    if not allowed:
        assert why.reason == DENIED and why.code == ErrorCode.ACCESS_DENIED and why.retry_after_ms > 0


def test_exempt_addresses_skip_the_per_address_limits_but_not_the_deny_list():
    p = policy(Clock(), rate_per_source=1, burst_per_source=1, max_per_source=1, max_preauth_per_source=1,
               exempt=["127.0.0.0/8"], deny=["127.0.0.9"])
    assert all(p.admit("127.0.0.1", 0)[1] is None for _ in range(100))
    assert p.admit("127.0.0.9", 0)[1].reason == DENIED
    assert p.admit("10.0.0.1", 0)[1] is None
    assert p.admit("10.0.0.1", 0)[1] is not None


def test_cidr_set_lookup():
    s = CidrSet(["192.168.0.0/16", "10.0.0.1", "fe80::/10"])
    assert s.contains("192.168.200.1") and s.contains("10.0.0.1") and s.contains("fe80::1%eth0")
    assert not s.contains("10.0.0.2") and not s.contains("not an address") and not s.contains("")
    assert parse_ip("garbage") == (-1, 0)


def test_remembered_addresses_stay_bounded_under_a_flood_of_new_ones():
    clock = Clock()
    p = policy(clock, rate_per_source=1, burst_per_source=2, max_tracked_sources=1024)
    held = [p.admit("10.0.0.1", 0)[0]]  # one address keeps a connection open
    for i in range(20_000):
        src, why = p.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0)
        assert why is None
        p.released(src, preauth=True)
        assert len(p.sources) <= 1024
    assert "10.0.0.1" in p.sources and held[0].conns == 1
    clock.now += 10
    assert p.prune() > 0 and list(p.sources) == ["10.0.0.1"]  # idle ones with full buckets forgotten


def make_room(**cfg) -> RoomInstance:
    return RoomInstance(RoomConfig(**cfg), "room-test", apps=None, backends=None, clock=Clock())


class PeerTransport(FakeTransport):
    def __init__(self, conn, ip: str) -> None:
        super().__init__(conn)
        self.ip = ip

    def get_extra_info(self, name, default=None):
        return (self.ip, 40000) if name == "peername" else default


def connect(room: RoomInstance, ip: str) -> tuple[ClientConnection, PeerTransport]:
    conn = ClientConnection()
    t = PeerTransport(conn, ip)
    conn.connection_made(t)
    return conn, t


def error_of(t: PeerTransport) -> cpb.Error | None:
    for f in FrameDecoder(1 << 20).feed(bytes(t.out)):
        if f.op == Op.ERROR:
            return cpb.Error.FromString(f.body)
    return None


def test_room_refuses_at_connect_with_error_and_retry_after_then_releases_on_close():
    room = make_room(max_connections_per_ip=2, max_preauth_per_ip=0, connect_rate_per_ip=0)
    a, ta = connect(room, "10.0.0.1")
    b, tb = connect(room, "10.0.0.1")
    c, tc = connect(room, "10.0.0.1")
    assert not ta.closed and not tb.closed and tc.closed
    err = error_of(tc)
    assert err.code == ErrorCode.TOO_MANY_CONNECTIONS and err.fatal and err.retry_after_ms > 0
    assert c not in room.connections and room.access.sources["10.0.0.1"].conns == 2
    ta.close()  # the client went away: its count is released once
    assert room.access.sources["10.0.0.1"].conns == 1 and room.access.sources["10.0.0.1"].preauth == 1
    d, td = connect(room, "10.0.0.1")
    assert not td.closed


def test_room_connection_cap_answers_instance_full():
    room = RoomInstance(RoomConfig(), "room-test", apps=None, backends=None, clock=Clock(), connection_cap=2)
    ts = [connect(room, f"10.0.0.{i}")[1] for i in range(3)]
    assert [t.closed for t in ts] == [False, False, True]
    assert error_of(ts[2]).code == ErrorCode.INSTANCE_FULL


def test_before_auth_a_frame_over_max_auth_frame_is_refused_when_its_header_arrives():
    from services.common.codec import HEADER, VERSION

    room = make_room(max_auth_frame=1024)
    conn, t = connect(room, "10.0.0.1")
    conn.data_received(HEADER.pack(2000, VERSION, Op.AUTH, 0, 1))
    assert t.closed and error_of(t).code == ErrorCode.FRAME_TOO_LARGE


def test_config_validates_access_settings():
    with pytest.raises(ConfigError, match="allow_cidrs"):
        RoomConfig(allow_cidrs=["10.0.0.0/33"]).validate()
    with pytest.raises(ConfigError, match="tls_cert"):
        RoomConfig(tls_port=7300).validate()
    with pytest.raises(ConfigError, match="max_auth_frame"):
        RoomConfig(max_auth_frame=100).validate()
    RoomConfig(deny_cidrs=["10.0.0.0/8", "::1"]).validate()
    assert RoomConfig(fd_reserve=500).connection_cap(20_000) == 19_500
    assert RoomConfig(max_connections=7).connection_cap(20_000) == 7


@pytest.mark.parametrize("code", [ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.INSTANCE_FULL,
                                  ErrorCode.ACCESS_DENIED])
def test_the_sdk_waits_out_the_retry_after_of_every_refusal_at_connect(code):
    from pylon_sdk.errors import ServerError

    err = ServerError(int(code), "refused", fatal=True, retry_after_ms=5000)
    assert err.retry_later and not err.permanent and err.code is code
