"""Prometheus for a local Pylon: the file_sd targets file, and a real Prometheus scraping it.

Every process announces the address of its /metrics in discovery (Redis HASH
``pylon:discinfo:<service>``, field ``metrics``; live while its score in ZSET ``pylon:disc:<service>``
is in the future, see ``services/common/discovery.py``). ``TargetsFile`` turns the live records into
``<var>/prometheus/targets.json`` in Prometheus ``file_sd`` format, one target per process labelled
``service`` and ``instance`` (the discovery id), and rewrites it, atomically, whenever the set changes:
Prometheus rereads the file by itself, so instances that come and go (a room restarted by its
supervisor, a second center) are scraped without touching Prometheus.

``start_prometheus`` runs the Debian package's ``prometheus`` with the scrape config and alert rules
of ``deploy/prometheus/`` copied beside the targets file, data in ``<var>/prometheus/data``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from services.launcher import backing

log = logging.getLogger(__name__)

# every service that announces itself in discovery (center and dispatcher included)
SERVICES = ("center", "dispatcher", "register", "saver", "coordinator", "room")
DEPLOY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "deploy", "prometheus")
DEFAULT_PORT = 9090  # Prometheus's own default; taken only while it is free
TARGETS_FILE = "targets.json"


@dataclass(frozen=True, slots=True, order=True)
class Target:
    service: str
    instance: str   # the discovery id, e.g. "room-127.0.0.1:7100"
    address: str    # "host:port" serving /metrics

    def group(self) -> dict:
        return {"targets": [self.address], "labels": {"service": self.service, "instance": self.instance}}


def parse_targets(service: str, records: list[bytes | str | None]) -> list[Target]:
    """Targets from the discovery records (JSON ``Instance``) of ``service``; a record without a
    metrics address or that does not parse is skipped (reported), never fatal."""
    out = []
    for raw in records:
        if not raw:
            continue
        try:
            data = json.loads(raw)
            instance, address = str(data["id"]), str(data.get("metrics") or "")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("skipping a bad discovery record of %s: %s", service, exc)
            continue
        if address:
            out.append(Target(service, instance, address))
    return out


def read_targets(client, now_ms: int | None = None) -> list[Target]:
    """Every live instance of every service in discovery, as scrape targets (sorted). ``client``
    is a synchronous redis-py client."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    pipe = client.pipeline(transaction=False)
    for service in SERVICES:
        pipe.zrangebyscore(f"pylon:disc:{service}", now_ms, "+inf")
    live = pipe.execute()
    pipe = client.pipeline(transaction=False)
    asked = []
    for service, ids in zip(SERVICES, live, strict=True):
        if ids:
            pipe.hmget(f"pylon:discinfo:{service}", ids)
            asked.append(service)
    targets: list[Target] = []
    for service, records in zip(asked, pipe.execute() if asked else [], strict=True):
        targets += parse_targets(service, records)
    return sorted(set(targets))


def render(targets: list[Target]) -> str:
    return json.dumps([t.group() for t in targets], indent=1) + "\n"


