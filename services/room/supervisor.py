"""The room supervisor: K instance processes forked from one parent after preloading."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

from services.common import runtime

log = logging.getLogger("room")


def _preload() -> None:
    """Import what an instance imports, before forking: the children share these pages."""
    from services.common import discovery, metrics, rpc  # noqa: F401
    from services.common.pb import client_pb2, internal_pb2_grpc  # noqa: F401
    from services.room import app_cache, backends, connection, core, grpc_adapter  # noqa: F401


def supervise(common, cfg, serve) -> int:
    """Fork K instance processes (instance i: port + i, grpc_port + i) and forward signals to them.

    ``serve(common, cfg, stop)`` is the coroutine an instance runs.

    Instances are forked from this process after it imported everything an instance needs and
    froze those objects for the GC, so the ~20 MiB of interpreter state per process stays shared
    between instances (copy-on-write) instead of being built again in each. Nothing that starts
    threads or opens sockets (event loop, gRPC, Redis) exists before the fork."""
    k = cfg.instance_count()
    _preload()
    runtime.settle_gc()
    pids: list[int] = []
    for i in range(k):
        icfg = dataclasses.replace(cfg, instances=1, port=cfg.port + i, grpc_port=cfg.grpc_port + i,
                                   metrics_port=cfg.metrics_port + i if cfg.metrics_port else 0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = runtime.run(lambda stop, icfg=icfg: serve(common, icfg, stop))
            except BaseException:
                log.exception("room instance %d failed", i)
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    log.info("started %d room instances on ports %d..%d", k, cfg.port, cfg.port + k - 1)

    def forward(sig, _frame):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for pid in pids:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        codes.append(os.waitstatus_to_exitcode(status))
    return max((abs(c) for c in codes), default=0)
