"""Messages stored whose lookup or room call failed are tried again with backoff, bounded."""

from services.center import redelivery as rd
from services.center.redelivery import Redelivery
from services.common.pb import internal_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def msg(i: int, size: int = 10) -> pb.StoredMessage:
    return pb.StoredMessage(msg_id=i, uid=f"u{i}", app="a", payload=b"x" * size)


async def test_failed_messages_are_tried_again_with_growing_pauses_until_they_pass():
    clock = Clock()
    tries: list[list[int]] = []
    failing = {1}

    async def deliver(messages):
        tries.append([m.msg_id for m in messages])
        return [m for m in messages if m.msg_id in failing]

    r = Redelivery(deliver, clock=clock)
    r.add([msg(1), msg(2)])
    assert await r.run_due() == 0, "not before the first pause"
    clock.now = rd.PAUSES_S[0]
    assert await r.run_due() == 2 and tries == [[1, 2]]
    assert len(r) == 1, "the one that failed again waits"
    clock.now += rd.PAUSES_S[0]
    assert await r.run_due() == 0, "the second pause is longer"
    clock.now += rd.PAUSES_S[1]
    failing.clear()
    assert await r.run_due() == 1 and tries[-1] == [1] and len(r) == 0
    await r.close()


async def test_a_message_is_left_to_the_inbox_after_max_age_and_past_the_bounds():
    clock = Clock()

    async def deliver(messages):
        return list(messages)  # never gets through

    r = Redelivery(deliver, max_age_s=5, max_messages=2, clock=clock)
    r.add([msg(1), msg(2), msg(3)])
    assert len(r) == 2, "bounded in messages"
    for _ in range(10):
        clock.now += 30
        await r.run_due()
    assert len(r) == 0, "given up after max_age_s: the inbox has them for the next connect"
    r2 = Redelivery(deliver, max_bytes=15, clock=clock)
    r2.add([msg(1, 10), msg(2, 10)])
    assert len(r2) == 1, "bounded in bytes"
    await r.close()
    await r2.close()


async def test_a_deliver_that_raises_counts_as_all_failed():
    clock = Clock()
    calls = []

    async def deliver(messages):
        calls.append(len(messages))
        raise ConnectionError("register away")

    r = Redelivery(deliver, clock=clock)
    r.add([msg(1)])
    clock.now = 1
    await r.run_due()
    assert calls == [1] and len(r) == 1
    await r.close()
