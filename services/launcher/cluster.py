"""A whole Pylon system on one machine: Redis, MariaDB and all six services as child processes.

``pylon up`` runs one with data under ./var/; the integration tests run one in a temp dir on free
ports. Every child is started and stopped by PID (PID files in ``<var>/pids``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
import urllib.error
import urllib.request

from services.common.config import CommonConfig
from services.launcher import backing, procs


@dataclasses.dataclass
class Ports:
    center: int = 8080
    dispatcher: int = 8081
    register: int = 7010
    saver: int = 7020
    coordinator: int = 7030
    room: int = 7100         # instance i: room + i
    room_grpc: int = 7400    # instance i: room_grpc + i
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
                   room=run_of(room_instances), room_grpc=run_of(room_instances), redis=f(), mysql=f())


# On one machine the room tier is 6-56 processes against one register, saver and dispatcher. The
# kernel gives every runnable process the same share, so in a connect storm a lone register got
# ~1/100 of the CPU, its calls passed their deadlines and AUTHs were refused UNAVAILABLE (12,960
# at 1M). Room instances run at niceness +5: the shared services they all wait on go first.
ROOM_NICE = 5


class LocalCluster:
    def __init__(self, var_dir: str, ports: Ports | None = None, room_instances: int = 2,
                 common: CommonConfig | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.var = os.path.abspath(var_dir)
        self.ports = ports or Ports()
        self.room_instances = room_instances
        self.host = host
        self.extra_env = env or {}
        self.common = common  # None: start our own Redis and MariaDB
        self.admin_key = ""
        self.app: dict = {}
        self.stores: list[backing.Managed] = []
        self.services: dict[str, procs.ServiceProcess] = {}

    @property
    def center_url(self) -> str:
        return f"http://{self.host}:{self.ports.center}"

    @property
    def dispatcher_url(self) -> str:
        return f"http://{self.host}:{self.ports.dispatcher}"

    @property
    def room_addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.ports.room + i) for i in range(self.room_instances)]

    def start_stores(self) -> CommonConfig:
        backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
        for name, port in (("redis", self.ports.redis), ("mariadb", self.ports.mysql)):
            if backing.port_open(self.host, port):
                raise backing.BackingError(f"port {port} for {name} is already in use; stop what holds it or pick another")
        self.stores.append(backing.start_redis(os.path.join(self.var, "redis"), self.ports.redis, self.host))
        self.stores.append(backing.start_mariadb(os.path.join(self.var, "mariadb"), self.ports.mysql, self.host))
        return CommonConfig(redis_url=f"redis://{self.host}:{self.ports.redis}/0", mysql_host=self.host,
                            mysql_port=self.ports.mysql, advertise_host=self.host)

    def start(self) -> None:
        os.makedirs(self.var, exist_ok=True)
        if self.common is None:
            self.common = self.start_stores()
        self.admin_key = self.admin_key or "ak_" + secrets.token_urlsafe(24)
        env = procs.common_env(self.common, {"PYLON_CENTER_ADMIN_KEY": self.admin_key, **self.extra_env})
        logs = os.path.join(self.var, "logs")
        pids = os.path.join(self.var, "pids")
        p, h = self.ports, self.host

        def start(name: str, args: list[str], wait: list[tuple[str, int]], timeout_s: float = 60, nice: int = 0) -> None:
            self.services[name] = procs.start(name, args, env, logs, wait_for=wait, pid_dir=pids, timeout_s=timeout_s,
                                              nice=nice)

        try:
            start("register", ["register", "--host", h, "--grpc-port", str(p.register)], [(h, p.register)])
            start("saver", ["saver", "--host", h, "--grpc-port", str(p.saver)], [(h, p.saver)])
            start("coordinator", ["coordinator", "--host", h, "--grpc-port", str(p.coordinator)], [(h, p.coordinator)])
            start("center", ["center", "--host", h, "--port", str(p.center)], [(h, p.center)])
            start("dispatcher", ["dispatcher", "--host", h, "--port", str(p.dispatcher)], [(h, p.dispatcher)])
            start("room", ["room", "--host", h, "--port", str(p.room), "--grpc-port", str(p.room_grpc),
                           "--instances", str(self.room_instances)], self.room_addresses,
                  timeout_s=60 + 2 * self.room_instances, nice=ROOM_NICE)
            self._wait_discovered()
        except Exception:
            self.stop()
            raise

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

    def local_json(self) -> dict:
        return {"center": self.center_url, "dispatcher": self.dispatcher_url, "app": self.app,
                "admin_key": self.admin_key,
                "rooms": [f"{h}:{p}" for h, p in self.room_addresses]}

    def write_local_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.local_json(), fh, indent=2)
            fh.write("\n")

    def stop(self) -> None:
        for name in ("room", "dispatcher", "center", "coordinator", "saver", "register"):
            sp = self.services.pop(name, None)
            if sp is not None:
                sp.stop(timeout_s=20)
        for store in reversed(self.stores):
            store.stop()
        self.stores.clear()
