"""Prometheus metrics shared by every process, and a tiny /metrics HTTP server.

The server is an ``asyncio.Protocol`` on the process's own loop, not prometheus-client's
threaded ``start_http_server``: no extra thread per process (a room host runs ~60 processes).
Service-specific metrics are defined in the service's own module.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

RPC_SECONDS = Histogram(
    "pylon_rpc_seconds", "Internal RPC latency by target service, method and outcome",
    ["service", "method", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RPC_FAILOVERS = Counter(
    "pylon_rpc_failovers_total", "Calls tried again on another instance after UNAVAILABLE", ["service", "method"])
QUEUE_DEPTH = Gauge("pylon_queue_depth", "Items waiting in a bounded queue", ["queue"])
SHED = Counter("pylon_shed_total", "Items refused because a bounded queue was full", ["queue"])
ERRORS = Counter("pylon_errors_total", "Errors by kind (whose fault: peer, backend, bug)", ["kind"])


class _MetricsHttp(asyncio.Protocol):
    __slots__ = ("transport", "buf")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 8192:
                self.transport.close()
            return
        line = self.buf.split(b"\r\n", 1)[0].split()
        path = line[1] if len(line) >= 2 else b"/"
        if path.startswith(b"/metrics"):
            body, ctype, status = generate_latest(), CONTENT_TYPE_LATEST, b"200 OK"
        elif path.startswith(b"/healthz"):
            body, ctype, status = b'{"status":"ok"}', "application/json", b"200 OK"
        else:
            body, ctype, status = b"not found\n", "text/plain", b"404 Not Found"
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        self.transport.close()


async def serve(host: str, port: int) -> asyncio.AbstractServer:
    """Serve /metrics and /healthz on host:port (port 0 = any free port)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(_MetricsHttp, host, port, reuse_address=True)


def bound_port(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]
