"""The room's ack batches ride out a short saver outage instead of dropping the acks."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb import internal_pb2 as ipb
from services.common.rpc import ChannelPool, NoInstanceError
from services.room import backends as rb
from services.room.config import RoomConfig


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


class FlakySaver:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls: list[tuple[str, int]] = []

    async def call(self, method, request, **_kw):
        self.calls.append((method, len(request.refs)))
        if self.failures:
            raise self.failures.pop(0)
        return ipb.Count(n=len(request.refs))


@pytest.fixture
def room_backends(monkeypatch):
    monkeypatch.setattr(rb, "ACK_RETRY_PAUSES_S", (0.01, 0.01, 0.01))
    return rb.RoomBackends(discovery=None, pool=ChannelPool(), cfg=RoomConfig(), deadline_s=1)


REFS = [ipb.MessageRef(uid="u", app="a", msg_id=i) for i in (1, 2)]


async def test_acks_are_sent_again_after_unavailable_and_no_instance(room_backends):
    saver = room_backends.saver_client = FlakySaver(
        [rpc_error(grpc.StatusCode.UNAVAILABLE), NoInstanceError("none"), rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)])
    await room_backends._ack(REFS)
    assert saver.calls == [("Ack", 2)] * 4


async def test_a_longer_outage_fails_the_batch_after_the_last_try(room_backends):
    saver = room_backends.saver_client = FlakySaver([rpc_error(grpc.StatusCode.UNAVAILABLE)] * 5)
    with pytest.raises(grpc.aio.AioRpcError):
        await room_backends._ack(REFS)
    assert len(saver.calls) == 4


async def test_a_refused_ack_is_not_sent_again(room_backends):
    saver = room_backends.saver_client = FlakySaver([rpc_error(grpc.StatusCode.INVALID_ARGUMENT)])
    with pytest.raises(grpc.aio.AioRpcError):
        await room_backends._ack(REFS)
    assert len(saver.calls) == 1
