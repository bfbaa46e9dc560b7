"""PushService with fake saver/register/room clients: concurrent pushes share their calls, and
each request still gets its own ids, counts and failures."""

import asyncio

import grpc
import pytest

from services.center.errors import BackendUnavailable, InvalidRequest
from services.center.push import PushService
from services.center.ratelimit import RateLimiter
from services.center.telemetry import Tally
from services.common.apps import App
from services.common.discovery import Instance
from services.common.ids import IdGenerator
from services.common.pb import internal_pb2 as pb

APP = App(id="a", secret="s")


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code, details="") -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeDiscovery:
    def __init__(self, instances) -> None:
        self._instances = instances

    async def instances(self, service, fresh=False):
        return self._instances


class FakeClient:
    """Records calls; ``answer(method, request, target)`` makes the reply (or raises)."""

    def __init__(self, service, answer, instances=()) -> None:
        self.service = service
        self.answer = answer
        self.calls: list[tuple[str, object, str | None]] = []
        self.discovery = FakeDiscovery(list(instances))
        self.delay = 0.005

    async def instances(self):
        return await self.discovery.instances(self.service)

    async def call(self, method, request, target=None, deadline_s=None, failover=True):
        self.calls.append((method, request, target))
        await asyncio.sleep(self.delay)
        return self.answer(method, request, target)


def make_service(store_answer=None, sessions=None, room_answer=None):
    """``sessions``: uid -> room instance ids holding a session bound to APP."""
    sessions = sessions or {}

    def store(method, req, target):
        return (store_answer or (lambda r: pb.StoreReply(seqs=[1] * len(r.messages))))(req)

    def lookup(method, req, target):
        return pb.LookupReply(users=[pb.UserSessions(uid=u, sessions=[
            pb.Session(uid=u, session_id=f"{u}-{i}", instance=inst, apps=["a"])
            for i, inst in enumerate(sessions.get(u, []))]) for u in req.uids])

    def room(method, req, target):
        return (room_answer or (lambda r, t: pb.PushReply(delivered=len(r.messages))))(req, target)

    rooms = [Instance(service="room", id=f"room-{k}", host="h", port=1, grpc=f"h:{k}") for k in "AB"]
    saver = FakeClient("saver", store)
    register = FakeClient("register", lookup)
    room_client = FakeClient("room", room, rooms)
    svc = PushService(ids=IdGenerator(1), saver=saver, register=register, rooms=room_client, limiter=RateLimiter(),
                      tally=Tally())
    return svc, saver, register, room_client


async def test_concurrent_single_message_pushes_share_their_calls_and_keep_their_own_answers():
    uids = [f"u{i}" for i in range(100)]
    svc, saver, register, rooms = make_service(sessions={u: ["room-A" if i % 2 else "room-B"]
                                                         for i, u in enumerate(uids)})
    results = await asyncio.gather(*(svc.push(APP, [u], f"p{u}".encode(), 60) for u in uids))
    # 100 requests: 300 RPCs before; a few now (the first leaves alone, the rest gather behind it)
    assert len(saver.calls) <= 5 and len(register.calls) <= 5 and len(rooms.calls) <= 10, \
        (len(saver.calls), len(register.calls), len(rooms.calls))
    stored = [m for _, req, _ in saver.calls for m in req.messages]
    assert sorted(m.uid for m in stored) == sorted(uids)
    for u, r in zip(uids, results, strict=True):
        assert len(r.msg_ids) == 1 and r.online == 1 and r.delivered == 1 and r.room_failures == 0
        (m,) = [m for m in stored if m.msg_id == r.msg_ids[0]]
        assert m.uid == u and m.payload == f"p{u}".encode()
    assert len({r.msg_ids[0] for r in results}) == 100


