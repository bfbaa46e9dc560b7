"""``pylon coordinator``: wiring only (config → core → adapters → discovery → wait → shut down)."""

from __future__ import annotations

import asyncio
import logging

from services.common import logs, metrics, rpc, runtime
from services.common.config import CommonConfig
from services.coordinator.config import CoordinatorConfig

log = logging.getLogger("services.coordinator")


def add_arguments(p) -> None:
    p.add_argument("--config", help="TOML file with [pylon] and [coordinator] sections")
    p.add_argument("--host", help="gRPC/metrics bind address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="internal gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = any free port)")


def main(args) -> int:
    return runtime.launch("coordinator", CoordinatorConfig, args.config, serve, host=args.host, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)


async def serve(common: CommonConfig, cfg: CoordinatorConfig, stop: asyncio.Event) -> None:
    import grpc
    from redis.exceptions import RedisError

    from services.common.apps import AppDirectory
    from services.common.discovery import Discovery, Instance
    from services.common.pb import internal_pb2_grpc as pb_grpc
    from services.coordinator.grpc_adapter import CoordinatorServicer
    from services.coordinator.intake import EventIntake
    from services.coordinator.kick import Kicker, RpcKickPeers
    from services.coordinator.webhook_http import AiohttpTransport
    from services.coordinator.webhooks import DeliverySettings, WebhookDelivery

    redis = runtime.redis_client(common.redis_url, fail_fast=True)
    discovery = Discovery(redis, common.discovery_ttl_s, common.discovery_refresh_s)
    pool = rpc.ChannelPool(common.rpc_channels_per_target, use_lanes=common.rpc_lanes)
    transport = AiohttpTransport(cfg.webhook_timeout_s, cfg.webhook_connect_timeout_s, cfg.webhook_connections,
                                 cfg.webhook_connections_per_host)
    delivery = WebhookDelivery(transport, DeliverySettings.from_config(cfg))
    intake = EventIntake(AppDirectory(redis, ttl_s=cfg.app_cache_ttl_s), delivery, cfg.upstream_max_payload)
    register = rpc.ServiceClient(discovery, pool, "register", pb_grpc.RegisterStub, common.rpc_deadline_s)
    room = rpc.ServiceClient(discovery, pool, "room", pb_grpc.RoomStub, common.rpc_deadline_s)
    kicker = Kicker(RpcKickPeers(register, room, common.rpc_deadline_s), cfg.kick_concurrency)
    servicer = CoordinatorServicer(intake, kicker, cfg.max_batch_items, cfg.kick_max_uids)

    try:
        await redis.ping()
    except RedisError as exc:
        await redis.aclose()
        raise OSError(f"Redis at {common.redis_url} is not reachable: {exc}") from None

    await transport.start()
    metrics_server = await metrics.serve(cfg.host, cfg.metrics_port)
    metrics_port = metrics.bound_port(metrics_server)
    server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    try:
        grpc_port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    except RuntimeError:
        grpc_port = 0
    if grpc_port == 0:
        metrics_server.close()
        await transport.close()
        await redis.aclose()
        raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
    await server.start()

    host = common.advertise_host
    me = Instance(service="coordinator", id=f"coordinator-{host}:{grpc_port}", host=host, port=grpc_port,
                  grpc=f"{host}:{grpc_port}", metrics=f"{host}:{metrics_port}", region=common.region)
    logs.set_instance(me.id)
    await discovery.announce(me)
    log.info("coordinator ready grpc=%s:%d metrics=%s:%d", cfg.host, grpc_port, cfg.host, metrics_port)

    try:
        await stop.wait()
    finally:
        log.info("coordinator stopping")
        await discovery.withdraw()
        # in-flight RPCs finish first; then queued events get the rest of the grace period
        await server.stop(min(2.0, cfg.shutdown_grace_s))
        await delivery.close(cfg.shutdown_grace_s)
        await transport.close()
        metrics_server.close()
        await discovery.close()
        await pool.close()
        await redis.aclose()
        log.info("coordinator stopped")
