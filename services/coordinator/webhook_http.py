"""The HTTP side of webhook delivery: one aiohttp ClientSession with bounded connections."""

from __future__ import annotations

import logging

import aiohttp

from services.coordinator.webhooks import WebhookResponse

log = logging.getLogger(__name__)

MAX_RESPONSE_READ = 64 * 1024  # the answer is not used; read a little so the connection can be reused


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
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
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
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(MAX_RESPONSE_READ)
                return WebhookResponse(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
        except TimeoutError:
            return WebhookResponse(None, error="timeout")
        except aiohttp.InvalidURL as exc:
            return WebhookResponse(None, error=f"invalid webhook URL {exc}", permanent=True)
        except (aiohttp.ClientError, OSError) as exc:
            return WebhookResponse(None, error=f"{type(exc).__name__}: {exc}")
