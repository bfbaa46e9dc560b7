"""Dispatcher as a real process, reading room instances that the test announces through Discovery.

Uses its own Redis database so that rooms of other test modules never show up in the answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from services.common import runtime
from services.common.discovery import Discovery, Instance
from services.dispatcher import routing
from services.launcher import backing, procs
from tests.stores import own_stores


@dataclasses.dataclass
class Dispatcher:
    url: str
    proc: procs.ServiceProcess


@pytest.fixture(scope="module")
def dispatcher(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "dispatcher")
    port = backing.free_port()
    proc = procs.start("dispatcher-it", ["dispatcher", "--host", "127.0.0.1", "--port", str(port)],
                       procs.common_env(common), f"{tmp}/dispatcher-it", wait_for=[("127.0.0.1", port)])
    try:
        yield Dispatcher(f"http://127.0.0.1:{port}", proc), common
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


@pytest.fixture
async def rooms(dispatcher):
    """Announce fake room instances; withdrawn after the test."""
    _, common = dispatcher
    client = runtime.redis_client(common.redis_url)
    discovery = Discovery(client, ttl_s=30)

    async def announce(*instances: Instance) -> None:
        for inst in instances:
            await discovery.announce(inst)

    yield announce
    await discovery.withdraw()
    await discovery.close()
    await client.aclose()


def room(n: int, region: str = "eu", load: int = 0, capacity: int = 1000, nets=(), draining=False,
         host: str = "10.9.0.1") -> Instance:
    return Instance(service="room", id=f"room-{host}:{7000 + n}", host=host, port=7000 + n,
                    grpc=f"{host}:{8000 + n}", region=region, load=load, capacity=capacity, nets=list(nets),
                    draining=draining)


async def get(d: Dispatcher, **params):
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/v1/route", params=params) as r:
            assert r.headers["Content-Type"].startswith("application/json")
            return r.status, await r.json()


async def wait_rooms(d: Dispatcher, n: int, **params):
    """The dispatcher caches discovery for refresh_s: poll until it sees ``n`` rooms."""
    deadline = time.monotonic() + 5
    while True:
        status, body = await get(d, uid="probe", count="32", **params)
        if status == 200 and len(body["rooms"]) == n:
            return
        assert time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.1)


def addr(r) -> str:
    return f"{r['host']}:{r['port']}"


async def test_no_rooms_is_503_json(dispatcher):
    d, _ = dispatcher
    status, body = await get(d, uid="alice")
    assert status == 503 and body["error"]["code"] == "no_rooms" and body["error"]["message"]


@pytest.mark.parametrize("params, code", [
    ({}, "missing_uid"),
    ({"uid": ""}, "missing_uid"),
    ({"uid": "x" * 200}, "bad_uid"),
    ({"uid": "u", "count": "zero"}, "bad_count"),
    ({"uid": "u", "exclude": ",".join(f"h:{i}" for i in range(100))}, "bad_exclude"),
])
async def test_bad_queries_are_400_json(dispatcher, params, code):
    d, _ = dispatcher
    status, body = await get(d, **params)
    assert status == 400 and body["error"]["code"] == code


async def test_sticky_first_then_by_load(dispatcher, rooms):
    d, _ = dispatcher
    instances = [room(0, load=700), room(1, load=100), room(2, load=400, host="10.9.0.2"), room(3, load=0),
                 room(4, load=900, host="10.9.0.2")]
    await rooms(*instances)
    await wait_rooms(d, 5)
    for user in ("alice", "bob", "carol", "dave"):
        status, body = await get(d, uid=user)
        assert status == 200, body
        got = body["rooms"]
        want = routing.choose(instances, routing.RouteQuery(uid=user)).rooms
        assert [r["instance"] for r in got] == [w.id for w in want]
        assert got[0]["host"] and got[0]["port"] and got[0]["instance"].startswith("room-")
        loads = {i.id: i.load for i in instances}
        rest = [loads[r["instance"]] for r in got[1:]]
        assert rest == sorted(rest)
        _, again = await get(d, uid=user)
        assert again["rooms"] == got
    status, body = await get(d, uid="alice", count="2")
    assert len(body["rooms"]) == 2


async def test_exclude_and_draining(dispatcher, rooms):
    d, _ = dispatcher
    await rooms(room(0), room(1), room(2), room(3, draining=True))
    await wait_rooms(d, 3)
    _, body = await get(d, uid="erin")
    assert room(3).id not in {r["instance"] for r in body["rooms"]}
    first = addr(body["rooms"][0])
    _, body2 = await get(d, uid="erin", exclude=first)
    assert first not in {addr(r) for r in body2["rooms"]} and len(body2["rooms"]) == 2
    everything = ",".join(addr(r) for r in body["rooms"])
    _, body3 = await get(d, uid="erin", exclude=everything)
    assert body3["all_excluded"] is True and len(body3["rooms"]) == 3


async def test_region_filter_and_fallback(dispatcher, rooms):
    d, _ = dispatcher
    eu = [room(0, region="eu"), room(1, region="eu")]
    us = [room(10, region="us", host="10.9.1.1"), room(11, region="us", host="10.9.1.1")]
    await rooms(*eu, *us)
    await wait_rooms(d, 4)
    _, body = await get(d, uid="frank", region="us")
    assert {r["region"] for r in body["rooms"]} == {"us"} and body["region_fallback"] is False
    _, body = await get(d, uid="frank", region="us", exclude=addr({"host": us[0].host, "port": us[0].port}))
    assert [r["instance"] for r in body["rooms"]] == [us[1].id]
    every_us = ",".join(f"{r.host}:{r.port}" for r in us)
    _, body = await get(d, uid="frank", region="us", exclude=every_us)
    assert {r["region"] for r in body["rooms"]} == {"eu"} and body["region_fallback"] is True
    _, body = await get(d, uid="frank", region="antarctica")
    assert len(body["rooms"]) == 4 and body["region_fallback"] is True


async def test_net_filter(dispatcher, rooms):
    d, _ = dispatcher
    await rooms(room(0, nets=["wifi"]), room(1, nets=["cellular"]), room(2))
    await wait_rooms(d, 3)
    _, body = await get(d, uid="gina", net="cellular")
    assert {r["instance"] for r in body["rooms"]} == {room(1).id, room(2).id}


async def test_health_and_metrics(dispatcher):
    d, _ = dispatcher
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
        async with s.get(d.url + "/metrics") as r:
            text = await r.text()
            assert r.status == 200 and 'pylon_dispatcher_http_requests_total{route="/v1/route",status="200"}' in text
        async with s.get(d.url + "/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.post(d.url + "/v1/route") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_batch_routes_match_single_routes(dispatcher, rooms):
    d, _ = dispatcher
    await rooms(room(1), room(2), room(3))
    await wait_rooms(d, 3)
    uids = [f"user-{i}" for i in range(50)]
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/routes", json={"uids": uids, "count": 2}) as r:
            assert r.status == 200
            routes = (await r.json())["routes"]
        for uid in uids[:10]:
            status, body = await get(d, uid=uid, count="2")
            assert status == 200 and routes[uid] == body["rooms"]
        for bad in (b"{oops", b'{"uids": "x"}', b'{"uids": [1]}', b'{"uids": []}'):
            async with s.post(d.url + "/v1/routes", data=bad) as r:
                assert r.status == 400 and (await r.json())["error"]["message"]
        # one bad uid or a bad shared parameter refuses the whole batch, with the query's own codes
        for bad, code in (({"uids": ["ok", ""]}, "missing_uid"), ({"uids": ["ok", "a\x01b"]}, "bad_uid"),
                          ({"uids": ["ok"], "count": "x"}, "bad_count"),
                          ({"uids": ["ok"], "exclude": ",".join(["h:1"] * 65)}, "bad_exclude")):
            async with s.post(d.url + "/v1/routes", json=bad) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == code
