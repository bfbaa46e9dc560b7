"""``pylon dispatcher``: wiring only (config → discovery → HTTP adapter → announce → wait → shut down)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from redis.exceptions import RedisError

from services.common import logs, metrics, runtime
from services.common.config import CommonConfig
from services.common.discovery import Discovery, Instance
from services.common.http_guard import GuardedAppRunner
from services.dispatcher.config import DispatcherConfig
from services.dispatcher.http_api import make_app

log = logging.getLogger("services.dispatcher")


def add_arguments(p) -> None:
    p.add_argument("--config", help="TOML config file ([pylon] and [dispatcher] sections)")
    p.add_argument("--host", help="HTTP bind address")
    p.add_argument("--port", type=int, help="HTTP port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="extra /metrics listener (0 = only on the HTTP port)")


def main(args) -> int:
    return runtime.launch("dispatcher", DispatcherConfig, args.config, serve, host=args.host, port=args.port,
                          metrics_port=args.metrics_port)


async def serve(common: CommonConfig, cfg: DispatcherConfig, stop: asyncio.Event) -> None:
    rdb = runtime.redis_client(common.redis_url)
    discovery = Discovery(rdb, common.discovery_ttl_s, common.discovery_refresh_s)
    runner = GuardedAppRunner(make_app(discovery, cfg), access_log=None, shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        await rdb.aclose()
        raise
    port = runner.addresses[0][1]
    metrics_server = await metrics.serve(cfg.host, cfg.metrics_port) if cfg.metrics_port else None
    metrics_addr = f"{common.advertise_host}:{metrics.bound_port(metrics_server) if metrics_server else port}"
    me = Instance(service="dispatcher", id=f"dispatcher-{common.advertise_host}:{port}", host=common.advertise_host,
                  port=port, metrics=metrics_addr, region=common.region)
    logs.set_instance(me.id)
    try:
        await discovery.announce(me)
    except RedisError as exc:
        await runner.cleanup()
        await rdb.aclose()
        raise OSError(f"Redis unreachable at {common.redis_url}: {exc}") from exc
    log.info("dispatcher listening on %s:%d (id %s)", cfg.host, port, me.id)
    try:
        await stop.wait()
    finally:
        log.info("dispatcher stopping")
        await discovery.withdraw()
        await discovery.close()
        await runner.cleanup()
        if metrics_server is not None:
            metrics_server.close()
        await rdb.aclose()
