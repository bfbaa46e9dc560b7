"""The process_* series every process exports: same names as prometheus-client's collector, with
the open descriptors counted without listing /proc/self/fd."""

import os
import socket

from prometheus_client import generate_latest

from services.common import metrics


def _series(body: bytes) -> dict[str, float]:
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("process_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_the_default_registry_exports_process_figures_with_the_open_descriptor_count():
    before = _series(generate_latest())
    socks = [socket.socket() for _ in range(300)]
    try:
        after = _series(generate_latest())
        listed = len(os.listdir("/proc/self/fd")) - 1  # less the one the listing itself opened
    finally:
        for s in socks:
            s.close()
    assert set(after) == {"process_virtual_memory_bytes", "process_resident_memory_bytes",
                          "process_start_time_seconds", "process_cpu_seconds_total", "process_open_fds",
                          "process_max_fds"}
    assert after["process_open_fds"] - before["process_open_fds"] == 300
    assert abs(after["process_open_fds"] - listed) <= 2
    assert after["process_resident_memory_bytes"] > 1 << 20
    assert after["process_max_fds"] >= after["process_open_fds"]


def test_the_collector_is_replaced_once():
    metrics._use_process_figures()  # again: a no-op, not a duplicate registration
    body = generate_latest().decode()
    assert body.count("\nprocess_open_fds ") + body.startswith("process_open_fds ") == 1
