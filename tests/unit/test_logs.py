"""Log formats and request ids: the formatters, the id bounds, a tagged batch, and a real gRPC
call whose server-side handler and log lines see the caller's ids."""

import asyncio
import io
import json
import logging

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.center.http_api import request_id_middleware
from services.common import config, logs, rpc
from services.common.batching import Batcher
from services.launcher.backing import free_port


def _capture(log_format: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("saver", log_format))
    handler.addFilter(logs._ContextFilter())
    logger = logging.getLogger(f"test_logs.{log_format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_lines_carry_the_fields_extras_ids_and_traceback():
    logger, stream = _capture("json")
    logs.set_instance("saver-127.0.0.1:7300")
    token = logs.REQUEST_IDS.set("a1-1,b2-7,+3")
    try:
        logger.warning("store of %d messages failed", 5, extra={"app": "demo", "n": 5})
        try:
            raise ValueError("boom \"quoted\"\nsecond line")
        except ValueError:
            logger.exception("bug")
    finally:
        logs.REQUEST_IDS.reset(token)
    logger.info("later")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the traceback is inside its line, not lines of its own
    first, second, third = (json.loads(line) for line in lines)
    assert first["level"] == "WARNING" and first["service"] == "saver"
    assert first["instance"] == "saver-127.0.0.1:7300" and first["logger"] == "test_logs.json"
    assert first["message"] == "store of 5 messages failed"
    assert first["app"] == "demo" and first["n"] == 5
    assert first["request_ids"] == ["a1-1", "b2-7", "+3"]
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert isinstance(first["pid"], int)
    assert "traceback" not in first
    assert second["traceback"].startswith("Traceback") and "boom" in second["traceback"]
    assert "request_ids" not in third and "request_id" not in third


def test_text_lines_stay_as_before_and_name_the_request_at_the_end():
    logger, stream = _capture("text")
    logger.info("plain")
    token = logs.REQUEST_ID.set("abc-1")
    try:
        logger.info("with id")
    finally:
        logs.REQUEST_ID.reset(token)
    plain, with_id = stream.getvalue().splitlines()
    assert plain.endswith(" INFO saver test_logs.text: plain")
    assert with_id.endswith("test_logs.text: with id request_id=abc-1")


def test_config_takes_the_format_from_env_and_refuses_others():
    common = config.build(config.CommonConfig, "pylon", {}, {"PYLON_LOG_FORMAT": "json"})
    assert common.log_format == "json"
    assert config.build(config.CommonConfig, "pylon", {}, {}).log_format == "text"
    with pytest.raises(config.ConfigError, match="pylon.log_format"):
        config.build(config.CommonConfig, "pylon", {"log_format": "xml"}, {})


@pytest.mark.parametrize("value, ok", [
    ("req-1", True), ("6f1c2d3e-0b9a-4c5d-8e7f-112233445566", True), ("a" * 64, True), ("a" * 65, False),
    ("", False), (None, False), ("two words", False), ("a,b", False), ("x\r\ny", False), ("é", False),
])
def test_a_callers_request_id_is_taken_only_when_sane(value, ok):
    assert (logs.sane_request_id(value) is not None) is ok


def test_joined_ids_are_distinct_bounded_and_count_the_rest():
    a, b = "a" * 10, "b" * 10
    assert logs.join_ids([None, None]) is None
    assert logs.join_ids([a, a, None, b, a, b]) == f"{a},{b}"
    many = [f"r{i}" for i in range(logs.MAX_IDS + 5)]
    joined = logs.join_ids(many)
    assert joined.split(",") == many[:logs.MAX_IDS] + ["+5"]
    long_tags = ["x" * 600, "y" * 600, "z" * 600]  # ids of incoming calls, re-batched
    joined = logs.join_ids(long_tags)
    assert joined == "x" * 600 + ",+2" and len(joined) <= logs.MAX_METADATA_CHARS
    assert logs.incoming_ids([("user-agent", "grpc"), (logs.METADATA_KEY, "a,b")]) == "a,b"
    assert logs.incoming_ids([(logs.METADATA_KEY, "x" * (logs.MAX_METADATA_CHARS + 1))]) is None
    assert logs.incoming_ids(None) is None


async def test_a_tagged_batch_flushes_with_the_ids_of_every_request_it_carries():
    seen = []

    async def flush(items):
        seen.append((logs.REQUEST_IDS.get(), logs.REQUEST_ID.get(), list(items)))
        return items

    tagged = Batcher("t_tagged", flush, tagged=True)
    untagged = Batcher("t_untagged", flush)

    async def request(rid, items, batcher):
        logs.REQUEST_ID.set(rid)  # what center's middleware does for each HTTP request
        return await batcher.submit_many(items)

    got = await asyncio.gather(request("r1", [1, 2], tagged), request("r2", [3], tagged),
                               request("r3", [4], tagged))
    assert got == [[1, 2], [3], [4]]
    assert seen == [("r1,r2,r3", None, [1, 2, 3, 4])]  # one call, every request named, none as "its own"
    seen.clear()
    await request("r9", [5], untagged)
    assert seen == [(None, None, [5])]  # an untagged batch does not pass one caller's id off as the batch's


class _EchoStub:
    def __init__(self, channel):
        self.Echo = channel.unary_unary("/test.Echo/Echo")


async def test_grpc_calls_carry_the_ids_to_the_server_handler_and_its_log_lines(caplog):
    seen = []
    server_log = logging.getLogger("test_logs.server")

    async def echo(request: bytes, context) -> bytes:
        seen.append(logs.REQUEST_IDS.get())
        server_log.warning("handling")
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    target = f"127.0.0.1:{free_port()}"
    server = await rpc.start_server(target, [(lambda _s, srv: srv.add_generic_rpc_handlers((handler,)), None)])
    pool = rpc.ChannelPool(1)
    client = rpc.ServiceClient(discovery=None, pool=pool, service="test", stub_cls=_EchoStub, deadline_s=2.0)
    filt = logs._ContextFilter()
    caplog.handler.addFilter(filt)
    try:
        assert await client.call("Echo", b"x", target=target) == b"x"  # no ids: no metadata
        token = logs.REQUEST_ID.set("center-req-1")
        try:
            await client.call("Echo", b"y", target=target)
        finally:
            logs.REQUEST_ID.reset(token)
        token = logs.REQUEST_IDS.set("r1,r2,+4")
        try:
            await client.call("Echo", b"z", target=target)
        finally:
            logs.REQUEST_IDS.reset(token)
        await client.call("Echo", b"w", target=target)  # the previous call's ids do not linger on the server
    finally:
        caplog.handler.removeFilter(filt)
        await pool.close()
        await server.stop(None)
    assert seen == [None, "center-req-1", "r1,r2,+4", None]
    handled = [r for r in caplog.records if r.name == "test_logs.server"]
    assert [r.request_ids for r in handled] == [None, "center-req-1", "r1,r2,+4", None]


async def test_center_answers_with_the_callers_id_or_its_own():
    seen = []

    async def handler(request):
        seen.append(logs.REQUEST_ID.get())
        if request.path == "/fail":
            raise web.HTTPNotFound()
        return web.json_response({})

    app = web.Application(middlewares=[request_id_middleware("p1")])
    app.router.add_get("/ok", handler)
    app.router.add_get("/fail", handler)
    async with TestClient(TestServer(app)) as client:
        mine = await client.get("/ok")
        theirs = await client.get("/ok", headers={"X-Request-Id": "caller-42"})
        bad = await client.get("/ok", headers={"X-Request-Id": "has space"})
        failed = await client.get("/fail", headers={"X-Request-Id": "caller-43"})
    assert mine.headers["X-Request-Id"] == "p1-1"
    assert theirs.headers["X-Request-Id"] == "caller-42"
    assert bad.headers["X-Request-Id"] == "p1-2"
    assert failed.status == 404 and failed.headers["X-Request-Id"] == "caller-43"
    assert seen == ["p1-1", "caller-42", "p1-2", "caller-43"]
    assert logs.REQUEST_ID.get() is None


async def test_a_task_started_for_one_request_can_leave_its_id_behind():
    seen = []

    async def record():
        seen.append((logs.REQUEST_ID.get(), logs.REQUEST_IDS.get()))

    token = logs.REQUEST_ID.set("first-request")
    try:
        await asyncio.get_running_loop().create_task(record())
        await asyncio.get_running_loop().create_task(record(), context=logs.without_request_ids())
    finally:
        logs.REQUEST_ID.reset(token)
    assert seen == [("first-request", None), (None, None)]
