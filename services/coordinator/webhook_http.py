"""The HTTP side of webhook delivery: one aiohttp ClientSession with bounded connections.

An app's webhook URL is whatever its operator typed, and the server behind it may be slow,
broken or hostile, so every request is bounded: connect time and whole-request time (redirects
included) from config, at most ``MAX_RESPONSE_READ`` bytes of the answer read (aiohttp's own
limits bound its status line and headers), and redirects followed only to the same origin
(scheme, host and port) and only as 307/308, which keep the method and the signed body: a
redirect elsewhere is an answer (its 3xx), never a POST of the app's users' data to a host
nobody configured.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from yarl import URL

from services.coordinator.webhooks import WebhookResponse

log = logging.getLogger(__name__)

MAX_RESPONSE_READ = 64 * 1024  # the answer is not used; read a little so the connection can be reused
MAX_REDIRECTS = 3
_KEEP_BODY_REDIRECTS = frozenset({307, 308})  # 301/302/303 would turn the POST into a GET without its body


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; the HTTP-date form is ignored (backoff applies)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit() and len(value) <= 6:
        return float(value)
    return None


class AiohttpTransport:
    """``await transport(url, body, headers)`` → ``WebhookResponse``; never raises for network trouble."""

    def __init__(self, timeout_s: float = 10.0, connect_timeout_s: float = 3.0, connections: int = 256,
                 connections_per_host: int = 32) -> None:
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s, sock_read=timeout_s)
        self.connections = connections
        self.connections_per_host = connections_per_host
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=self.connections_per_host,
                                         ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookResponse:
        if self._session is None:
            raise RuntimeError("AiohttpTransport.start() was not called")
        try:
            async with asyncio.timeout(self.timeout_s):  # one deadline for the request and its redirects
                return await self._post(url, body, headers)
        except TimeoutError:
            return WebhookResponse(None, error="timeout")
        except aiohttp.InvalidURL as exc:
            return WebhookResponse(None, error=f"invalid webhook URL {exc}", permanent=True)
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a malformed Location
            return WebhookResponse(None, error=f"{type(exc).__name__}: {exc}")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookResponse:
        for hop in range(MAX_REDIRECTS + 1):
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(MAX_RESPONSE_READ)  # at most this much; the rest is never read
                answer = WebhookResponse(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
                if not 300 <= resp.status < 400:
                    return answer
                location = resp.headers.get("Location", "")
            target = URL(url).join(URL(location)) if location else None
            if target is None or resp.status not in _KEEP_BODY_REDIRECTS or not _same_origin(URL(url), target):
                return WebhookResponse(resp.status, error=f"redirect to {str(target)[:200]!r} not followed")
            if hop == MAX_REDIRECTS:
                return WebhookResponse(resp.status, error=f"more than {MAX_REDIRECTS} redirects")
            url = str(target)
        raise AssertionError("unreachable")


def _same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)
