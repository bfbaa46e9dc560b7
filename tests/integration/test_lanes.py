"""Lanes (services/common/lanes.py) on loopback: a real LaneServer serving a servicer, called
through generated stubs and through rpc.ServiceClient over real discovery (Redis)."""

from __future__ import annotations

import asyncio
import random
import struct

import grpc
import pytest

from services.common import lanes, logs, runtime
from services.common.discovery import Discovery, Instance
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.common.rpc import ChannelPool, ServiceClient, start_server
from services.launcher import backing
from tests.stores import own_stores


class Saver(pbg.SaverServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.ids: list[str | None] = []
        self.started = asyncio.Event()

    async def Ack(self, request, context):
        self.calls += 1
        self.ids.append(logs.REQUEST_IDS.get())
        first = request.refs[0] if request.refs else None
        if first is not None and first.uid == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad ref")
        if first is not None and first.uid == "boom":
            raise RuntimeError("handler bug")
        if first is not None and first.uid == "slow":
            self.started.set()
            await asyncio.sleep(first.msg_id / 1000)
        return pb.Count(n=len(request.refs))

    async def GetMessage(self, request, context):
        return pb.MessageState(found=True, msg_id=request.msg_id, attempts=int(context.time_remaining() > 0))


def refs(uid: str = "u", msg_id: int = 1, n: int = 1) -> pb.MessageRefs:
    return pb.MessageRefs(refs=[pb.MessageRef(uid=uid, app="a", msg_id=msg_id + i) for i in range(n)])


@pytest.fixture
async def lane():
    servicer = Saver()
    server = lanes.LaneServer([(pbg.add_SaverServicer_to_server, servicer)])
    port = await server.start("127.0.0.1")
    channel = lanes.LaneChannel(f"127.0.0.1:{port}")
    try:
        yield servicer, server, channel, pbg.SaverStub(lanes.StubChannel(channel))
    finally:
        await channel.close()
        await server.stop(0)


async def test_replies_and_errors_are_what_a_grpc_caller_sees(lane, caplog):
    servicer, _, _, stub = lane
    assert (await stub.Ack(refs(n=3), timeout=5)).n == 3
    assert (await stub.GetMessage(pb.GetMessageRequest(msg_id=9), timeout=5)).attempts == 1, "deadline known"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Ack(refs("bad"), timeout=5)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "bad ref")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Ack(refs("boom"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNKNOWN and "handler bug" in info.value.details()
    assert "lane: /pylon.internal.Saver/Ack failed" in caplog.text
    assert (await stub.Ack(refs(), timeout=5)).n == 1, "the connection outlives a failed call"


async def test_many_calls_in_flight_on_one_connection_each_get_their_own_answer(lane):
    _, server, _, stub = lane
    sizes = [random.randint(1, 40) for _ in range(300)]
    delays = [random.randint(0, 20) for _ in sizes]  # answered out of order
    replies = await asyncio.gather(*[stub.Ack(refs("slow", msg_id=d, n=n), timeout=5)
                                     for n, d in zip(sizes, delays, strict=True)])
    assert [r.n for r in replies] == sizes
    assert len(server.connections) == 1


async def test_calls_past_the_bound_per_connection_are_refused_at_once(lane, monkeypatch):
    _, _, _, stub = lane
    monkeypatch.setattr(lanes, "MAX_CALLS_PER_CONNECTION", 5)
    calls = [asyncio.ensure_future(stub.Ack(refs("slow", msg_id=300), timeout=5)) for _ in range(8)]
    done = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in done if isinstance(r, grpc.aio.AioRpcError)]
    assert [r.n for r in done if not isinstance(r, BaseException)] == [1] * 5
    assert len(refused) == 3 and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)


async def test_request_ids_reach_the_handler(lane):
    servicer, _, _, stub = lane
    await stub.Ack(refs(), timeout=5, metadata=((logs.METADATA_KEY, "req-1,req-2"),))
    await stub.Ack(refs(), timeout=5)
    assert servicer.ids == ["req-1,req-2", None]


