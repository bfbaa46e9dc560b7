"""The room supervisor: K instance processes forked from one parent after preloading, kept alive.

Instances are forked from this process after it imported everything an instance needs and froze
those objects for the GC, so the ~20 MiB of interpreter state per process stays shared between
instances (copy-on-write) instead of being built again in each. Nothing that starts threads or
opens sockets (event loop, gRPC, Redis) ever exists in the supervisor, so an instance that died
is forked again the same way, at any time.

While the supervisor is not stopping, an instance that exits for any reason (killed, crashed, or
drained after a SIGTERM of its own) is started again on the same ports after a backoff that grows
while it keeps dying (``RestartBackoff``). SIGTERM/SIGINT to the supervisor are forwarded to every
instance, which drain; the supervisor exits once all of them have, 0 when they all exited 0.
An instance drained on an operator's request (``Room.Drain``) exits with a code of its own
(services/room/drain.py) and is not a death: it is started again at once, or its slot stays
empty when the request said so, with no backoff and no restart counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import time
from typing import TYPE_CHECKING

from prometheus_client import Gauge

from services.common import runtime
from services.launcher.procs import RestartBackoff, describe_exit
from services.room.drain import EXIT_DRAINED_RESTART, EXIT_DRAINED_STAY

if TYPE_CHECKING:
    from services.room.config import RoomConfig

log = logging.getLogger("room")

# Set in each instance right after the fork, exported by its /metrics: an operator sees on the
# new process how often its slot has been restarted.
RESTARTS = Gauge("pylon_room_instance_restarts", "Times the supervisor started this room instance again after it died")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
# Instances drain within drain_handover_s (sessions wait to be taken over) plus drain_timeout_s
# (the last flushes to register and saver); one still alive this much later is killed.
_KILL_AFTER_DRAIN_S = 5.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def drain_deadline_s(cfg) -> float:
    """How long after SIGTERM the supervisor kills an instance still draining: its hand-over
    window, its flush deadline and a margin (the kill must not cut the flushes of acks,
    delivery counts and unregistrations short)."""
    return cfg.drain_handover_s + cfg.drain_timeout_s + _KILL_AFTER_DRAIN_S


def _preload() -> None:
    """Import what an instance imports, before forking: the children share these pages."""
    from services.common import discovery, metrics, rpc  # noqa: F401
    from services.common.pb import client_pb2, internal_pb2_grpc  # noqa: F401
    from services.room import app_cache, backends, connection, core, drain, grpc_adapter, resume, session  # noqa: F401


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (kill -9, crash): the instance then
    drains instead of living on unsupervised and holding its ports against the next supervisor."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: instances outlive a killed supervisor
        pass


@dataclasses.dataclass(slots=True)
class InstanceSlot:
    """One instance position (its ports) and the process currently holding it."""

    index: int
    cfg: RoomConfig  # this instance's ports
    backoff: RestartBackoff
    pid: int = 0
    started: float = 0.0      # monotonic
    restart_at: float = 0.0   # monotonic; 0 = no restart pending
    restarts: int = 0
    drained: bool = False     # it exited after a requested drain: the next start is not a restart


class RoomSupervisor:
    def __init__(self, common, cfg, serve) -> None:
        k = cfg.instance_count()
        self.common = common
        self.serve = serve
        self.drain_s = drain_deadline_s(cfg)
        self.slots = [
            InstanceSlot(i, dataclasses.replace(cfg, instances=1, port=cfg.port + i, grpc_port=cfg.grpc_port + i,
                                                metrics_port=cfg.metrics_port + i if cfg.metrics_port else 0,
                                                tls_port=cfg.tls_port + i if cfg.tls_port else 0),
                         RestartBackoff())
            for i in range(k)]
        self.stopping = False
        self.kill_at = 0.0
        self.stop_codes: list[int] = []
        self._wake_r = self._wake_w = -1
        self._supervisor_pid = 0

    # ------------------------------------------------------------------ processes
    def _fork(self, slot: InstanceSlot) -> None:
        # signals stay blocked across the fork: the child must never run the supervisor's handlers
        # (SIGHUP too: a new instance loads the certificate files as they are anyway)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS | {signal.SIGHUP})
        pid = os.fork()
        if pid == 0:
            self._run_instance(slot, old_mask)  # never returns
        # recorded before the signals are let in: a stop signal waiting for that reaches this pid too
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), 0.0
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _run_instance(self, slot: InstanceSlot, mask) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the instance's loop handles it (TLS reload)
            _die_with_parent()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if os.getppid() != self._supervisor_pid:  # the supervisor died before prctl took effect
                os._exit(1)
            RESTARTS.set(slot.restarts)
            outcome: list[int | None] = []

            async def serve_instance(stop, icfg=slot.cfg) -> None:
                outcome.append(await self.serve(self.common, icfg, stop))

            code = runtime.run(serve_instance)
            if code == 0 and outcome and outcome[0] is not None:
                code = outcome[0]  # drained on request (services/room/drain.py)
        except BaseException:
            log.exception("room instance %d failed", slot.index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _exited(self, pid: int, status: int) -> None:
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            return
        code = os.waitstatus_to_exitcode(status)
        slot.pid = 0
        if self.stopping:
            self.stop_codes.append(code)
            return
        if code in (EXIT_DRAINED_RESTART, EXIT_DRAINED_STAY):
            slot.drained = True
            slot.restart_at = time.monotonic() if code == EXIT_DRAINED_RESTART else 0.0
            log.info("room instance %d (pid %d, port %d) drained on request; %s", slot.index, pid, slot.cfg.port,
                     "starting a fresh one" if code == EXIT_DRAINED_RESTART else "its slot stays empty")
            return
        lived = time.monotonic() - slot.started
        delay = slot.backoff.died(lived)
        slot.restart_at = time.monotonic() + delay
        log.warning("room instance %d (pid %d, port %d) %s after %.1f s; starting it again in %.1f s",
                    slot.index, pid, slot.cfg.port, describe_exit(code), lived, delay)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at and slot.restart_at <= now and not slot.pid and slot.drained:
                slot.drained = False
                self._fork(slot)
                log.info("room instance %d started again after its drain as pid %d on port %d", slot.index,
                         slot.pid, slot.cfg.port)
            elif slot.restart_at and slot.restart_at <= now and not slot.pid:
                slot.restarts += 1
                self._fork(slot)
                log.info("room instance %d restarted as pid %d on port %d (restart %d)", slot.index, slot.pid,
                         slot.cfg.port, slot.restarts)

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ signals
    def _on_stop_signal(self, sig, _frame) -> None:
        if not self.stopping:
            self.stopping = True
            self.kill_at = time.monotonic() + self.drain_s
            pending = [s.index for s in self.slots if s.restart_at]
            for slot in self.slots:
                slot.restart_at = 0.0
            log.info("room supervisor stopping: draining %d instances%s", sum(1 for s in self.slots if s.pid),
                     f" (restarts of {pending} cancelled)" if pending else "")
        self._forward(sig)

    def _install_signals(self) -> None:
        # Every signal writes a byte to the wakeup pipe, so the loop's select() sees SIGCHLD and
        # the stop signals even when one arrives between a reap and the wait.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        # SIGHUP (reload the TLS certificate) goes to every instance
        signal.signal(signal.SIGHUP, lambda sig, _frame: self._forward(sig))

    def _wait(self, timeout: float | None) -> None:
        try:
            select.select([self._wake_r], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self._supervisor_pid = os.getpid()
        self._install_signals()
        for slot in self.slots:
            self._fork(slot)
        k = len(self.slots)
        log.info("started %d room instances on ports %d..%d", k, self.slots[0].cfg.port, self.slots[-1].cfg.port)
        while True:
            self._reap()
            live = [s for s in self.slots if s.pid]
            if self.stopping:
                if not live:
                    break
                if time.monotonic() >= self.kill_at:
                    log.warning("room instances %s did not drain in time; killing them", [s.pid for s in live])
                    self._forward(signal.SIGKILL)
                    self.kill_at = time.monotonic() + 3600
                timeout: float | None = max(0.0, self.kill_at - time.monotonic())
            else:
                self._restart_due()
                pending = [s.restart_at for s in self.slots if s.restart_at]
                timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
            self._wait(timeout)
        code = max((abs(c) for c in self.stop_codes), default=0)
        log.info("room supervisor stopped (instances exited with %s)", sorted(set(self.stop_codes)))
        return code


def supervise(common, cfg, serve) -> int:
    """Fork K instance processes (instance i: port + i, grpc_port + i), restart any that dies,
    drain them all on SIGTERM/SIGINT. ``serve(common, cfg, stop)`` is the coroutine an instance runs."""
    _preload()
    supervisor = RoomSupervisor(common, cfg, serve)
    runtime.settle_gc()
    return supervisor.run()