async def test_batch_form_entry_point_keeps_ids_in_order_with_payload_and_ttl_per_message():
    svc, saver, _, _ = make_service()
    msgs = [(f"u{i % 3}", f"m{i}".encode(), 10 + i) for i in range(10)]
    r = await svc.push_messages(APP, msgs)
    stored = {m.msg_id: m for _, req, _ in saver.calls for m in req.messages}
    assert [(stored[i].uid, stored[i].payload, stored[i].ttl_s) for i in r.msg_ids] == msgs
    assert r.msg_ids == sorted(r.msg_ids)


async def test_a_failed_store_fails_exactly_the_requests_it_carried():
    calls = []

    def store_answer(req):
        calls.append([m.uid for m in req.messages])
        if len(calls) == 1:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "saver down")
        return pb.StoreReply(seqs=[1] * len(req.messages))

    svc, saver, _, _ = make_service(store_answer=store_answer)
    first = asyncio.ensure_future(svc.push(APP, ["x1"], b"p", 60))   # leaves alone, fails
    await asyncio.sleep(0.001)
    later = [asyncio.ensure_future(svc.push(APP, [f"y{i}"], b"p", 60)) for i in range(5)]  # gather behind it
    with pytest.raises(BackendUnavailable):
        await first
    for t in later:
        assert len((await t).msg_ids) == 1
    assert calls[0] == ["x1"] and sorted(calls[1]) == [f"y{i}" for i in range(5)]


async def test_a_shared_store_refused_as_invalid_is_retried_per_request_so_only_the_bad_one_is_400():
    def store_answer(req):
        if any(m.payload == b"bad" for m in req.messages):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "payload refused")
        return pb.StoreReply(seqs=[1] * len(req.messages))

    svc, saver, _, _ = make_service(store_answer=store_answer)
    saver.delay = 0.02
    blocker = asyncio.ensure_future(svc.push(APP, ["z"], b"ok", 60))
    await asyncio.sleep(0.001)
    good = asyncio.ensure_future(svc.push(APP, ["g"], b"ok", 60))
    bad = asyncio.ensure_future(svc.push(APP, ["b"], b"bad", 60))
    await blocker
    assert len((await good).msg_ids) == 1
    with pytest.raises(InvalidRequest):
        await bad


async def test_a_failed_room_only_delays_delivery_for_the_requests_on_that_room():
    def room_answer(req, target):
        if target == "h:A":
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "room gone")
        return pb.PushReply(delivered=len(req.messages))

    svc, _, _, _ = make_service(sessions={"a1": ["room-A"], "b1": ["room-B"], "ab": ["room-A", "room-B"]},
                                room_answer=room_answer)
    ra, rb, rab = await asyncio.gather(svc.push(APP, ["a1"], b"p", 60), svc.push(APP, ["b1"], b"p", 60),
                                       svc.push(APP, ["ab"], b"p", 60))
    assert (ra.delivered, ra.room_failures, ra.online) == (0, 1, 1)
    assert (rb.delivered, rb.room_failures) == (1, 0)
    assert (rab.delivered, rab.room_failures) == (1, 1)


async def test_a_failed_lookup_still_answers_with_the_stored_ids():
    svc, _, register, _ = make_service()

    def down(method, req, target):
        raise RpcError(grpc.StatusCode.UNAVAILABLE, "register down")

    register.answer = down
    r = await svc.push(APP, ["u1", "u2"], b"p", 60)
    assert len(r.msg_ids) == 2 and r.online == 0 and r.delivered == 0
    assert svc.tally.lookup_failures == 1


async def test_deliveries_a_room_reports_short_are_credited_in_order():
    svc, _, _, _ = make_service(sessions={"u1": ["room-A"], "u2": ["room-A"]},
                                room_answer=lambda req, t: pb.PushReply(delivered=1))
    r1, r2 = await asyncio.gather(svc.push(APP, ["u1"], b"p", 60), svc.push(APP, ["u2"], b"p", 60))
    assert r1.delivered + r2.delivered == 1 or (r1.delivered, r2.delivered) == (1, 1)  # one call or two