async def test_a_deadline_passes(lane):
    _, _, _, stub = lane
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Ack(refs("slow", msg_id=2000), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unknown_methods_are_unimplemented(lane):
    _, _, channel, _ = lane
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.call(b"/pylon.internal.Saver/Nope", b"", 5, None)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_calls_in_flight_when_the_server_stops_are_unavailable_and_the_next_reconnects():
    servicer = Saver()
    server = lanes.LaneServer([(pbg.add_SaverServicer_to_server, servicer)])
    port = await server.start("127.0.0.1")
    channel = lanes.LaneChannel(f"127.0.0.1:{port}")
    stub = pbg.SaverStub(lanes.StubChannel(channel))
    try:
        call = asyncio.ensure_future(stub.Ack(refs("slow", msg_id=5000), timeout=10))
        await asyncio.wait_for(servicer.started.wait(), 5)
        await server.stop(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(lanes.LaneUnreachable):
            await stub.Ack(refs(), timeout=2)  # nothing listens: refused, nothing sent
        server = lanes.LaneServer([(pbg.add_SaverServicer_to_server, servicer)])
        await server.start("127.0.0.1", port)
        assert (await stub.Ack(refs(), timeout=5)).n == 1
    finally:
        await channel.close()
        await server.stop(0)


async def test_an_oversized_or_malformed_frame_closes_only_that_connection(lane):
    servicer, server, _, stub = lane
    host, port = "127.0.0.1", server.port
    hello = struct.pack("!I", 4) + b"PYLN"
    for junk in (struct.pack("!I", lanes.MAX_FRAME_BYTES + 1), struct.pack("!I", 3) + b"abc"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(hello + junk)
        assert await asyncio.wait_for(reader.readexactly(5), 5) == struct.pack("!I", 1) + b"\x01"  # welcomed
        assert await asyncio.wait_for(reader.read(100), 5) == b"", "closed by the server"
        writer.close()
    assert (await stub.Ack(refs(), timeout=5)).n == 1


async def test_a_lane_that_is_not_the_one_announced_is_never_called():
    """The lane's address now belongs to another instance (a restart, a reused port): the
    greeting fails, nothing is called, and the caller hears LaneUnreachable (rpc: over gRPC)."""
    servicer = Saver()
    server = lanes.LaneServer([(pbg.add_SaverServicer_to_server, servicer)], identity="10.0.0.1:7300")
    port = await server.start("127.0.0.1")
    wrong = lanes.LaneChannel(f"127.0.0.1:{port}", expect="10.0.0.2:7300")
    right = lanes.LaneChannel(f"127.0.0.1:{port}", expect="10.0.0.1:7300")
    try:
        with pytest.raises(lanes.LaneUnreachable, match="not the lane of 10.0.0.2:7300"):
            await pbg.SaverStub(lanes.StubChannel(wrong)).Ack(refs(), timeout=5)
        assert servicer.calls == 0
        assert (await pbg.SaverStub(lanes.StubChannel(right)).Ack(refs(), timeout=5)).n == 1
    finally:
        await wrong.close()
        await right.close()
        await server.stop(0)


async def test_a_peer_that_never_greets_is_unreachable_and_its_connection_closed():
    closed = asyncio.Event()

    async def silent(reader, writer):
        await reader.read()  # takes the greeting, answers nothing, reads until the caller hangs up
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    channel = lanes.LaneChannel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(lanes.LaneUnreachable, match="no connection within"):
            await pbg.SaverStub(lanes.StubChannel(channel)).Ack(refs(), timeout=0.3)
        await asyncio.wait_for(closed.wait(), 5)  # the caller closed the connection it gave up on
        assert channel._conn is None and channel._connecting is None
    finally:
        await channel.close()
        server.close()


async def test_a_connection_that_does_not_greet_is_closed(lane):
    servicer, server, _, stub = lane
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(struct.pack("!IIIHH", 20, 1, 1000, 4, 0) + b"/x/y")  # a call without the greeting
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    assert servicer.calls == 0 and (await stub.Ack(refs(), timeout=5)).n == 1


@pytest.fixture
async def discovered(backing_stores):
    cfg = own_stores(backing_stores[0], "rpc")
    redis = runtime.redis_client(cfg.redis_url)
    await redis.flushdb()
    servicer = Saver()
    port = backing.free_port()
    servers = await start_server(f"127.0.0.1:{port}", [(pbg.add_SaverServicer_to_server, servicer)])
    announcer = Discovery(redis, ttl_s=30)
    reader = Discovery(redis, ttl_s=3, refresh_s=60)
    try:
        yield announcer, reader, servers, servicer, port
    finally:
        await announcer.withdraw()
        await servers.stop(None)
        await redis.aclose()


async def test_service_client_calls_the_announced_lane(discovered):
    announcer, reader, servers, servicer, port = discovered
    assert servers.lane_port and servers.lane_port != port
    await announcer.announce(Instance("saver", "s1", grpc=f"127.0.0.1:{port}",
                                      lane=servers.lane_address("127.0.0.1")))
    pool = ChannelPool()
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    try:
        for _ in range(5):
            assert (await client.call("Ack", refs())).n == 1
        assert len(servers.lane.connections) == 1, "the calls went over the lane"
        assert servicer.calls == 5
    finally:
        await pool.close()


async def test_a_lane_that_cannot_be_reached_leaves_the_call_to_grpc(discovered):
    announcer, reader, servers, servicer, port = discovered
    await announcer.announce(Instance("saver", "s1", grpc=f"127.0.0.1:{port}",
                                      lane=f"127.0.0.1:{backing.free_port()}"))  # nothing listens there
    pool = ChannelPool()
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    try:
        for _ in range(3):
            assert (await client.call("Ack", refs())).n == 1
        assert servicer.calls == 3 and not servers.lane.connections, "over gRPC"
    finally:
        await pool.close()


async def test_without_lanes_every_call_is_grpc(discovered):
    announcer, reader, servers, servicer, port = discovered
    await announcer.announce(Instance("saver", "s1", grpc=f"127.0.0.1:{port}",
                                      lane=servers.lane_address("127.0.0.1")))
    pool = ChannelPool(use_lanes=False)
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    try:
        assert (await client.call("Ack", refs())).n == 1
        assert not servers.lane.connections
    finally:
        await pool.close()
