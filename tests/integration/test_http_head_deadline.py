"""A request head must arrive whole within the guard's deadline (slowloris): the guarded aiohttp
runner center and the dispatcher use, on a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from aiohttp import web

from services.common.http_guard import REFUSED, GuardedAppRunner

DEADLINE_S = 1.0


@pytest.fixture
async def server():
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_route("*", "/hello", hello)
    runner = GuardedAppRunner(app, access_log=None, header_timeout_s=DEADLINE_S)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port
    await runner.cleanup()


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)  # to EOF: the server closed


def refused_timeouts() -> float:
    return REFUSED.labels("header_timeout")._value.get()


def trickle(port: int, seconds: float) -> tuple[bytes, float]:
    """Send a request line and then one header byte every 0.1 s, never a whole head; return
    what came back and when the server closed (or ``seconds`` if it never did)."""
    got = b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while time.monotonic() - started < seconds:
            time.sleep(0.1)
            try:
                while True:
                    chunk = sock.recv(65536, socket.MSG_DONTWAIT)
                    if not chunk:
                        return got, time.monotonic() - started
                    got += chunk
            except BlockingIOError:
                pass
            except OSError:
                return got, time.monotonic() - started
            try:
                sock.sendall(b"x")
            except OSError:
                pass  # closed on the server's side: the next recv sees it
    return got, seconds


async def test_a_head_trickled_past_the_deadline_gets_a_json_408_and_is_closed(server):
    before = refused_timeouts()
    data, closed_after = await asyncio.to_thread(trickle, server, 5.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert closed_after < 4.0  # the server closed it, well before the trickle would have ended
    assert refused_timeouts() == before + 1


async def test_a_slow_head_within_the_deadline_and_a_keep_alive_idle_connection_are_served(server):
    before = refused_timeouts()
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    for part in (b"POST /hel", b"lo HTTP/1.1\r\nHost: x\r\n", b"Content-Length: 2\r\n\r\n"):
        writer.write(part)
        await asyncio.sleep(0.05)  # three writes, whole well within the deadline even on a busy box
    # the body is not part of the head: it may come later than the head's deadline
    await asyncio.sleep(DEADLINE_S * 2)
    writer.write(b"hi")
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 200 ")
    # idle on keep-alive for longer than the head deadline: nothing of a head has arrived
    await asyncio.sleep(DEADLINE_S * 3)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the rest of the first answer's head
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = await read_all(reader)
    assert b"HTTP/1.1 200 " in rest
    assert refused_timeouts() == before
    writer.close()
