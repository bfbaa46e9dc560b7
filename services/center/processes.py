"""K center processes on one HTTP port: forked from one parent, kept alive.

Each process is a whole center (DESIGN.md §2: one process, one event loop, one core): its own
socket on the shared port (SO_REUSEPORT: the kernel spreads new connections over them), its own
id node for message ids, discovery record (``center-<host>:<port>/<i>``) and metrics listener.
What they share is the slot memory of their dashboard tallies (``shared_tally.py``), mapped
here before the fork.

The parent imports what a process needs before forking (the pages stay shared, copy-on-write)
and never creates an event loop, thread or socket, so a process that died is forked again the
same way at any time, after a backoff that grows while it keeps dying. SIGTERM/SIGINT go to every
process, which shut down gracefully; one still alive ``shutdown_grace_s`` + 5 s later is killed.
The parent exits once all have, with the worst exit code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from services.center.shared_tally import SharedTallies
from services.common import runtime
from services.launcher.procs import RestartBackoff, describe_exit

log = logging.getLogger("services.center")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_KILL_AFTER_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRole:
    """What one of the K processes needs to know about the group it belongs to."""

    index: int
    count: int
    tallies: SharedTallies


@dataclasses.dataclass(slots=True)
class _Slot:
    index: int
    backoff: RestartBackoff
    pid: int = 0
    started: float = 0.0     # monotonic
    restart_at: float = 0.0  # monotonic; 0 = none pending


def _preload() -> None:
    """Import what a process imports, before forking: the children share these pages."""
    import aiohttp.web  # noqa: F401
    import aiomysql  # noqa: F401
    import msgspec  # noqa: F401
    import redis.asyncio  # noqa: F401

    from services.center import http_api, push, push_decoding, stats  # noqa: F401
    from services.common import discovery, rpc  # noqa: F401
    from services.common.pb import internal_pb2_grpc  # noqa: F401


def _die_with_parent() -> None:
    """SIGTERM when the parent dies (kill -9): the process shuts down instead of holding the port
    against the next group."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        pass


class CenterProcesses:
    def __init__(self, count: int, run_one: Callable[[ProcessRole], int], grace_s: float) -> None:
        self.tallies = SharedTallies(count)
        self.run_one = run_one
        self.grace_s = grace_s
        self.slots = [_Slot(i, RestartBackoff()) for i in range(count)]
        self.stopping = False
        self.kill_at = 0.0
        self.codes: list[int] = []
        self._wake_r = self._wake_w = -1
        self._parent = 0

    def _fork(self, slot: _Slot) -> None:
        # signals stay blocked across the fork: the child must never run the parent's handlers
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid == 0:
            self._child(slot, old_mask)  # never returns
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), 0.0
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _child(self, slot: _Slot, mask) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if os.getppid() != self._parent:  # the parent died before prctl took effect
                os._exit(1)
            code = self.run_one(ProcessRole(slot.index, len(self.slots), self.tallies))
        except BaseException:
            log.exception("center process %d failed", slot.index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            slot.pid = 0
            if self.stopping:
                self.codes.append(code)
                continue
            lived = time.monotonic() - slot.started
            delay = slot.backoff.died(lived)
            slot.restart_at = time.monotonic() + delay
            log.warning("center process %d (pid %d) %s after %.1f s; starting it again in %.1f s",
                        slot.index, pid, describe_exit(code), lived, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at and slot.restart_at <= now and not slot.pid:
                self._fork(slot)
                log.info("center process %d started again as pid %d", slot.index, slot.pid)

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    def _on_stop(self, sig, _frame) -> None:
        if not self.stopping:
            self.stopping = True
            self.kill_at = time.monotonic() + self.grace_s + _KILL_AFTER_GRACE_S
            for slot in self.slots:
                slot.restart_at = 0.0
            log.info("center stopping: %d processes", sum(1 for s in self.slots if s.pid))
        self._forward(sig)

    def _install_signals(self) -> None:
        # every signal writes a byte to the wakeup pipe, so select() sees one that arrives between
        # a reap and the wait
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

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

    def run(self) -> int:
        self._parent = os.getpid()
        self._install_signals()
        for slot in self.slots:
            self._fork(slot)
        log.info("started %d center processes: pids %s", len(self.slots), [s.pid for s in self.slots])
        while True:
            self._reap()
            live = [s for s in self.slots if s.pid]
            if self.stopping:
                if not live:
                    break
                if time.monotonic() >= self.kill_at:
                    log.warning("center processes %s did not stop in time; killing them", [s.pid for s in live])
                    self._forward(signal.SIGKILL)
                    self.kill_at = time.monotonic() + 3600
                timeout: float | None = max(0.0, self.kill_at - time.monotonic())
            else:
                self._restart_due()
                pending = [s.restart_at for s in self.slots if s.restart_at]
                timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
            self._wait(timeout)
        code = max((abs(c) for c in self.codes), default=0)
        log.info("center stopped (processes exited with %s)", sorted(set(self.codes)))
        return code


def port_taken(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound by this group, or None. The processes bind with
    SO_REUSEPORT, which would let a second group (a center started twice) join the first one's
    port silently; a plain bind first makes that the usual "address in use" at start."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def supervise(count: int, run_one: Callable[[ProcessRole], int], grace_s: float) -> int:
    """Fork ``count`` processes, each ``run_one(role)``; restart any that dies; stop all on SIGTERM."""
    _preload()
    group = CenterProcesses(count, run_one, grace_s)
    runtime.settle_gc()
    return group.run()
