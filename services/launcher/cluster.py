"""A whole Pylon system on one machine: Redis, MariaDB and all six services as child processes.

``pylon up`` runs one with data under ./var/; the integration tests run one in a temp dir on free
ports. Every child is started and stopped by PID (PID files in ``<var>/pids``).

The system keeps its identity across restarts on the same var dir: the admin key and the demo
app (id, secret, API key) are created once and kept in ``<var>/identity.json`` (mode 0600; the
API key exists nowhere else in clear), and a later start reuses them while the app still exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from services.common import tokens
from services.common.config import CommonConfig
from services.launcher import backing, procs, prometheus, tls

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
# names of the backing stores when the cluster runs its own (restart() takes them too)
STORES = ("redis", "mariadb")


@dataclasses.dataclass(frozen=True)
class ServicePlan:
    """How a service was started: what restart() starts again."""

    args: list[str]
    wait_for: list[tuple[str, int]]
    timeout_s: float = 60.0
    nice: int = 0


def write_private_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON readable by this user only (0600), replacing ``path`` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
        with os.fdopen(fd, "w") as fh:
            fd = -1
            json.dump(data, fh, indent=2)
            fh.write("\n")
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    """The JSON object in ``path``; {} if it is missing or not a JSON object (reported)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclasses.dataclass
class Ports:
    center: int = 8080
    dispatcher: int = 8081
    register: int = 7010
    saver: int = 7020
    coordinator: int = 7030
    room: int = 7100         # instance i: room + i
    room_grpc: int = 7400    # instance i: room_grpc + i
    room_tls: int = 7300     # instance i: room_tls + i (TLS client port)
    redis: int = 6390
    mysql: int = 3307

    @classmethod
    def free(cls, room_instances: int) -> Ports:
        """Free ports for tests; room ports are consecutive, so probe a run of them."""
        import random

        def run_of(n: int) -> int:
            for _ in range(200):
                # below the kernel's ephemeral range (32768+), where outgoing sockets take ports
                start = random.randint(10000, 30000)
                if all(not backing.port_open("127.0.0.1", start + i) for i in range(n)):
                    return start
            raise RuntimeError("no free port range")

        f = backing.free_port
        return cls(center=f(), dispatcher=f(), register=f(), saver=f(), coordinator=f(),
                   room=run_of(room_instances), room_grpc=run_of(room_instances), redis=f(), mysql=f(),
                   room_tls=run_of(room_instances))


# On one machine the room tier is 6-56 processes against one register, saver and dispatcher. The
# kernel gives every runnable process the same share, so in a connect storm a lone register got
# ~1/100 of the CPU, its calls passed their deadlines and AUTHs were refused UNAVAILABLE (12,960
# at 1M). Room instances run at niceness +5: the shared services they all wait on go first.
ROOM_NICE = 5
# Benchmarks and tests on one machine open thousands of connections per second from a few loopback
# addresses, which the room's per-address limits (services/room/access.py) are there to stop on
# the internet. The local system exempts loopback from them; PYLON_ROOM_ACCESS_EXEMPT_CIDRS in
# the environment (empty: no exemption) overrides it.
LOCAL_ROOM_ENV = {"PYLON_ROOM_ACCESS_EXEMPT_CIDRS": "127.0.0.0/8,::1/128"}


