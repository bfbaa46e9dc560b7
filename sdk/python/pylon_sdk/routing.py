"""Where to connect: a fixed address list, or the dispatcher's ``GET /v1/route``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import NamedTuple
from urllib.parse import urlencode

from pylon_sdk.errors import RouteError

MAX_ROOMS = 16          # more alternatives than this are never tried before asking again
MAX_EXCLUDE = 32        # the query string stays small however long a client has been failing
MAX_ROUTE_BODY = 64 * 1024


class Address(NamedTuple):
    """A room instance: ``host``, its plain ``port`` (its name in ``exclude``, COMMAND RECONNECT
    and logs), and ``tls_port`` when it also serves TLS (0: it does not)."""

    host: str
    port: int
    tls_port: int = 0

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_port(port: object) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536


def _check(host: object, port: object, tls_port: object = 0) -> Address:
    if not isinstance(host, str) or not host or not _is_port(port):
        raise RouteError(f"bad room address {host!r}:{port!r}")
    if tls_port is None or tls_port == 0:
        tls_port = 0
    elif not _is_port(tls_port):
        raise RouteError(f"bad room TLS port {tls_port!r} for {host}:{port}")
    return Address(host, port, tls_port)  # type: ignore[arg-type]


class FixedRoutes:
    """The same list every time, addresses that failed last moved to the end (for tests and
    deployments without a dispatcher)."""

    def __init__(self, addresses: Iterable[tuple[str, int] | tuple[str, int, int]]) -> None:
        self.addresses = [_check(*a) for a in addresses]
        if not self.addresses:
            raise ValueError("addresses must not be empty")

    async def get(self, exclude: Sequence[Address] = ()) -> list[Address]:
        bad = set(exclude)
        return [a for a in self.addresses if a not in bad] + [a for a in self.addresses if a in bad]

    async def close(self) -> None:
        pass


def parse_route_reply(body: bytes) -> list[Address]:
    """``{"rooms": [{"host": ..., "port": ..., "tls_port": ...}, ...]}`` → addresses, validated."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RouteError(f"dispatcher answered non-JSON: {exc}") from None
    rooms = data.get("rooms") if isinstance(data, dict) else None
    if not isinstance(rooms, list):
        raise RouteError("dispatcher answer has no 'rooms' list")
    out: list[Address] = []
    for room in rooms[:MAX_ROOMS]:
        if not isinstance(room, dict):
            raise RouteError("dispatcher answer: a room is not an object")
        addr = _check(room.get("host"), room.get("port"), room.get("tls_port", 0))
        if addr not in out:
            out.append(addr)
    return out


def route_url(base: str, uid: str, net: str, region: str = "", exclude: Sequence[Address] = ()) -> str:
    params = {"uid": uid, "net": net}
    if region:
        params["region"] = region
    if exclude:
        params["exclude"] = ",".join(str(a) for a in list(exclude)[-MAX_EXCLUDE:])
    return f"{base.rstrip('/')}/v1/route?{urlencode(params)}"


class DispatcherRoutes:
    """``GET {dispatcher}/v1/route?uid=&net=&region=&exclude=host:port,...``."""

    def __init__(self, url: str, uid: str, net: str = "", region: str = "", timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"dispatcher_url must be http(s)://..., got {url!r}")
        self.url = url
        self.uid = uid
        self.net = net
        self.region = region
        self.timeout_s = timeout_s
        self._session = None

    async def get(self, exclude: Sequence[Address] = ()) -> list[Address]:
        import aiohttp  # only clients that use a dispatcher pay for the import

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        url = route_url(self.url, self.uid, self.net, self.region, exclude)
        try:
            async with self._session.get(url) as resp:
                body = await resp.content.read(MAX_ROUTE_BODY + 1)
                if resp.status != 200:
                    raise RouteError(f"dispatcher answered {resp.status}: {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RouteError(f"dispatcher {self.url} unreachable: {exc or type(exc).__name__}") from None
        if len(body) > MAX_ROUTE_BODY:
            raise RouteError("dispatcher answer too large")
        return parse_route_reply(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
