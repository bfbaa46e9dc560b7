"""Process plumbing shared by every service's main(): event loop, signals, Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from services.common.config import ConfigError

log = logging.getLogger(__name__)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` on uvloop; SIGTERM/SIGINT set ``stop``. Config errors exit 1."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; this keeps a traceback readable
        uvloop = None

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        if uvloop is not None:
            uvloop.run(wrapper())
        else:
            asyncio.run(wrapper())
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # address in use, permission denied ...: the operator's environment, not our bug
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def redis_client(url: str, max_connections: int = 32):
    import redis.asyncio as aioredis

    return aioredis.from_url(url, max_connections=max_connections, socket_connect_timeout=5,
                             health_check_interval=30, decode_responses=False)


def launch(name: str, section_cls, config_path: str | None, serve, **overrides) -> int:
    """The body of every service's main(): config (exit 1 with a clear line if bad), logging,
    then ``serve(common, cfg, stop)`` on uvloop until SIGTERM/SIGINT."""
    from services.common import config, logs

    try:
        common, cfg = config.load(section_cls, name, config_path, **overrides)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    logs.setup(name, common.log_level)
    return run(lambda stop: serve(common, cfg, stop))
