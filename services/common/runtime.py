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


def settle_gc() -> None:
    """Call once a service is up. Everything allocated so far (modules, config, servers) lives
    as long as the process: freeze it, so that no collection walks it again (without this, each
    full collection in a room traversed ~40 MiB of imports). And collect the young generation
    less often: a connect storm allocates in bursts, and nearly all of it is freed by reference
    counting before a collection would look at it."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # default 700, 10, 10


def redis_client(url: str, max_connections: int = 32, fail_fast: bool = False, pool_wait_s: float = 2.0):
    """``fail_fast``: give up within ~0.1 s while Redis is down, so that the caller's own callers
    get UNAVAILABLE well before their deadlines (redis-py's default retries take seconds).

    With all ``max_connections`` busy, a caller waits up to ``pool_wait_s`` for one to come back
    (redis-py's default pool raises "Too many connections" at once: under a 1M connect storm
    that refused whole register batches while Redis itself was fine)."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_wait_s, socket_connect_timeout=5,
        health_check_interval=30, decode_responses=False)
    client = aioredis.Redis.from_pool(pool)
    if fail_fast:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        client.set_retry(Retry(ExponentialBackoff(cap=0.05, base=0.01), 2))
    return client


async def retry_until_stopped(what: str, attempt, stop: asyncio.Event):
    """``await attempt()`` until it succeeds (a warning on each failure, backing off to 5 s);
    None if ``stop`` is set first."""
    delay = 0.5
    while not stop.is_set():
        try:
            return await attempt()
        except Exception as exc:
            log.warning("%s failed (retrying in %.1fs): %s", what, delay, exc)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
    return None


def launch(name: str, section_cls, config_path: str | None, serve, **overrides) -> int:
    """The body of every service's main(): config (exit 1 with a clear line if bad), logging,
    then ``serve(common, cfg, stop)`` on uvloop until SIGTERM/SIGINT."""
    from services.common import config, logs

    try:
        common, cfg = config.load(section_cls, name, config_path, **overrides)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    logs.setup(name, common.log_level, common.log_format)
    return run(lambda stop: serve(common, cfg, stop))
