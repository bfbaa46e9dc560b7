"""ServiceClient over real discovery (Redis) and a real gRPC server, with a stopped instance
still listed: calls go through to the live one and the dead one is skipped afterwards."""

from __future__ import annotations

import grpc
import pytest

from services.common import metrics, runtime
from services.common.discovery import Discovery, Instance
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.common.rpc import ChannelPool, ServiceClient, start_server
from services.launcher import backing
from tests.stores import own_stores


class CountingSaver(pbg.SaverServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Ack(self, request, context):
        self.calls += 1
        if request.refs and request.refs[0].uid == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad ref")
        return pb.Count(n=len(request.refs))


@pytest.fixture
async def setup(backing_stores):
    cfg = own_stores(backing_stores[0], "rpc")
    redis = runtime.redis_client(cfg.redis_url)
    await redis.flushdb()
    servicer = CountingSaver()
    port = backing.free_port()
    server = await start_server(f"127.0.0.1:{port}", [(pbg.add_SaverServicer_to_server, servicer)])
    announcer = Discovery(redis, ttl_s=30)
    reader = Discovery(redis, ttl_s=3, refresh_s=60)
    pool = ChannelPool()
    live = Instance("saver", "saver-live", grpc=f"127.0.0.1:{port}")
    dead = Instance("saver", "saver-dead", grpc=f"127.0.0.1:{backing.free_port()}")  # nothing listens there
    try:
        yield announcer, reader, pool, servicer, live, dead
    finally:
        await announcer.withdraw()
        await pool.close()
        await server.stop(None)
        await redis.aclose()


def _failovers() -> float:
    return metrics.RPC_FAILOVERS.labels("saver", "Ack")._value.get()


async def test_calls_fail_over_from_a_stopped_instance_and_then_skip_it(setup):
    announcer, reader, pool, servicer, live, dead = setup
    await announcer.announce(live)
    await announcer.announce(dead)
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    assert len(await client.instances()) == 2
    before = _failovers()
    refs = pb.MessageRefs(refs=[pb.MessageRef(uid="u", app="a", msg_id=1)])
    for _ in range(30):
        assert (await client.call("Ack", refs)).n == 1
    assert servicer.calls == 30
    # the dead one was hit at most once (30 random picks all missing it: 1 in 2^30), then avoided
    assert _failovers() - before == 1


async def test_only_a_stopped_instance_is_unavailable(setup):
    announcer, reader, pool, servicer, live, dead = setup
    await announcer.announce(dead)
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    for _ in range(2):  # the second call picks the shunned instance anyway: it is the only one
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.call("Ack", pb.MessageRefs())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_answer_other_than_unavailable_is_not_tried_again(setup):
    announcer, reader, pool, servicer, live, dead = setup
    await announcer.announce(live)
    await announcer.announce(dead)
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    bad = pb.MessageRefs(refs=[pb.MessageRef(uid="bad", app="a", msg_id=1)])
    for n in range(1, 6):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.call("Ack", bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert servicer.calls == n


async def test_without_failover_the_first_failure_is_the_answer(setup):
    announcer, reader, pool, servicer, live, dead = setup
    await announcer.announce(live)
    await announcer.announce(dead)
    client = ServiceClient(reader, pool, "saver", pbg.SaverStub, deadline_s=3)
    outcomes = set()
    for _ in range(30):
        try:
            await client.call("Ack", pb.MessageRefs(), failover=False)
            outcomes.add("ok")
        except grpc.aio.AioRpcError as exc:
            outcomes.add(exc.code())
    # the dead instance answered UNAVAILABLE once (nothing tried it again), and was skipped after
    assert outcomes == {"ok", grpc.StatusCode.UNAVAILABLE}
    assert servicer.calls == 29
