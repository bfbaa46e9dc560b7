"""`pylon room`: one room instance, or a supervisor of K instance processes (`--instances K`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from services.common import config, logs, runtime

log = logging.getLogger("room")


def add_arguments(p) -> None:
    p.add_argument("--config")
    p.add_argument("--host", dest="listen_host", help="address the client port binds to")
    p.add_argument("--port", type=int, help="client TCP port (instance i listens on port + i)")
    p.add_argument("--grpc-port", type=int, help="internal gRPC port (instance i uses grpc-port + i)")
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--shared-port", type=int,
                   help="a port every instance of this host also accepts on (SO_REUSEPORT; the kernel spreads "
                        "connections); the dispatcher still hands out each instance's own port")
    p.add_argument("--instances", type=int, help="instance processes to start (0 = from --target-connections)")
    p.add_argument("--target-connections", type=int, help="size the instance count for this many connections")
    p.add_argument("--tls-port", type=int, help="TLS client port (instance i listens on tls-port + i); needs --tls-cert/--tls-key")
    p.add_argument("--tls-cert", help="PEM certificate chain for the TLS port (read again on SIGHUP)")
    p.add_argument("--tls-key", help="PEM private key for the TLS port (read again on SIGHUP)")


def main(args) -> int:
    from services.room.config import RoomConfig

    overrides = {k: getattr(args, k, None) for k in ("listen_host", "port", "grpc_port", "metrics_port", "shared_port",
                                                      "instances", "target_connections", "tls_port", "tls_cert",
                                                      "tls_key")}
    try:
        common, cfg = config.load(RoomConfig, "room", args.config, **overrides)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    logs.setup("room", common.log_level, common.log_format)
    if cfg.instance_count() > 1:
        from services.room.supervisor import supervise

        return supervise(common, cfg, serve)
    return runtime.run(lambda stop: serve(common, cfg, stop))


async def serve(common, cfg, stop: asyncio.Event) -> int | None:
    """One room instance until ``stop`` (SIGTERM, or Room.Drain); returns the exit code of a
    requested drain (services/room/drain.py), None otherwise."""
    from services.common import metrics
    from services.common.discovery import Discovery, Instance
    from services.common.pb import internal_pb2_grpc as igrpc
    from services.common.rpc import ChannelPool, start_server
    from services.room import metrics as room_metrics
    from services.room.app_cache import AppCache
    from services.room.backends import RoomBackends
    from services.room.connection import ClientConnection, TlsClientConnection
    from services.room.core import RoomInstance
    from services.room.drain import DrainRequest, reconnect_frames
    from services.room.grpc_adapter import RoomServicer

    host = common.advertise_host
    instance_id = f"room-{host}:{cfg.port}"
    logs.set_instance(instance_id)
    redis = runtime.redis_client(common.redis_url, max_connections=8)
    discovery = Discovery(redis, common.discovery_ttl_s, common.discovery_refresh_s)
    pool = ChannelPool(common.rpc_channels_per_target, use_lanes=common.rpc_lanes)
    backends = RoomBackends(discovery, pool, cfg, common.rpc_deadline_s)
    apps = AppCache(redis, cfg.app_refresh_s)
    from services.room.access import raise_open_file_limit

    open_files = raise_open_file_limit()
    room = RoomInstance(cfg, instance_id, apps, backends, grpc_address=f"{host}:{cfg.grpc_port}",
                        connection_cap=cfg.connection_cap(open_files))
    if room.access.max_connections < cfg.per_instance_connections:
        log.warning("this instance accepts at most %d connections (open files %d, room.max_connections %d), fewer "
                    "than per_instance_connections %d: past it clients get INSTANCE_FULL",
                    room.access.max_connections, open_files, cfg.max_connections, cfg.per_instance_connections)
    room_metrics.export_app_sessions(room)
    if not cfg.resume_secret:
        room.resume_secret = await shared_resume_secret(redis)

    await apps.start()
    await room.start()
    try:
        await backends.drop_instance(instance_id)  # sessions left by a previous run of this instance
    except Exception as exc:
        log.warning("could not clear stale sessions of %s: %s", instance_id, exc)
    loop = asyncio.get_running_loop()
    tls = None
    if cfg.tls_port:
        from services.room.tls import ServerTls, TlsConfigError

        try:
            tls = ServerTls(cfg.tls_cert, cfg.tls_key)
        except TlsConfigError as exc:
            log.error("%s", exc)
            raise SystemExit(1) from None
        # new handshakes use the files as they are now; open connections are not touched
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
    server = await loop.create_server(ClientConnection, cfg.listen_host, cfg.port, backlog=cfg.backlog,
                                      reuse_address=True)
    servers = [server]
    if tls is not None:
        # the same protocol behind the TLS transport; a client silent in its TLS handshake is
        # closed at the handshake deadline, as one that never sends AUTH
        servers.append(await loop.create_server(TlsClientConnection, cfg.listen_host, cfg.tls_port,
                                                backlog=cfg.backlog, reuse_address=True, ssl=tls.context,
                                                ssl_handshake_timeout=cfg.handshake_timeout_s))
    if cfg.shared_port:
        # every instance listens here too; the kernel hashes each new connection to one of them
        servers.append(await loop.create_server(ClientConnection, cfg.listen_host, cfg.shared_port,
                                                backlog=cfg.backlog, reuse_address=True, reuse_port=True))
    room.listeners = [sock for srv in servers for sock in srv.sockets]
    drain_request = DrainRequest(stop)  # Room.Drain: an operator's drain takes SIGTERM's path
    grpc_server = await start_server(f"{cfg.listen_host}:{cfg.grpc_port}",
                                     [(igrpc.add_RoomServicer_to_server, RoomServicer(room, drain_request))],
                                     lane=common.rpc_lanes, identity=f"{host}:{cfg.grpc_port}")
    msrv = await metrics.serve(cfg.listen_host, cfg.metrics_port)
    room_metrics.CAPACITY.set(cfg.per_instance_connections)
    me = Instance(service="room", id=instance_id, host=host, port=cfg.port, grpc=f"{host}:{cfg.grpc_port}",
                  metrics=f"{host}:{metrics.bound_port(msrv)}", region=common.region,
                  capacity=cfg.per_instance_connections, tls_port=cfg.tls_port, lane=grpc_server.lane_address(host))
    await discovery.announce(me)
    runtime.settle_gc()
    log.info("room %s serving clients on %s:%d%s%s, gRPC %d, at most %d connections, pid %d", instance_id,
             cfg.listen_host, cfg.port, f" and shared port {cfg.shared_port}" if cfg.shared_port else "",
             f", TLS on {cfg.tls_port}" if cfg.tls_port else "", cfg.grpc_port, room.access.max_connections,
             os.getpid())

    async def report_load() -> None:
        while True:
            await asyncio.sleep(max(1.0, common.discovery_ttl_s / 3))
            me.load = room.sessions

    async def keep_resume_secret() -> None:
        # Redis may lose its data: put our secret back, so an instance started after that
        # shares it with us instead of making a new one (resumes between us would fail)
        while True:
            await asyncio.sleep(10)
            try:
                await redis.set(RESUME_SECRET_KEY, room.resume_secret, nx=True)
            except Exception as exc:
                log.debug("could not keep the resume secret in Redis: %s", exc)

    load_task = loop.create_task(report_load())
    secret_task = loop.create_task(keep_resume_secret()) if not cfg.resume_secret else None
    await stop.wait()

    # Graceful drain: leave discovery first, stop accepting, send clients elsewhere, then close.
    log.info("draining %d connections%s", len(room.connections), " (requested through Room.Drain)" if drain_request.asked else "")
    load_task.cancel()
    if secret_task is not None:
        secret_task.cancel()
    room.draining = True
    await discovery.withdraw()
    room.listeners = []  # closed below: nothing to read their accept queues from
    for srv in servers:
        srv.close()
    try:
        others = [i for i in await discovery.instances("room", fresh=True) if i.id != instance_id and not i.draining]
    except Exception as exc:  # Redis away: clients still get RECONNECT and ask the dispatcher
        log.warning("no other room addresses for the drain: %s", exc)
        others = []
    room.drain(reconnect_frames(others, common.region))
    # the sessions wait DETACHED for the instances their clients move to, which take them over
    deadline = loop.time() + cfg.drain_handover_s
    while room.detached and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if room.detached:
        log.info("drain: %d sessions not taken over within %.0fs; ending them", room.detached, cfg.drain_handover_s)
    room.close_all()
    await backends.drain(cfg.drain_timeout_s)
    await room.stop()
    await grpc_server.stop(grace=1.0)
    msrv.close()
    await apps.close()
    await pool.close()
    await discovery.close()
    await redis.aclose()
    log.info("room %s stopped", instance_id)
    return drain_request.exit_code()


RESUME_SECRET_KEY = "pylon:room:resume_secret"


async def shared_resume_secret(redis) -> bytes:
    """One secret for every room instance of the cluster (a resume token minted by one instance
    is checked by another): created once, kept in Redis."""
    import secrets

    await redis.set(RESUME_SECRET_KEY, secrets.token_hex(32), nx=True)
    value = await redis.get(RESUME_SECRET_KEY)
    return value if isinstance(value, bytes) else value.encode()