def write_atomically(path: str, text: str) -> None:
    """Readers (Prometheus) see the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class TargetsFile:
    """``<var>/prometheus/targets.json``, kept equal to the live instances in discovery.

    ``refresh()`` reads discovery at most every ``interval_s`` and rewrites the file only when the
    targets changed. While Redis is unreachable the file keeps the last known targets (Prometheus
    then reports them down, which is what they are likely to be)."""

    def __init__(self, path: str, redis_url: str, interval_s: float = 1.0) -> None:
        self.path = path
        self.redis_url = redis_url
        self.interval_s = interval_s
        self.targets: list[Target] | None = None  # last written
        self._client = None
        self._next_at = 0.0
        self._failing = False

    def refresh(self, force: bool = False) -> bool:
        """True if the file was (re)written."""
        now = time.monotonic()
        if not force and now < self._next_at:
            return False
        self._next_at = now + self.interval_s
        import redis

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
            targets = read_targets(self._client)
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                log.warning("cannot read discovery for %s (keeping the last targets): %s", self.path, exc)
                self._failing = True
            return False
        self._failing = False
        if targets == self.targets and os.path.exists(self.path):
            return False
        try:
            write_atomically(self.path, render(targets))
        except OSError as exc:  # a full or read-only disk must not stop the launcher
            log.warning("cannot write %s: %s", self.path, exc)
            return False
        self.targets = targets
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# ---------------------------------------------------------------------- the Prometheus process
def pick_port(host: str, wanted: int = 0) -> int:
    """``wanted`` if set; else Prometheus's default 9090 while it is free, else any free port."""
    if wanted:
        return wanted
    return DEFAULT_PORT if not backing.port_open(host, DEFAULT_PORT) else backing.free_port(host)


def install_config(prom_dir: str, scrape_interval: str | None = None, deploy_dir: str = DEPLOY_DIR) -> str:
    """Copy the scrape config and the alert rules of ``deploy_dir`` into ``prom_dir``, where their
    relative paths (``targets.json``, ``rules/*.yml``) resolve. ``scrape_interval`` (e.g. "1s")
    replaces the global scrape and rule-evaluation intervals. Returns the config's path."""
    src = os.path.join(deploy_dir, "prometheus.yml")
    try:
        with open(src) as fh:
            text = fh.read()
    except OSError as exc:
        raise backing.BackingError(f"no Prometheus config at {src}: {exc}") from None
    if scrape_interval:
        if not re.fullmatch(r"\d+(ms|s|m)", scrape_interval):
            raise ValueError(f"scrape interval {scrape_interval!r} is not a Prometheus duration like 1s")
        text = re.sub(r"(?m)^(  (?:scrape|evaluation)_interval:) *\S+", rf"\g<1> {scrape_interval}", text)
    os.makedirs(prom_dir, exist_ok=True)
    rules = os.path.join(prom_dir, "rules")
    shutil.rmtree(rules, ignore_errors=True)
    shutil.copytree(os.path.join(deploy_dir, "rules"), rules, ignore=shutil.ignore_patterns("*_test.yml"))
    path = os.path.join(prom_dir, "prometheus.yml")
    write_atomically(path, text)
    return path


def start_prometheus(prom_dir: str, port: int, host: str = "127.0.0.1", scrape_interval: str | None = None,
                     timeout_s: float = 60.0) -> backing.Managed:
    """A real Prometheus on host:port, config and rules from deploy/prometheus/, scraping
    ``<prom_dir>/targets.json``, its data in ``<prom_dir>/data``. Returns once it is ready."""
    backing.ensure_installed(["prometheus"])
    config = install_config(prom_dir, scrape_interval)
    if not os.path.exists(os.path.join(prom_dir, TARGETS_FILE)):
        write_atomically(os.path.join(prom_dir, TARGETS_FILE), "[]\n")
    if backing.port_open(host, port):
        raise backing.BackingError(f"port {port} for Prometheus is already in use; pick another with --prometheus-port")
    log_path = os.path.join(prom_dir, "prometheus.log")
    pidfile = os.path.join(prom_dir, "prometheus.pid")
    args = [backing.which("prometheus") or "prometheus", f"--config.file={config}",
            f"--storage.tsdb.path={os.path.join(prom_dir, 'data')}", f"--web.listen-address={host}:{port}",
            "--storage.tsdb.retention.time=15d"]
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(args, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))
    managed = backing.Managed("prometheus", proc, pidfile)
    try:
        _wait_ready(proc, f"http://{host}:{port}/-/ready", timeout_s, log_path)
    except BaseException:
        managed.stop()
        raise
    return managed


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise backing.BackingError(f"prometheus exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise backing.BackingError(f"prometheus was not ready at {url} within {timeout_s:g}s; see {log_path}")