class LocalCluster:
    def __init__(self, var_dir: str, ports: Ports | None = None, room_instances: int = 2,
                 common: CommonConfig | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", center_processes: int = 1, prometheus_port: int | None = None,
                 scrape_interval: str | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.var = os.path.abspath(var_dir)
        # called with one line per start-up step done (pylon up prints them); None: silent
        self.progress = progress
        self._started_t0 = time.monotonic()
        self.ports = ports or Ports()
        self.room_instances = room_instances
        # center processes sharing the center port (SO_REUSEPORT), forked by one `pylon center`
        self.center_processes = center_processes
        self.host = host
        self.extra_env = env or {}
        self.common = common  # None: start our own Redis and MariaDB
        self.admin_key = ""
        self.app: dict = {}
        self.app_created = False  # ensure_demo_app() made a new app (not one kept from a previous run)
        self.stores: list[backing.Managed] = []
        self.services: dict[str, procs.ServiceProcess] = {}
        self.plans: dict[str, ServicePlan] = {}
        self.started_at: dict[str, float] = {}  # monotonic time of each service's (and own store's) last start
        self._env: dict[str, str] = {}
        # Prometheus: targets.json is always kept (see refresh_targets); the server itself runs
        # when prometheus_port is not None (0: 9090 if free, else any free port)
        self.prometheus_port = prometheus_port
        self.scrape_interval = scrape_interval
        self.targets: prometheus.TargetsFile | None = None
        self.tls_files: tls.TlsFiles | None = None  # made by start()

    @property
    def identity_path(self) -> str:
        return os.path.join(self.var, IDENTITY_FILE)

    @property
    def center_url(self) -> str:
        return f"http://{self.host}:{self.ports.center}"

    @property
    def dispatcher_url(self) -> str:
        return f"http://{self.host}:{self.ports.dispatcher}"

    @property
    def prometheus_dir(self) -> str:
        return os.path.join(self.var, "prometheus")

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}" if self.prometheus_port else ""

    @property
    def room_addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.ports.room + i) for i in range(self.room_instances)]

    @property
    def room_tls_addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.ports.room_tls + i) for i in range(self.room_instances)]

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.var, "tls")

    def start_stores(self) -> CommonConfig:
        backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
        for name, port in (("redis", self.ports.redis), ("mariadb", self.ports.mysql)):
            if backing.port_open(self.host, port):
                raise backing.BackingError(f"port {port} for {name} is already in use; stop what holds it or pick another")
        for name in STORES:
            self._start_store(name)
            port = self.ports.redis if name == "redis" else self.ports.mysql
            self._step(f"{'Redis' if name == 'redis' else 'MariaDB'} ready on {self.host}:{port}")
        return CommonConfig(redis_url=f"redis://{self.host}:{self.ports.redis}/0", mysql_host=self.host,
                            mysql_port=self.ports.mysql, advertise_host=self.host)

    def _start_store(self, name: str) -> None:
        if name == "redis":
            store = backing.start_redis(os.path.join(self.var, "redis"), self.ports.redis, self.host)
        elif name == "prometheus":
            store = prometheus.start_prometheus(self.prometheus_dir, self.prometheus_port, self.host,
                                                self.scrape_interval)
        else:
            store = backing.start_mariadb(os.path.join(self.var, "mariadb"), self.ports.mysql, self.host)
        self.stores = [st for st in self.stores if st.name != name] + [store]
        self.started_at[name] = time.monotonic()

    def _store(self, name: str) -> backing.Managed | None:
        return next((st for st in self.stores if st.name == name), None)

    def _step(self, what: str) -> None:
        if self.progress is not None:
            self.progress(f"{time.monotonic() - self._started_t0:6.1f}s  {what}")

    def start(self) -> None:
        self._started_t0 = time.monotonic()
        os.makedirs(self.var, exist_ok=True)
        if self.common is None:
            self.common = self.start_stores()
        self.admin_key = self.admin_key or self._persisted_admin_key()
        self._env = procs.common_env(self.common, {"PYLON_CENTER_ADMIN_KEY": self.admin_key, **LOCAL_ROOM_ENV,
                                                   **self.extra_env})
        p, h = self.ports, self.host
        # a private CA and the rooms' certificate for the address they advertise (DESIGN.md §5)
        self.tls_files = tls.ensure_certs(self.tls_dir, [h, self.common.advertise_host])
        self.plans = {
            "register": ServicePlan(["register", "--host", h, "--grpc-port", str(p.register)], [(h, p.register)]),
            "saver": ServicePlan(["saver", "--host", h, "--grpc-port", str(p.saver)], [(h, p.saver)]),
            "coordinator": ServicePlan(["coordinator", "--host", h, "--grpc-port", str(p.coordinator)],
                                       [(h, p.coordinator)]),
            "center": ServicePlan(["center", "--host", h, "--port", str(p.center),
                                   *(["--processes", str(self.center_processes)] if self.center_processes > 1 else [])],
                                  [(h, p.center)]),
            "dispatcher": ServicePlan(["dispatcher", "--host", h, "--port", str(p.dispatcher)], [(h, p.dispatcher)]),
            "room": ServicePlan(["room", "--host", h, "--port", str(p.room), "--grpc-port", str(p.room_grpc),
                                 "--instances", str(self.room_instances), "--tls-port", str(p.room_tls),
                                 "--tls-cert", self.tls_files.cert, "--tls-key", self.tls_files.key],
                                self.room_addresses + self.room_tls_addresses,
                                timeout_s=60 + 2 * self.room_instances, nice=ROOM_NICE),
        }
        try:
            for name in self.plans:
                if name == "room":
                    self._start_rooms()
                    continue
                self._start_service(name)
                self._step(f"{name} ready on {', '.join(f'{h}:{p}' for h, p in self.plans[name].wait_for)}")
                if name == "saver":
                    self._step(f"migrations: {self._migrations()}")
            self._wait_discovered()
            self.targets = prometheus.TargetsFile(os.path.join(self.prometheus_dir, prometheus.TARGETS_FILE),
                                                  self.common.redis_url)
            self.refresh_targets(force=True)
            if self.prometheus_port is not None:
                self.prometheus_port = prometheus.pick_port(self.host, self.prometheus_port)
                self._start_store("prometheus")
                self._step(f"Prometheus ready on {self.prometheus_url}")
            self._step("ready")
        except Exception:
            self.stop()
            raise

    def _start_rooms(self) -> None:
        """The room tier, reporting instances k/N as their client ports open (at most one line
        a second, and the last)."""
        plan = self.plans["room"]
        self.services["room"] = sp = procs.start("room", plan.args, self._env, os.path.join(self.var, "logs"),
                                                 pid_dir=os.path.join(self.var, "pids"), nice=plan.nice)
        self.started_at["room"] = time.monotonic()
        deadline = time.monotonic() + plan.timeout_s
        n = self.room_instances
        shown, shown_at = -1, 0.0
        waiting = list(plan.wait_for)
        while True:
            waiting = [hp for hp in waiting if not backing.port_open(*hp)]
            up = sum(1 for hp in self.room_addresses if hp not in waiting)
            now = time.monotonic()
            if up != shown and (now - shown_at >= 1.0 or not waiting):
                self._step(f"room instances {up}/{n} listening")
                shown, shown_at = up, now
            if not waiting:
                return
            if not sp.alive():
                raise RuntimeError(f"room exited with {sp.proc.returncode}:\n{sp.log_text()[-3000:]}")
            if now > deadline:
                sp.stop()
                raise RuntimeError(f"room did not listen on {waiting[0][0]}:{waiting[0][1]} in {plan.timeout_s}s:\n"
                                   f"{sp.log_text()[-3000:]}")
            time.sleep(0.05)

    def _migrations(self) -> str:
        """What saver's start-up migrations left in MySQL (saver listens only after they ran)."""
        import pymysql

        c = self.common
        try:
            conn = pymysql.connect(host=c.mysql_host, port=c.mysql_port, user=c.mysql_user, password=c.mysql_password,
                                   database=c.mysql_database, unix_socket=c.mysql_unix_socket or None,
                                   connect_timeout=5)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT name FROM schema_migrations ORDER BY name")
                    names = [row[0] for row in cur.fetchall()]
            finally:
                conn.close()
        except pymysql.err.MySQLError as exc:
            return f"run by saver (not readable here: {exc})"
        return f"{len(names)} applied, latest {names[-1]}" if names else "none applied"

    def refresh_targets(self, force: bool = False) -> None:
        """Rewrite <var>/prometheus/targets.json if the live instances in discovery changed
        (reads discovery at most once a second unless ``force``)."""
        if self.targets is not None:
            self.targets.refresh(force)

    def _start_service(self, name: str) -> None:
        plan = self.plans[name]
        self.services[name] = procs.start(name, plan.args, self._env, os.path.join(self.var, "logs"),
                                          wait_for=plan.wait_for, pid_dir=os.path.join(self.var, "pids"),
                                          timeout_s=plan.timeout_s, nice=plan.nice)
        self.started_at[name] = time.monotonic()

    def names(self) -> list[str]:
        """Every process restart() knows: the services, and the stores when the cluster runs its own."""
        return [*self.plans, *(st.name for st in self.stores)]

    def alive(self, name: str) -> bool:
        sp = self.services.get(name)
        if sp is not None:
            return sp.alive()
        store = self._store(name)
        return store is not None and store.proc.poll() is None

    def exit_code(self, name: str) -> int | None:
        sp = self.services.get(name)
        proc = sp.proc if sp is not None else getattr(self._store(name), "proc", None)
        return proc.poll() if proc is not None else None

    def log_path(self, name: str) -> str:
        sp = self.services.get(name)
        if sp is not None:
            return sp.log_path
        return os.path.join(self.var, name, {"redis": "redis.log", "prometheus": "prometheus.log"}.get(name, "mariadb.log"))

    def restart(self, name: str) -> None:
        """Start service (or own store) ``name`` again with the arguments it was first started
        with: after it was stopped or killed, or now (it is stopped first). Waits until it listens."""
        if name not in self.plans and self._store(name) is None:
            raise KeyError(f"no service or store named {name!r} in this cluster")
        if name in self.plans:
            sp = self.services.pop(name, None)
            if sp is not None:
                sp.stop(timeout_s=20)  # no-op for a dead process, but reaps it and removes its PID file
            if name == "room":
                self._wait_room_ports_free()
            self._start_service(name)
        else:
            store = self._store(name)
            store.stop()
            self._start_store(name)
        log.info("restarted %s", name)

    def _wait_room_ports_free(self) -> None:
        """A room supervisor that was killed leaves its instances draining (they get SIGTERM when
        it dies) until they close their gRPC ports; a new tier can bind only after that."""
        ports = [port for _, port in self.room_addresses + self.room_tls_addresses]
        ports += [self.ports.room_grpc + i for i in range(self.room_instances)]
        deadline = time.monotonic() + 30  # room drain_timeout_s (10) + its gRPC grace, with margin
        while time.monotonic() < deadline:
            if not any(backing.port_open(self.host, port) for port in ports):
                return
            time.sleep(0.1)
        raise RuntimeError(f"room ports {ports} still held 30 s after the room tier stopped")

    def _wait_discovered(self) -> None:
        """Until every room instance is live in discovery and the dispatcher hands out rooms."""
        import redis

        timeout_s = 30 + self.room_instances  # ~1 s of CPU per instance start-up on 2 cores
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.common.redis_url)
        try:
            while time.monotonic() < deadline:
                live = client.zcount("pylon:disc:room", int(time.time() * 1000), "+inf")
                if live >= self.room_instances and self._dispatcher_answers():
                    self._step(f"room instances {live}/{self.room_instances} in discovery; dispatcher hands them out")
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError("room instances did not appear in discovery; see logs in " + os.path.join(self.var, "logs"))

    def _dispatcher_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dispatcher_url}/v1/route?uid=probe", timeout=2) as r:
                return bool(json.load(r)["rooms"])
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    def api(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.center_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key or self.admin_key}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def create_app(self, app_id: str, **fields) -> dict:
        status, body = self.api("POST", "/v1/apps", {"id": app_id, **fields})
        if status != 200 and status != 201:
            raise RuntimeError(f"creating app {app_id} failed: {status} {body}")
        return body

    def create_demo_app(self) -> dict:
        for n in range(1, 1000):
            app_id = "demo" if n == 1 else f"demo-{n}"
            status, body = self.api("POST", "/v1/apps", {"id": app_id})
            if status in (200, 201):
                self.app = {"id": body["id"], "secret": body["secret"], "api_key": body["api_key"]}
                return self.app
            if status != 409:
                raise RuntimeError(f"creating the demo app failed: {status} {body}")
        raise RuntimeError("no free demo app id")

    # ------------------------------------------------------------------ identity across restarts
    def _persisted_admin_key(self) -> str:
        """The admin key of this var dir: created on its first start, then the same one."""
        identity = read_json(self.identity_path)
        key = identity.get("admin_key")
        if not (isinstance(key, str) and len(key) >= 8):
            # a var dir from before identity.json: keep the admin key its local.json told users
            old = read_json(os.path.join(self.var, "local.json")).get("admin_key")
            key = old if isinstance(old, str) and len(old) >= 8 else "ak_" + secrets.token_urlsafe(24)
            write_private_json(self.identity_path, {**identity, "admin_key": key})
        return key

    def ensure_demo_app(self) -> dict:
        """The demo app of this var dir: the one created before if it still exists (checked with
        its API key), else a new one; remembered in identity.json. Needs a started cluster."""
        identity = read_json(self.identity_path)
        app = identity.get("app")
        if not _app_fields(app):
            app = read_json(os.path.join(self.var, "local.json")).get("app")  # a var dir from before identity.json
        if _app_fields(app):
            app = self._verified_app(app)
        else:
            app = None
        self.app_created = app is None
        if app is None:
            app = self.create_demo_app()
            log.info("created demo app %s", app["id"])
        self.app = app
        write_private_json(self.identity_path, {**identity, "admin_key": self.admin_key, "app": app})
        return app

    def _verified_app(self, app: dict) -> dict | None:
        """``app`` if it still exists with that secret and API key; with a new API key or secret
        if the stored one no longer works (rotated); None if the app is gone (its database was lost).
        Center never shows a secret again after create and rotate, so a token it mints is the check."""
        status, body = self.api("GET", f"/v1/apps/{app['id']}")
        if status == 404:
            log.warning("demo app %s no longer exists; creating a new one", app["id"])
            return None
        if status != 200:
            raise RuntimeError(f"checking the demo app {app['id']} failed: {status} {body}")
        status, body = self.api("POST", "/v1/tokens", {"uid": "launcher-check", "app": app["id"]}, key=app["api_key"])
        if status == 200:
            return self._with_current_secret(app, body.get("token", ""))
        if status not in (401, 403):  # 403: the stored key belongs to another app
            raise RuntimeError(f"checking the demo app's API key failed: {status} {body}")
        status, body = self.api("POST", f"/v1/apps/{app['id']}/rotate-key")
        if status != 200:
            raise RuntimeError(f"the demo app's API key no longer works and rotating it failed: {status} {body}")
        log.warning("the demo app's stored API key no longer works (rotated?); it has a new one")
        app = {**app, "api_key": body["api_key"]}
        status, body = self.api("POST", "/v1/tokens", {"uid": "launcher-check", "app": app["id"]}, key=app["api_key"])
        return self._with_current_secret(app, body.get("token", "") if status == 200 else "")

    def _with_current_secret(self, app: dict, token: str) -> dict:
        """``app``, with a new secret if a token center signed does not verify with the stored one."""
        try:
            parsed = tokens.ParsedToken(token)
        except tokens.TokenError:
            return app  # nothing to check against
        try:
            parsed.check(app["secret"])
            return app
        except tokens.TokenError:
            pass
        status, body = self.api("POST", f"/v1/apps/{app['id']}/rotate-secret")
        if status != 200:
            raise RuntimeError(f"the demo app's secret no longer works and rotating it failed: {status} {body}")
        log.warning("the demo app's stored secret no longer signs its tokens (rotated?); it has a new one")
        return {**app, "secret": body["secret"]}

    def local_json(self) -> dict:
        return {"center": self.center_url, "dispatcher": self.dispatcher_url, "app": self.app,
                "admin_key": self.admin_key,
                "rooms": [f"{h}:{p}" for h, p in self.room_addresses],
                "tls_ca": self.tls_files.ca if self.tls_files is not None else ""}

    def write_local_json(self, path: str) -> None:
        write_private_json(path, self.local_json())  # it holds the admin key and the app's secret

    def stop(self) -> None:
        for name in ("room", "dispatcher", "center", "coordinator", "saver", "register"):
            sp = self.services.pop(name, None)
            if sp is not None:
                sp.stop(timeout_s=20)
        for store in reversed(self.stores):
            store.stop()
        self.stores.clear()
        if self.targets is not None:
            self.targets.close()


def _app_fields(app) -> bool:
    return isinstance(app, dict) and all(isinstance(app.get(k), str) and app.get(k) for k in ("id", "secret", "api_key"))
