"""Start Pylon service processes (``python -m services.cli <service> ...``) and stop them by PID."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

from services.common.config import CommonConfig
from services.launcher.backing import port_open


def common_env(cfg: CommonConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that makes a child process read ``cfg`` as its [pylon] section."""
    env = dict(os.environ)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        env[f"PYLON_{f.name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    env.update(extra or {})
    return env


@dataclasses.dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    log_path: str
    pidfile: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except FileNotFoundError:
                pass
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""


class RestartBackoff:
    """How long to wait before starting a process again after it died: ``first_s``, doubled for
    each further death that came less than ``stable_s`` after its start, at most ``max_s``. A
    process that keeps crashing at start costs a restart every ``max_s``, not a busy loop; one
    that ran for ``stable_s`` is back after ``first_s`` again."""

    __slots__ = ("first_s", "max_s", "stable_s", "failures")

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0, stable_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.stable_s = stable_s
        self.failures = 0  # deaths in a row, each within stable_s of its start

    def died(self, lived_s: float) -> float:
        """The delay before the next start of a process that died after ``lived_s`` seconds."""
        if lived_s >= self.stable_s:
            self.failures = 0
        delay = min(self.max_s, self.first_s * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay


def describe_exit(status_code: int | None) -> str:
    """An exit code as Popen.returncode / os.waitstatus_to_exitcode give it, for a log line."""
    if status_code is None:
        return "is still running"
    if status_code < 0:
        try:
            return f"was killed by {signal.Signals(-status_code).name}"
        except ValueError:
            return f"was killed by signal {-status_code}"
    return f"exited with code {status_code}"


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a room supervisor's instances), [] if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def start(name: str, args: list[str], env: dict[str, str], log_dir: str, wait_for: list[tuple[str, int]] = (),
          timeout_s: float = 30.0, pid_dir: str | None = None, nice: int = 0) -> ServiceProcess:
    """Start ``pylon <args>`` as a child (``nice`` added to its niceness); wait until every
    (host, port) in ``wait_for`` accepts."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
    log.close()
    pidfile = ""
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        pidfile = os.path.join(pid_dir, f"{name}.pid")
        with open(pidfile, "w") as fh:
            fh.write(str(proc.pid))
    sp = ServiceProcess(name, proc, log_path, pidfile)
    deadline = time.monotonic() + timeout_s
    for host, port in wait_for:
        while not port_open(host, port):
            if not sp.alive():
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{sp.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                sp.stop()
                raise RuntimeError(f"{name} did not listen on {host}:{port} in {timeout_s}s:\n{sp.log_text()[-3000:]}")
            time.sleep(0.05)
    return sp
