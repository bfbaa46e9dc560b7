"""The coordinator's webhook HTTP client against real local servers that misbehave: silent, slow,
huge, with oversized headers, or redirecting (to the same origin and to another one).

Each server is a real listening socket on loopback; the client is the production
``AiohttpTransport`` with a 1 s budget, so every bad server costs at most about a second.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.coordinator.webhook_http import MAX_REDIRECTS, MAX_RESPONSE_READ, AiohttpTransport

BODY = b'{"events":[{"kind":"chat"}]}'
HEADERS = {"Content-Type": "application/json", "X-Pylon-Signature": "sha256=00"}


class RawServer:
    """A TCP server whose connection handler is a coroutine(reader, writer); records requests."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.sent = 0
        self.handlers_done = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.requests.append(head + await reader.readexactly(length))
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client gave up (that is what these tests make it do), or the test ended
        finally:
            self.handlers_done += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    # one request per connection keeps the servers simple
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def answer(status: int, headers: dict[str, str] | None = None):
    async def handler(server, reader, writer):
        writer.write(response(status, headers))
        await writer.drain()
    return handler


@pytest.fixture
async def transport():
    t = AiohttpTransport(timeout_s=1.0, connect_timeout_s=1.0)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def until(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_server_that_never_answers_is_a_timeout(transport):
    async def silent(server, reader, writer):
        await asyncio.sleep(30)

    async with RawServer(silent) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status is None and resp.error == "timeout" and not resp.permanent


async def test_headers_that_trickle_in_are_a_timeout(transport):
    async def trickle(server, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(300):
            writer.write(b"X: y\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(trickle) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status is None and resp.error == "timeout"


async def test_a_huge_answer_is_not_read(transport):
    chunk = b"x" * 65536
    total = 512 * 1024 * 1024

    async def huge(server, reader, writer):
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        while server.sent < total:
            writer.write(chunk)
            await writer.drain()  # raises once the client closed
            server.sent += len(chunk)

    async with RawServer(huge) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
        assert resp.status == 200
        await until(lambda: srv.handlers_done == 1)
    # what the client read is bounded; the kernel's socket buffers hold a few MiB at most
    assert MAX_RESPONSE_READ < 32 * 1024 * 1024
    assert srv.sent < 32 * 1024 * 1024, srv.sent


async def test_a_huge_header_is_an_error_not_a_crash(transport):
    async def big_header(server, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with RawServer(big_header) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status is None and resp.error and resp.error != "timeout"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_host_is_not_followed(transport, status):
    async with RawServer(await answer(200)) as elsewhere:
        async with RawServer(await answer(status, {"Location": elsewhere.url + "/steal"})) as srv:
            resp = await transport(srv.url + "/hook", BODY, HEADERS)
        assert resp.status == status and "not followed" in resp.error
        assert len(srv.requests) == 1 and elsewhere.requests == []


async def test_a_307_on_the_same_origin_is_followed_with_the_signed_body(transport):
    async def hop(server, reader, writer):
        first = len(server.requests) == 1
        writer.write(response(307, {"Location": "/final"}) if first else response(204))
        await writer.drain()

    async with RawServer(hop) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status == 204 and resp.error == ""
    assert [r.split(b" ", 2)[1] for r in srv.requests] == [b"/hook", b"/final"]
    assert all(r.endswith(BODY) and b"X-Pylon-Signature: sha256=00" in r for r in srv.requests)


async def test_a_302_on_the_same_origin_is_an_answer(transport):
    async with RawServer(await answer(302, {"Location": "/other"})) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status == 302 and len(srv.requests) == 1


async def test_a_redirect_loop_stops(transport):
    async with RawServer(await answer(308, {"Location": "/hook"})) as srv:
        resp = await transport(srv.url + "/hook", BODY, HEADERS)
    assert resp.status == 308 and "redirects" in resp.error
    assert len(srv.requests) == MAX_REDIRECTS + 1
