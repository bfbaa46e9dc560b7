"""A whole Pylon system for fault tests, every process started and killed by the test.

Like ``LocalCluster`` (same services, same arguments), with three differences a fault test needs:

* every process can be killed (``kill -9``) and started again on its own, on the same ports and
  data dirs; Redis and MariaDB included;
* TCP proxies (``tests/fault/proxy.py``) sit on three paths and can cut them: the room instances
  bind 127.0.0.5 and the register 127.0.0.6 while they advertise 127.0.0.1, where a proxy on the
  same port forwards to them; the saver reaches Redis through a proxy of its own (its redis_url
  points at the proxy);
* the room supervisor's instances are found by the listening socket they own, so one instance can
  be killed and its restart by the supervisor observed.

PID files go to ``<dir>/pids`` (services) and next to the store's data (Redis, MariaDB).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from services.common.config import CommonConfig
from services.launcher import backing, procs
from services.launcher.cluster import ROOM_NICE, Ports
from tests.fault.proxy import ProxyLoop, TcpProxy

ADVERTISE_HOST = "127.0.0.1"
ROOM_BIND = "127.0.0.5"       # room instances bind here; their proxies listen on ADVERTISE_HOST
REGISTER_BIND = "127.0.0.6"   # register binds here; its proxy listens on ADVERTISE_HOST

SERVICE_ORDER = ("register", "saver", "coordinator", "center", "dispatcher", "room")

SERVICE_ENV = {
    "PYLON_LOG_LEVEL": "INFO",
}


class FaultSystemError(AssertionError):
    """The system did not reach the state a fault test waited for; the message says what is missing."""


@dataclass
class _Plan:
    args: list[str]
    wait_for: list[tuple[str, int]]
    env: dict[str, str]
    nice: int = 0
    timeout_s: float = 60.0


def _listen_inodes(host: str, port: int) -> set[str]:
    """Inodes of LISTEN sockets bound to host:port (IPv4), from /proc/net/tcp."""
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    inodes = set()
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":
                inodes.add(parts[9])
    return inodes


def _ss_ports(args: list[str]) -> dict[int, set[str]] | None:
    """local port -> socket inodes, from ``ss -Htne <args>`` (the kernel filters: cheap even when
    the machine holds a million sockets, where reading /proc/net/tcp takes seconds); None without ss."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run([ss, "-Htne", *args], capture_output=True, text=True, timeout=30).stdout
    ports: dict[int, set[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        local = next((p for p in parts if ":" in p and not p.startswith(("ino:", "sk:", "cgroup:"))), None)
        ino = next((p[4:] for p in parts if p.startswith("ino:")), None)
        if local is not None and ino is not None:
            ports.setdefault(int(local.rsplit(":", 1)[1]), set()).add(ino)
    return ports


def _socket_inodes(host: str, port: int) -> set[str]:
    """Inodes of the sockets (any state) whose local address is host:port: IPv4 sockets in
    /proc/net/tcp, and dual-stack ones (gRPC's) as ::ffff:host in /proc/net/tcp6."""
    v4 = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}"
    wants = {"/proc/net/tcp": f"{v4}:{port:04X}", "/proc/net/tcp6": f"0000000000000000FFFF0000{v4}:{port:04X}"}
    out = set()
    for path, want in wants.items():
        try:
            with open(path) as fh:
                next(fh)
                out.update(parts[9] for parts in (line.split() for line in fh) if parts[1] == want)
        except FileNotFoundError:
            pass
    return out


def _owns_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _reap(pid: int) -> None:
    """Collect a killed child of ours that no Popen object waits for (none here: instances are
    the supervisor's children, reaped by it or by init)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class FaultSystem:
    def __init__(self, base_dir: str, room_instances: int = 2, database: str = "pylon_fault") -> None:
        self.dir = os.path.abspath(base_dir)
        self.room_instances = room_instances
        self.ports = Ports.free(room_instances)
        self.redis_proxy_port = backing.free_port()
        self.common = CommonConfig(redis_url=f"redis://{ADVERTISE_HOST}:{self.ports.redis}/0",
                                   mysql_host=ADVERTISE_HOST, mysql_port=self.ports.mysql, mysql_database=database,
                                   advertise_host=ADVERTISE_HOST, discovery_ttl_s=3, discovery_refresh_s=0.5)
        self.admin_key = "ak_" + secrets.token_urlsafe(24)
        self.app: dict = {}
        self.logs = os.path.join(self.dir, "logs")
        self.pids = os.path.join(self.dir, "pids")
        self.proxy_loop = ProxyLoop()
        self.proxies: dict[str, TcpProxy] = {}
        self.stores: dict[str, backing.Managed] = {}
        self.services: dict[str, procs.ServiceProcess] = {}
        self.plans = self._plans()

    # ------------------------------------------------------------------ addresses

    @property
    def center_url(self) -> str:
        return f"http://{ADVERTISE_HOST}:{self.ports.center}"

    @property
    def dispatcher_url(self) -> str:
        return f"http://{ADVERTISE_HOST}:{self.ports.dispatcher}"

    def room_port(self, i: int) -> int:
        return self.ports.room + i

    def _plans(self) -> dict[str, _Plan]:
        p = self.ports
        env = procs.common_env(self.common, {"PYLON_CENTER_ADMIN_KEY": self.admin_key, **SERVICE_ENV})
        saver_env = dict(env, PYLON_REDIS_URL=f"redis://{ADVERTISE_HOST}:{self.redis_proxy_port}/0")
        h = ADVERTISE_HOST
        k = self.room_instances
        return {
            "register": _Plan(["register", "--host", REGISTER_BIND, "--grpc-port", str(p.register)],
                              [(REGISTER_BIND, p.register)], env),
            "saver": _Plan(["saver", "--host", h, "--grpc-port", str(p.saver)], [(h, p.saver)], saver_env),
            "coordinator": _Plan(["coordinator", "--host", h, "--grpc-port", str(p.coordinator)],
                                 [(h, p.coordinator)], env),
            "center": _Plan(["center", "--host", h, "--port", str(p.center)], [(h, p.center)], env),
            "dispatcher": _Plan(["dispatcher", "--host", h, "--port", str(p.dispatcher)], [(h, p.dispatcher)], env),
            "room": _Plan(["room", "--host", ROOM_BIND, "--port", str(p.room), "--grpc-port", str(p.room_grpc),
                           "--instances", str(k)], [(ROOM_BIND, p.room + i) for i in range(k)], env,
                          nice=ROOM_NICE, timeout_s=60 + 2 * k),
        }

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
        self._start_proxies()
        self.start_store("redis")
        self.start_store("mariadb")
        for name in SERVICE_ORDER:
            self.start_service(name)
        self.wait_discovered(60)
        self.app = self._create_app()

    def _start_proxies(self) -> None:
        p, h = self.ports, ADVERTISE_HOST
        for i in range(self.room_instances):
            self.proxies[f"room{i}"] = TcpProxy(self.proxy_loop, f"room{i}", (h, p.room + i),
                                                (ROOM_BIND, p.room + i)).start()
            self.proxies[f"room{i}-grpc"] = TcpProxy(self.proxy_loop, f"room{i}-grpc", (h, p.room_grpc + i),
                                                     (ROOM_BIND, p.room_grpc + i)).start()
        self.proxies["register"] = TcpProxy(self.proxy_loop, "register", (h, p.register),
                                            (REGISTER_BIND, p.register)).start()
        self.proxies["saver-redis"] = TcpProxy(self.proxy_loop, "saver-redis", (h, self.redis_proxy_port),
                                               (h, p.redis)).start()

    def start_store(self, name: str) -> None:
        if name == "redis":
            self.stores[name] = backing.start_redis(os.path.join(self.dir, "redis"), self.ports.redis, ADVERTISE_HOST)
        elif name == "mariadb":
            self.stores[name] = backing.start_mariadb(os.path.join(self.dir, "mariadb"), self.ports.mysql,
                                                      ADVERTISE_HOST)
        else:
            raise ValueError(name)

    def start_service(self, name: str, note: str = "") -> procs.ServiceProcess:
        plan = self.plans[name]
        if note:
            os.makedirs(self.logs, exist_ok=True)
            with open(os.path.join(self.logs, f"{name}.log"), "a") as fh:
                fh.write(f"\n---- fault test {time.strftime('%H:%M:%S')}: {note}\n")
        sp = procs.start(name, plan.args, plan.env, self.logs, wait_for=plan.wait_for, pid_dir=self.pids,
                         timeout_s=plan.timeout_s, nice=plan.nice)
        self.services[name] = sp
        return sp

    def _create_app(self) -> dict:
        status, body = self.api("POST", "/v1/apps", {"id": "fault"}, key=self.admin_key)
        if status not in (200, 201):
            raise FaultSystemError(f"creating the app failed: {status} {body}")
        return {"id": body["id"], "secret": body["secret"], "api_key": body["api_key"]}

    def api(self, method: str, path: str, body: dict | None = None, key: str | None = None,
            timeout_s: float = 5.0) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.center_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key or self.app['api_key']}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    # ------------------------------------------------------------------ state

    def live_rooms(self) -> int:
        import redis

        client = redis.Redis.from_url(self.common.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return client.zcount("pylon:disc:room", int(time.time() * 1000), "+inf")
        finally:
            client.close()

    def dispatcher_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dispatcher_url}/v1/route?uid=probe", timeout=2) as r:
                return bool(json.load(r)["rooms"])
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    def wait_discovered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        live = -1
        while time.monotonic() < deadline:
            try:
                live = self.live_rooms()
            except Exception:
                live = -1
            if live >= self.room_instances and self.dispatcher_answers():
                return
            time.sleep(0.2)
        raise FaultSystemError(f"{live} of {self.room_instances} room instances live in discovery after "
                               f"{timeout_s} s (or the dispatcher hands out no room); logs in {self.logs}")

    def room_instance_pid(self, i: int) -> int | None:
        """PID of the supervisor's child that listens on instance i's client port, None if none does."""
        return self.room_instance_pids()[i]

    def room_instance_pids(self) -> list[int | None]:
        """For each instance, the PID of the supervisor's child listening on its client port (or None)."""
        sup = self.services.get("room")
        if sup is None or not sup.alive():
            return [None] * self.room_instances
        listening = _ss_ports(["-l", "src", ROOM_BIND])
        children = procs.children(sup.pid)
        out: list[int | None] = []
        for i in range(self.room_instances):
            port = self.room_port(i)
            inodes = listening.get(port, set()) if listening is not None else _listen_inodes(ROOM_BIND, port)
            out.append(next((pid for pid in children if inodes and _owns_socket(pid, inodes)), None))
        return out

    def room_client_ports(self, proxy_port: int) -> set[int]:
        """Local ports of the room instances' connections to the proxy on ``proxy_port`` (one look-up)."""
        clients = _ss_ports(["state", "established", f"( dport = :{proxy_port} )"]) or {}
        pids = [pid for pid in self.room_instance_pids() if pid]
        return {port for port, inodes in clients.items() if any(_owns_socket(pid, inodes) for pid in pids)}

    def from_rooms(self, peer: tuple[str, int], proxy_port: int) -> bool:
        """True if the connection from ``peer`` to the proxy on ``proxy_port`` belongs to a room instance."""
        clients = _ss_ports(["state", "established", f"( dport = :{proxy_port} )"])
        inodes = clients.get(peer[1], set()) if clients is not None else _socket_inodes(peer[0], peer[1])
        return bool(inodes) and any(_owns_socket(pid, inodes) for pid in self.room_instance_pids() if pid)

    def problems(self) -> list[str]:
        """What is down right now (empty: every process is up and listening)."""
        out = []
        for name, store in self.stores.items():
            if store.proc.poll() is not None:
                out.append(f"{name} exited with {store.proc.returncode}")
        for name in SERVICE_ORDER:
            sp = self.services.get(name)
            if sp is None or not sp.alive():
                out.append(f"{name} is not running" + (f" (exit {sp.proc.returncode})" if sp else ""))
        for i, pid in enumerate(self.room_instance_pids()):
            if pid is None:
                out.append(f"room instance {i} (port {self.room_port(i)}) is not listening")
        return out

    # ------------------------------------------------------------------ faults

    def kill(self, name: str) -> int:
        """kill -9 one store or service (the room supervisor with all its instances); returns the PID."""
        if name in self.stores:
            proc = self.stores[name].proc
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return proc.pid
        sp = self.services[name]
        instances = procs.children(sp.pid) if name == "room" else []
        os.kill(sp.pid, signal.SIGKILL)
        for pid in instances:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sp.proc.wait(10)
        for pid in instances:
            _wait_gone(pid, 10)
        return sp.pid

    def wipe_redis(self) -> list[str]:
        """Delete a killed Redis's data (its append-only dir, any snapshot): it comes back empty."""
        if self.stores["redis"].proc.poll() is None:
            raise FaultSystemError("wipe_redis: Redis is still running")
        data = os.path.join(self.dir, "redis")
        gone = []
        for entry in os.listdir(data):
            path = os.path.join(data, entry)
            if entry == "appendonlydir" or entry.endswith((".rdb", ".aof")):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                gone.append(entry)
        return gone

    def kill_room_supervisor(self) -> tuple[int, list[int]]:
        """kill -9 the room supervisor alone; its instances are told by the kernel (they asked for
        SIGTERM when their parent dies). Returns (supervisor pid, instance pids)."""
        sp = self.services["room"]
        instances = procs.children(sp.pid)
        os.kill(sp.pid, signal.SIGKILL)
        sp.proc.wait(10)
        return sp.pid, instances

    def wait_gone(self, pids: list[int], timeout_s: float) -> list[int]:
        """Wait until none of ``pids`` runs; returns those still running at the deadline."""
        deadline = time.monotonic() + timeout_s
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _running(p)]
            if alive:
                time.sleep(0.05)
        return alive

    def kill_room_instance(self, i: int) -> int:
        pid = self.room_instance_pid(i)
        if pid is None:
            raise FaultSystemError(f"no room instance listens on port {self.room_port(i)}")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)
        return pid

    def restart(self, name: str, note: str = "") -> None:
        """Start a killed store or service again on the same ports and data dirs."""
        if name in ("redis", "mariadb"):
            self.start_store(name)
        else:
            self.start_service(name, note or "restarted after kill -9")

    def crash_host(self) -> list[int]:
        """kill -9 every process of the system at once (a power cut); returns the PIDs."""
        victims: list[int] = []
        room = self.services.get("room")
        if room is not None:
            victims.extend(procs.children(room.pid))
        victims.extend(sp.pid for sp in self.services.values())
        victims.extend(st.proc.pid for st in self.stores.values())
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for sp in self.services.values():
            sp.proc.wait(10)
        for st in self.stores.values():
            st.proc.wait(10)
        for pid in victims:
            _wait_gone(pid, 10)
        return victims

    def restart_all(self, note: str) -> None:
        self.start_store("redis")
        self.start_store("mariadb")
        for name in SERVICE_ORDER:
            self.start_service(name, note)

    def repair(self) -> list[str]:
        """Start again whatever is down (a room tier with a missing instance as a whole); returns what it did."""
        done = []
        for name in ("redis", "mariadb"):
            store = self.stores.get(name)
            if store is None or store.proc.poll() is not None:
                self.start_store(name)
                done.append(f"started {name}")
        for name in SERVICE_ORDER:
            sp = self.services.get(name)
            if name == "room" and sp is not None and sp.alive() and None in self.room_instance_pids():
                self.kill("room")
                sp = None
            if sp is None or not sp.alive():
                self.start_service(name, "started again by the fault test's repair step")
                done.append(f"started {name}")
        return done

    def restart_rooms(self) -> None:
        """Stop the room tier (SIGTERM: drain) and start it again: every client connects anew."""
        sp = self.services.get("room")
        if sp is not None:
            sp.stop(timeout_s=20)
        self.start_service("room", "restarted by the fault test's repair step (system up but not whole)")

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        room = self.services.get("room")
        instances = procs.children(room.pid) if room is not None and room.alive() else []
        for sp in self.services.values():  # all at once: each drains on its own, in parallel
            sp.signal(signal.SIGTERM)
        for name in reversed(SERVICE_ORDER):
            sp = self.services.pop(name, None)
            if sp is not None:
                sp.stop(timeout_s=15)
        for pid in instances:  # orphans of a supervisor that died before them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in ("mariadb", "redis"):
            store = self.stores.pop(name, None)
            if store is not None:
                store.stop()
        for proxy in self.proxies.values():
            try:
                proxy.stop()
            except Exception:
                pass
        self.proxy_loop.close()

    def log_tail(self, name: str, lines: int = 40, grep: tuple[str, ...] = ()) -> str:
        """The last lines of a service's log (or of Redis's/MariaDB's), optionally only those with a word."""
        paths = {"redis": os.path.join(self.dir, "redis", "redis.log"),
                 "mariadb": os.path.join(self.dir, "mariadb", "mariadb.log")}
        path = paths.get(name, os.path.join(self.logs, f"{name}.log"))
        try:
            with open(path, errors="replace") as fh:
                text = fh.read().splitlines()
        except FileNotFoundError:
            return f"(no log at {path})"
        if grep:
            text = [t for t in text if any(g in t for g in grep)]
        return "\n".join(text[-lines:])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return  # dead, waiting for its parent to collect it
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.02)
    raise FaultSystemError(f"process {pid} still alive {timeout_s} s after SIGKILL")
