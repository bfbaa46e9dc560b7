"""Prometheus metrics shared by every process, and a tiny /metrics HTTP server.

The server is an ``asyncio.Protocol`` on the process's own loop, not prometheus-client's
threaded ``start_http_server``: no extra thread per process (a room host runs ~60 processes).
Service-specific metrics are defined in the service's own module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import PROCESS_COLLECTOR

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


class ProcessFigures:
    """The standard ``process_*`` series (CPU, memory, start time, open and max fds) with the
    open descriptors counted by one stat(): Linux (6.2 on) reports their number as the size of
    /proc/self/fd. prometheus-client's collector lists that directory, ~18 ms per scrape for a
    room instance holding 15,000 connections, scraped every few seconds by every center and by
    Prometheus. Where the size reads 0 (an older kernel) the directory is listed."""

    def __init__(self) -> None:
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._pagesize = resource.getpagesize()
        self._btime = 0.0
        try:
            with open("/proc/stat", "rb") as fh:
                for line in fh:
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
        except OSError:
            pass

    def collect(self):
        if not self._btime:
            return []
        out = []
        try:
            with open("/proc/self/stat", "rb") as fh:
                parts = fh.read().split(b")")[-1].split()
            out += [
                GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                  value=float(parts[20])),
                GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                  value=float(parts[21]) * self._pagesize),
                GaugeMetricFamily("process_start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.",
                                  value=float(parts[19]) / self._ticks + self._btime),
                CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                    value=(float(parts[11]) + float(parts[12])) / self._ticks),
            ]
        except (OSError, IndexError, ValueError):
            pass
        try:
            fds = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
            out += [GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=float(fds)),
                    GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                                      value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))]
        except OSError:
            pass
        return out


def _use_process_figures() -> None:
    try:
        REGISTRY.unregister(PROCESS_COLLECTOR)
    except KeyError:
        return  # already replaced (this module imported twice under another name)
    REGISTRY.register(ProcessFigures())


_use_process_figures()


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
