"""``pylon register``: wiring of the session store process (config → core → gRPC → discovery)."""

from __future__ import annotations

import argparse
import asyncio
import logging

log = logging.getLogger("services.register")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file ([pylon] and [register] sections)")
    p.add_argument("--host", help="bind address for gRPC and metrics")
    p.add_argument("--grpc-port", type=int, help="gRPC port (pylon.internal.Register)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = any free port)")


def main(args) -> int:
    from services.common import runtime
    from services.register.config import RegisterConfig

    return runtime.launch("register", RegisterConfig, args.config, serve, host=args.host, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)


async def serve(common, cfg, stop: asyncio.Event) -> None:
    from services.common import logs, metrics, rpc, runtime
    from services.common.discovery import Discovery, Instance
    from services.common.pb import internal_pb2_grpc
    from services.register.grpc_adapter import RegisterServicer
    from services.register.store import SessionStore

    redis = runtime.redis_client(common.redis_url, cfg.redis_max_connections, fail_fast=True)
    store = SessionStore(redis, max_items=cfg.max_items, drop_chunk=cfg.drop_chunk)
    discovery = Discovery(redis, common.discovery_ttl_s, common.discovery_refresh_s)

    metrics_server = await metrics.serve(cfg.host, cfg.metrics_port)
    metrics_port = metrics.bound_port(metrics_server)
    server = await rpc.start_server(f"{cfg.host}:{cfg.grpc_port}",
                                    [(internal_pb2_grpc.add_RegisterServicer_to_server, RegisterServicer(store))],
                                    lane=common.rpc_lanes, identity=f"{common.advertise_host}:{cfg.grpc_port}")
    adv = common.advertise_host
    inst = Instance(service="register", id=f"register-{adv}:{cfg.grpc_port}", host=adv, port=cfg.grpc_port,
                    grpc=f"{adv}:{cfg.grpc_port}", metrics=f"{adv}:{metrics_port}", region=common.region,
                    lane=server.lane_address(adv))
    logs.set_instance(inst.id)
    log.info("register serving gRPC on %s:%d (lane %s), metrics on :%d", cfg.host, cfg.grpc_port,
             server.lane_port or "off", metrics_port)
    try:
        # Redis may not be up yet: keep trying until it is, or until we are told to stop
        await runtime.retry_until_stopped("announce in discovery", lambda: discovery.announce(inst), stop)
        if not stop.is_set():
            try:
                log.info("register epoch %s", await store.epoch())
            except Exception as exc:  # Redis away again: the first call that reaches it reads the epoch
                log.warning("could not read the register epoch: %s", exc)
        await stop.wait()
    finally:
        log.info("register stopping")
        await discovery.withdraw()
        await discovery.close()
        await server.stop(cfg.shutdown_grace_s)
        metrics_server.close()
        await redis.aclose()
