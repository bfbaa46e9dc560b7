"""Start and stop the backing stores (redis-server, MariaDB) as child processes with data in a dir.

Used by ``pylon up`` (data under ./var/) and by the integration tests (data in a temp dir, free
ports). Processes are stopped by PID only; PID files are kept next to the data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

APT_PACKAGES = {"redis-server": "redis-server", "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
                "prometheus": "prometheus", "promtool": "prometheus"}


class BackingError(Exception):
    """A backing store could not be installed or started; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def which(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None)


def ensure_installed(binaries: list[str]) -> None:
    """apt-get install the packages that provide missing binaries (needs root)."""
    missing = sorted({APT_PACKAGES[b] for b in binaries if which(b) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise BackingError(f"missing {', '.join(missing)}: run `sudo apt-get install -y {' '.join(missing)}`")
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # The packages' own init scripts would start system-wide servers; forbid that.
    policy = "/usr/sbin/policy-rc.d"
    created_policy = not os.path.exists(policy)
    if created_policy:
        with open(policy, "w") as fh:
            fh.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        if created_policy:
            os.unlink(policy)


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    pidfile: str

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass


def _wait_port(name: str, proc: subprocess.Popen, host: str, port: int, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackingError(f"{name} exited with {proc.returncode}; see {log_path}")
        if port_open(host, port):
            return
        time.sleep(0.1)
    proc.kill()
    raise BackingError(f"{name} did not listen on {host}:{port} within {timeout_s}s; see {log_path}")


def _wait_redis_loaded(proc: subprocess.Popen, host: str, port: int, timeout_s: float, log_path: str) -> None:
    """Redis accepts connections while it replays its append-only file and answers -LOADING
    until it is done; wait for a PONG so callers never meet a half-loaded dataset."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackingError(f"redis-server exited with {proc.returncode}; see {log_path}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise BackingError(f"redis-server on {host}:{port} still loading its data after {timeout_s}s; see {log_path}")


def start_redis(data_dir: str, port: int, host: str = "127.0.0.1") -> Managed:
    """redis-server with its data in ``data_dir``: an append-only file (appendonlydir/) written on
    every change and fsynced once a second, so a restart on the same dir, after a crash or
    kill -9 too, finds every write Redis answered (what reached the kernel survives a process
    crash; a host crash may lose the last second). No RDB snapshots: the AOF is the copy."""
    os.makedirs(data_dir, exist_ok=True)
    log_path = os.path.join(data_dir, "redis.log")
    pidfile = os.path.join(data_dir, "redis.pid")
    args = [which("redis-server") or "redis-server", "--port", str(port), "--bind", host, "--dir", data_dir,
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
            "--logfile", log_path, "--maxclients", "10000", "--protected-mode", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))
    _wait_port("redis-server", proc, host, port, 15, log_path)
    _wait_redis_loaded(proc, host, port, 60, log_path)
    return Managed("redis", proc, pidfile)


def start_mariadb(data_dir: str, port: int, host: str = "127.0.0.1") -> Managed:
    """A private MariaDB with root/no password on host:port and a socket in data_dir. Every
    commit is written and fsynced to the redo log before it returns
    (innodb-flush-log-at-trx-commit=1), so a committed row survives a crash of the host, not
    only of mariadbd: the saver answers a Store only after its INSERT committed."""
    os.makedirs(data_dir, exist_ok=True)
    datadir = os.path.join(data_dir, "data")
    log_path = os.path.join(data_dir, "mariadb.log")
    pidfile = os.path.join(data_dir, "mariadb.pid")
    if not os.path.isdir(os.path.join(datadir, "mysql")):
        install = which("mariadb-install-db") or "mariadb-install-db"
        with open(log_path, "ab") as log:
            r = subprocess.run([install, f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=normal",
                                "--skip-test-db", "--no-defaults"], stdout=log, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise BackingError(f"mariadb-install-db failed; see {log_path}")
    args = [which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root",
            f"--port={port}", f"--bind-address={host}", f"--socket={os.path.join(data_dir, 'mysqld.sock')}",
            f"--pid-file={os.path.join(data_dir, 'mariadbd.pid')}", "--skip-name-resolve", "--skip-log-bin",
            "--innodb-buffer-pool-size=256M", "--innodb-flush-log-at-trx-commit=1", "--max-connections=500",
            "--innodb-log-file-size=128M", f"--log-error={log_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))
    _wait_port("mariadbd", proc, host, port, 60, log_path)
    return Managed("mariadb", proc, pidfile)
