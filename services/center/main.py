"""``pylon center``: wiring only (config → core → HTTP adapter → discovery → wait → shut down)."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import sys

import pymysql
from aiohttp import web
from redis.exceptions import RedisError

from services.center import app_registry
from services.center.admin_api import AdminService
from services.center.app_registry import AppRegistry
from services.center.auth import Authenticator
from services.center.broadcasts import BroadcastService, SubtaskWorker, WorkerSettings
from services.center.cluster_metrics import MetricsScraper
from services.center.config import CenterConfig
from services.center.errors import BackendUnavailable
from services.center.http_api import CenterParts, make_app
from services.center.messages import MessageQuery
from services.center.overview import OverviewCollector
from services.center.processes import ProcessRole, port_taken, supervise
from services.center.push import PushService
from services.center.ratelimit import RateLimiter
from services.center.stats import StatsCollector
from services.center.telemetry import Tally
from services.center.users import UserService
from services.center.validation import Limits
from services.common import ids, logs, metrics, mysql, runtime
from services.common.config import CommonConfig
from services.common.discovery import Discovery, Instance
from services.common.http_guard import GuardedAppRunner
from services.common.pb import internal_pb2_grpc as rpc_pb
from services.common.rpc import ChannelPool, ServiceClient

log = logging.getLogger("services.center")
HERE = pathlib.Path(__file__).parent


def add_arguments(p) -> None:
    p.add_argument("--config", help="TOML config file ([pylon] and [center] sections)")
    p.add_argument("--host", help="HTTP bind address")
    p.add_argument("--port", type=int, help="HTTP port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="extra /metrics listener (0 = only on the HTTP port)")
    p.add_argument("--admin-key", help="Bearer key for admin routes")
    p.add_argument("--processes", type=int,
                   help="center processes sharing the HTTP port (SO_REUSEPORT), one event loop and core each")


def main(args) -> int:
    from services.common import config, logs

    try:
        common, cfg = config.load(CenterConfig, "center", args.config, host=args.host, port=args.port,
                                  metrics_port=args.metrics_port, admin_key=args.admin_key,
                                  processes=getattr(args, "processes", None))
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    logs.setup("center", common.log_level, common.log_format)
    if cfg.processes > 1:
        taken = port_taken(cfg.host, cfg.port)
        if taken is not None:
            print(f"cannot start: {cfg.host}:{cfg.port}: {taken}", file=sys.stderr)
            return 1
        return supervise(cfg.processes, lambda role: runtime.run(lambda stop: serve(common, cfg, stop, role)),
                         cfg.shutdown_grace_s)
    return runtime.run(lambda stop: serve(common, cfg, stop))


# How often center looks whether the app table is still in Redis (one EXISTS): after Redis lost
# its data, rooms refuse every AUTH with UNKNOWN_APP until the table is back.
APP_TABLE_CHECK_S = 1.0


async def _republish_loop(registry: AppRegistry, every_s: float, redis) -> None:
    from services.common import apps as apps_mod

    since = 0.0
    while True:
        await asyncio.sleep(APP_TABLE_CHECK_S)
        since += APP_TABLE_CHECK_S
        try:
            if since < every_s and await redis.exists(apps_mod.REDIS_KEY):
                continue
            since = 0.0
            await registry.publish_all()
        except (BackendUnavailable, RedisError) as exc:
            log.warning("periodic app republish failed: %s", exc)


async def serve(common: CommonConfig, cfg: CenterConfig, stop: asyncio.Event, role: ProcessRole | None = None) -> None:
    """One center process; ``role`` says which of the ``center.processes`` sharing the port it is."""
    rdb = runtime.redis_client(common.redis_url)
    pool = None
    try:
        pool = await mysql.connect_pool(common, maxsize=cfg.mysql_pool_size)
        await mysql.migrate(pool)
        published = await app_registry.publish_all(pool, rdb)
        node = await ids.lease_node_id(rdb, "center")
    except (pymysql.err.MySQLError, RedisError, BackendUnavailable) as exc:
        await rdb.aclose()
        if pool is not None:
            pool.close()
            await pool.wait_closed()
        # runtime.run reports OSError as "cannot start: ..." with exit code 1
        raise OSError(f"backing store unreachable: {exc}") from exc
    log.info("apps published to Redis: %d; id node %d", published, node)

    discovery = Discovery(rdb, common.discovery_ttl_s, common.discovery_refresh_s)
    channels = ChannelPool(common.rpc_channels_per_target, use_lanes=common.rpc_lanes)
    deadline = common.rpc_deadline_s
    saver = ServiceClient(discovery, channels, "saver", rpc_pb.SaverStub, deadline)
    register = ServiceClient(discovery, channels, "register", rpc_pb.RegisterStub, deadline)
    rooms = ServiceClient(discovery, channels, "room", rpc_pb.RoomStub, cfg.room_deadline_s)
    coordinator = ServiceClient(discovery, channels, "coordinator", rpc_pb.CoordinatorStub, deadline)
    tally = role.tallies.slot(role.index) if role is not None else Tally()
    registry = AppRegistry(pool, rdb, cfg.app_cache_ttl_s, cfg.app_cache_miss_ttl_s)
    push = PushService(ids=ids.IdGenerator(node), saver=saver, register=register, rooms=rooms, limiter=RateLimiter(),
                       tally=tally, room_deadline_s=cfg.room_deadline_s, rpc_batch_bytes=cfg.rpc_batch_bytes,
                       rpc_batch_items=cfg.rpc_batch_items, max_in_flight_bytes=cfg.max_in_flight_bytes)
    broadcasts = BroadcastService(ids=push.ids, saver=saver, discovery=discovery, redis=rdb, tally=tally)
    stats = StatsCollector(discovery, tally, group=role.tallies if role is not None else None)
    overview = OverviewCollector(discovery, MetricsScraper(), rdb, pool)
    parts = CenterParts(auth=Authenticator(registry, cfg.admin_key), registry=registry, push=push,
                        users=UserService(register, coordinator), messages=MessageQuery(saver), stats=stats,
                        tally=tally, limits=Limits.from_config(cfg), broadcasts=broadcasts,
                        openapi=(HERE / "openapi.json").read_bytes(), dashboard=(HERE / "dashboard.html").read_bytes(),
                        overview=overview)
    parts.admin = AdminService(saver=saver, rooms=rooms, users=parts.users, registry=registry, push=push)
    if not cfg.admin_key:
        log.warning("no admin key configured: admin routes (/v1/apps) are disabled")

    runner = GuardedAppRunner(make_app(parts, cfg.max_body_bytes), access_log=None, shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    # with several processes each binds its own socket to the port and the kernel spreads connections
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True, reuse_port=role is not None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    if role is None:
        metrics_server = await metrics.serve(cfg.host, cfg.metrics_port) if cfg.metrics_port else None
        center_id = f"center-{common.advertise_host}:{port}"
    else:
        # /metrics on the shared port answers from whichever process the kernel picked: each process
        # also serves its own (metrics_port + i, or any free port) and announces it in discovery
        metrics_server = await metrics.serve(cfg.host, cfg.metrics_port + role.index if cfg.metrics_port else 0)
        center_id = f"center-{common.advertise_host}:{port}/{role.index}"
    metrics_addr = f"{common.advertise_host}:{metrics.bound_port(metrics_server) if metrics_server else port}"
    me = Instance(service="center", id=center_id, host=common.advertise_host, port=port, metrics=metrics_addr,
                  region=common.region)
    logs.set_instance(me.id)
    stats.center_id = overview.center_id = me.id
    await discovery.announce(me)
    await overview.start()
    worker = None
    if cfg.broadcast_worker:
        worker = SubtaskWorker(redis=rdb, rooms=rooms, discovery=discovery, tally=tally,
                               consumer=SubtaskWorker.consumer_name(me.id),
                               settings=WorkerSettings(max_in_flight=cfg.broadcast_max_in_flight,
                                                       claim_idle_s=cfg.subtask_claim_idle_s,
                                                       room_deadline_s=cfg.broadcast_room_deadline_s))
        await worker.start()
    republisher = asyncio.get_running_loop().create_task(_republish_loop(registry, cfg.app_republish_s, rdb))
    log.info("center listening on %s:%d (id %s, pid %d, metrics %s)", cfg.host, port, me.id, os.getpid(),
             metrics_addr)

    try:
        await stop.wait()
    finally:
        log.info("center stopping")
        republisher.cancel()
        if worker is not None:
            await worker.close()
        await overview.close()
        await discovery.withdraw()
        await discovery.close()
        await runner.cleanup()
        if metrics_server is not None:
            metrics_server.close()
        await channels.close()
        pool.close()
        await pool.wait_closed()
        await rdb.aclose()
