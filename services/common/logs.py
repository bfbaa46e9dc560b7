"""Logging setup: one line per event, ``key=value`` pairs, the service name on every line."""

from __future__ import annotations

import logging
import sys


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp access logs are noise at INFO
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
