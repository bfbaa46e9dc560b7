"""``pylon saver``: wiring of the message storage process (config → MySQL + Redis → core → gRPC → discovery)."""

from __future__ import annotations

import argparse
import asyncio
import logging

log = logging.getLogger("services.saver")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file ([pylon] and [saver] sections)")
    p.add_argument("--host", help="bind address for gRPC and metrics")
    p.add_argument("--grpc-port", type=int, help="gRPC port (pylon.internal.Saver)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = any free port)")


def main(args) -> int:
    from services.common import runtime
    from services.saver.config import SaverConfig

    return runtime.launch("saver", SaverConfig, args.config, serve, host=args.host, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)


async def serve(common, cfg, stop: asyncio.Event) -> None:
    from services.common import logs, metrics, mysql, rpc, runtime
    from services.common.discovery import Discovery, Instance
    from services.common.pb import internal_pb2_grpc
    from services.saver import metrics as saver_metrics
    from services.saver.broadcasts import BroadcastStore
    from services.saver.epoch import EpochGuard
    from services.saver.grpc_adapter import SaverServicer
    from services.saver.inbox import InboxStore
    from services.saver.journal import MessageJournal
    from services.saver.parked import ParkedMessages
    from services.saver.rebuild import RedisRebuild
    from services.saver.store import MessageStore

    redis = runtime.redis_client(common.redis_url, cfg.redis_max_connections, fail_fast=True)
    discovery = Discovery(redis, common.discovery_ttl_s, common.discovery_refresh_s)
    metrics_server = await metrics.serve(cfg.host, cfg.metrics_port)
    metrics_port = metrics.bound_port(metrics_server)

    async def open_mysql():
        pool = await mysql.connect_pool(common, minsize=1, maxsize=cfg.mysql_pool_size)
        try:
            await mysql.migrate(pool)
        except BaseException:
            pool.close()
            await pool.wait_closed()
            raise
        return pool

    pool = await runtime.retry_until_stopped(f"MySQL {common.mysql_host}:{common.mysql_port} connect/migrate", open_mysql, stop)
    if pool is None:
        metrics_server.close()
        await redis.aclose()
        return
    seq_ttl_s = cfg.max_ttl_s + cfg.ack_retention_s
    inbox = InboxStore(redis, ack_retention_s=cfg.ack_retention_s, max_attempts=cfg.max_attempts, seq_ttl_s=seq_ttl_s)
    journal = MessageJournal(pool, cfg)
    broadcasts = BroadcastStore(redis, journal, cfg)
    rebuild = RedisRebuild(redis, journal, chunk_rows=cfg.rebuild_chunk_rows, ack_retention_s=cfg.ack_retention_s,
                           seq_ttl_s=seq_ttl_s, lock_ttl_s=cfg.rebuild_lock_ttl_s,
                           on_chunk=saver_metrics.REBUILD_ROWS.inc, broadcasts=broadcasts)
    guard = EpochGuard(redis, rebuild, check_interval_s=cfg.epoch_check_interval_s, lock_ttl_s=cfg.rebuild_lock_ttl_s,
                       tail_check_rows=cfg.tail_check_rows)
    store = MessageStore(inbox, journal, guard, cfg, broadcasts=broadcasts)
    journal.start()
    # Redis without an epoch is rebuilt from MySQL before anything is served: RPCs that arrive
    # meanwhile wait for it (or hear UNAVAILABLE), and discovery learns of this saver after it.
    await guard.start()
    server = await rpc.start_server(f"{cfg.host}:{cfg.grpc_port}",
                                    [(internal_pb2_grpc.add_SaverServicer_to_server,
                                      SaverServicer(store, ParkedMessages(redis, journal, guard, cfg)))],
                                    lane=common.rpc_lanes, identity=f"{common.advertise_host}:{cfg.grpc_port}")
    adv = common.advertise_host
    inst = Instance(service="saver", id=f"saver-{adv}:{cfg.grpc_port}", host=adv, port=cfg.grpc_port,
                    grpc=f"{adv}:{cfg.grpc_port}", metrics=f"{adv}:{metrics_port}", region=common.region,
                    lane=server.lane_address(adv))
    logs.set_instance(inst.id)
    log.info("saver serving gRPC on %s:%d (lane %s), metrics on :%d", cfg.host, cfg.grpc_port,
             server.lane_port or "off", metrics_port)
    try:
        await _until_whole(guard, stop)
        await runtime.retry_until_stopped("announce in discovery", lambda: discovery.announce(inst), stop)
        await stop.wait()
    finally:
        log.info("saver stopping")
        await discovery.withdraw()
        await discovery.close()
        await server.stop(cfg.shutdown_grace_s)
        await guard.close()
        await store.close(cfg.shutdown_grace_s)
        await journal.close(cfg.shutdown_grace_s)
        pool.close()
        await pool.wait_closed()
        metrics_server.close()
        await redis.aclose()


async def _until_whole(guard, stop: asyncio.Event) -> None:
    """Wait for a rebuild running at start (if any) to end, or for stop."""
    while guard.recovering and not stop.is_set():
        await asyncio.sleep(0.1)
