"""Hold N authenticated connections against a private Pylon system and print JSON.

    .venv/bin/python bench/connections.py --connections 100000

Starts its own Redis, MariaDB and all services (room instances sized for N) on free ports in a
temp dir, then W client worker processes (each under the 20,000 open-file cap) that route every
uid through the dispatcher, connect from loopback source addresses 127.0.0.2... (so the
ephemeral-port range is per source address), authenticate, and keep heartbeats. Bounded in count
and time: every phase has a deadline, and everything stops by itself.

Printed JSON: connections held, connect rate, time to full, room RSS per connection, per-instance
baseline RSS, sessions in register, CPU seconds of servers and clients per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PER_WORKER = 18_000
SYSCTLS = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.core.netdev_max_backlog": "16384",
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
}
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# ---------------------------------------------------------------------------- process facts
def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def set_sysctls(keys) -> tuple[dict, dict]:
    """Apply SYSCTLS[keys]; return (what was applied, the previous values to restore)."""
    applied, previous = {}, {}
    for key in keys:
        value = SYSCTLS[key]
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path) as fh:
                previous[key] = fh.read().strip().replace("\t", " ")
            with open(path, "w") as fh:
                fh.write(value)
            applied[key] = value
        except OSError as exc:
            applied[key] = f"not set: {exc.strerror}"
    return applied, previous


def restore_sysctls(previous: dict) -> None:
    # the widened port range would let outgoing sockets take service ports (7030, 8080 ...) later
    for key, value in previous.items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
                fh.write(value)
        except OSError:
            pass


# ---------------------------------------------------------------------------- worker
class BenchConn:
    """Lean client connection: counts AUTH_OK, answers nothing, pings on the worker's schedule."""

    __slots__ = ("transport", "worker", "authed", "retry_ms")

    def __init__(self, worker) -> None:
        self.worker = worker
        self.transport = None
        self.authed = False
        self.retry_ms = 0  # set from an ERROR's retry_after_ms: come back later, like the SDK

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        w = self.worker
        # frames are small and rarely split; only op matters (byte 5 of each header)
        pos = 0
        while pos + 12 <= len(data):
            length = int.from_bytes(data[pos:pos + 4], "big")
            op = data[pos + 5]
            if op == 2 and not self.authed:
                self.authed = True
                w.on_auth_ok(self)
            elif op == 13:
                self.retry_ms = w.on_error(data[pos + 12:pos + length])
            elif op == 4:
                w.pongs += 1
            if length < 12:
                break
            pos += length

    def connection_lost(self, exc):
        self.worker.on_lost(self)

    def eof_received(self):
        return False

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


class Worker:
    def __init__(self, args) -> None:
        self.args = args
        self.held = 0
        self.errors = 0
        self.failed = 0
        self.pongs = 0
        self.lost = 0
        self.conns: list[BenchConn] = []
        self.error_kinds: dict[str, int] = {}
        self.retries = 0
        self._inflight = asyncio.Semaphore(args.inflight)
        self._waiters: dict[BenchConn, asyncio.Future] = {}

    def on_auth_ok(self, conn):
        self.held += 1
        fut = self._waiters.pop(conn, None)
        if fut and not fut.done():
            fut.set_result(True)

    def on_error(self, body: bytes) -> int:
        from services.common.pb import client_pb2 as cpb

        self.errors += 1
        retry_ms = 0
        try:
            err = cpb.Error.FromString(body)
            key = f"{err.code}:{err.message[:60]}"
            retry_ms = err.retry_after_ms
        except Exception:
            key = "undecodable"
        self.error_kinds[key] = self.error_kinds.get(key, 0) + 1
        return retry_ms

    def on_lost(self, conn):
        if conn.authed:
            self.held -= 1
            self.lost += 1
        fut = self._waiters.pop(conn, None)
        if fut and not fut.done():
            fut.set_result(False)

    async def run(self) -> None:
        import aiohttp
        import uvloop  # noqa: F401

        from services.common import tokens
        from services.common.codec import Op, encode
        from services.common.pb import client_pb2 as cpb

        a = self.args
        loop = asyncio.get_running_loop()
        sources = [f"127.0.{1 + i // 250}.{2 + i % 250}" for i in range(a.sources)]
        deadline = time.monotonic() + a.connect_timeout_s
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        started = time.monotonic()

        routes: dict[str, dict] = {}
        route_slots = asyncio.Semaphore(2)  # route requests in flight per worker

        async def fetch_routes(first: int, n: int) -> None:
            # one dispatcher request per 500 uids: per-connection HTTP would cost more than the connection
            uids = [f"bench-{a.uid_start + i}" for i in range(first, first + n)]
            for attempt in range(8):  # the dispatcher is one process sharing 2 cores with everything
                try:
                    async with route_slots, http.post(f"{a.dispatcher}/v1/routes", json={"uids": uids, "count": 1},
                                                      timeout=aiohttp.ClientTimeout(total=120)) as r:
                        body = await r.json()
                    break
                except (aiohttp.ClientError, ValueError, TimeoutError):
                    await asyncio.sleep(0.2 * 2 ** attempt)
            else:
                return  # these uids count as failed connects
            for uid, rooms in body["routes"].items():
                routes[uid] = rooms[0]

        async def one(i: int) -> None:
            uid = f"bench-{a.uid_start + i}"
            async with self._inflight:
                for _attempt in range(a.attempts):
                    if time.monotonic() > deadline:
                        return
                    retry_ms = await attempt(i, uid)
                    if retry_ms <= 0:
                        return
                    self.retries += 1
                    # refused with a retry-after: come back later with full jitter, as the SDK does
                    await asyncio.sleep(retry_ms / 1000 * (1 + random.random()))
                self.failed += 1

        async def attempt(i: int, uid: str) -> int:
            """0 when done (held or failed for good), else the server's retry-after in ms."""
            try:
                room = routes[uid]
                token, _ = tokens.sign(a.secret, uid, a.app, 3600)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((sources[i % len(sources)], 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (room["host"], room["port"]))
                _, conn = await loop.create_connection(lambda: BenchConn(self), sock=sock)
                fut = loop.create_future()
                self._waiters[conn] = fut
                conn.transport.write(encode(Op.AUTH, cpb.Auth(
                    token=token, uid=uid, net="wifi", heartbeat_hint_s=a.heartbeat_s).SerializeToString(), 1))
                if await asyncio.wait_for(fut, 60):
                    self.conns.append(conn)
                    return 0
                if conn.retry_ms:
                    return conn.retry_ms
            except (TimeoutError, OSError, KeyError, IndexError, aiohttp.ClientError):
                pass
            self.failed += 1
            return 0

        async def report_loop():
            while True:
                print(json.dumps({"t": round(time.monotonic() - started, 2), "held": self.held,
                                  "failed": self.failed, "errors": self.errors}), flush=True)
                await asyncio.sleep(1)

        reporter = loop.create_task(report_loop())
        await asyncio.gather(*(fetch_routes(i, min(500, a.count - i)) for i in range(0, a.count, 500)))
        routed = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(a.count)))
        await http.close()
        connected_at = time.monotonic()
        print(json.dumps({"event": "connected", "t": round(connected_at - started, 2), "held": self.held,
                          "route_s": round(routed - started, 2),
                          "failed": self.failed}), flush=True)
        # Hold until the parent closes our stdin (it does so hold_s after *every* worker is connected:
        # a per-worker timer would let early workers drop their connections before the last one is
        # done). PING every heartbeat, spread evenly over the interval: one loop, no timer per connection.
        stop = asyncio.Event()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

        async def wait_for_stop() -> None:
            while await stdin.read(1024):
                pass
            stop.set()

        stopper = loop.create_task(wait_for_stop())
        ping = encode(Op.PING)
        hard_end = connected_at + a.connect_timeout_s + a.hold_s + 60  # the parent died: stop anyway
        conns = self.conns
        slices = max(1, a.heartbeat_s * 10)
        k = 0
        while not stop.is_set() and time.monotonic() < hard_end:
            step = len(conns) // slices + 1
            for c in conns[(k % slices) * step:(k % slices + 1) * step]:
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.write(ping)
            k += 1
            await asyncio.sleep(0.1)
        stopper.cancel()
        reporter.cancel()
        print(json.dumps({"event": "done", "held": self.held, "pongs": self.pongs, "lost": self.lost,
                          "error_kinds": self.error_kinds, "retries": self.retries,
                          "failed": self.failed, "errors": self.errors}), flush=True)
        for c in conns:
            if c.transport is not None:
                c.transport.abort()


def worker_main(args) -> int:
    import uvloop

    uvloop.run(Worker(args).run())
    return 0


# ---------------------------------------------------------------------------- coordinator
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--rooms", type=int, default=0, help="room instances (default: sized for --connections)")
    p.add_argument("--hold-s", type=float, default=60, help="hold time after the last connect")
    p.add_argument("--heartbeat-s", type=int, default=300, help="heartbeat the clients ask for")
    p.add_argument("--inflight", type=int, default=200, help="handshakes in flight per worker")
    p.add_argument("--connect-timeout-s", type=float, default=900)
    p.add_argument("--sources", type=int, default=32, help="loopback source addresses")
    p.add_argument("--attempts", type=int, default=6, help="connect attempts per uid when refused with a retry-after")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the services, e.g. PYLON_ROOM_BATCH_DELAY_MS=10")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uid-start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dispatcher", default="", help=argparse.SUPPRESS)
    p.add_argument("--app", default="", help=argparse.SUPPRESS)
    p.add_argument("--secret", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)

    from services.launcher.cluster import LocalCluster, Ports
    from services.room.config import RoomConfig

    n = args.connections
    rooms = args.rooms or RoomConfig(instances=0, target_connections=n).instance_count()
    # the listen backlog is capped by somaxconn when the rooms listen: set these first
    sysctls, previous_sysctls = set_sysctls([k for k in SYSCTLS if k != "net.ipv4.ip_local_port_range"])
    tmp = tempfile.mkdtemp(prefix="pylon-bench-")
    cluster = LocalCluster(tmp, Ports.free(rooms), room_instances=rooms,
                           env={"PYLON_LOG_LEVEL": "WARNING", "PYLON_ROOM_BACKLOG": "65535",
                                **dict(kv.split("=", 1) for kv in args.env)})
    result: dict = {"bench": "connections", "target": n, "rooms": rooms, "sysctls": sysctls, "env": args.env,
                    "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    workers: list[subprocess.Popen] = []
    try:
        cluster.start()
        # widen the ephemeral range only now that every service port is bound: before, an
        # outgoing socket could take a port a room instance was about to listen on
        more, before = set_sysctls(["net.ipv4.ip_local_port_range"])
        sysctls.update(more)
        previous_sysctls.update(before)
        result["sysctls"] = sysctls
        app = cluster.create_demo_app()
        room_pids = children(cluster.services["room"].pid) or [cluster.services["room"].pid]
        server_pids = room_pids + [cluster.services[s].pid for s in ("register", "saver", "coordinator", "center",
                                                                        "dispatcher")]
        server_pids += [s.proc.pid for s in cluster.stores]
        names = {pid: "room" for pid in room_pids}
        names.update({cluster.services[s].pid: s for s in ("register", "saver", "coordinator", "center", "dispatcher")})
        names.update({s.proc.pid: s.name for s in cluster.stores})
        time.sleep(2)
        base_rss = {pid: rss_kib(pid) for pid in room_pids}
        result["room_baseline_rss_kib_per_instance"] = round(sum(base_rss.values()) / max(1, len(base_rss)))
        cpu0 = {pid: cpu_s(pid) for pid in server_pids}
        n_workers = -(-n // PER_WORKER)
        per = -(-n // n_workers)
        t0 = time.monotonic()
        for w in range(n_workers):
            count = min(per, n - w * per)
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--uid-start", str(w * per), "--count", str(count),
                 "--dispatcher", cluster.dispatcher_url, "--app", app["id"], "--secret", app["secret"],
                 "--hold-s", str(args.hold_s), "--heartbeat-s", str(args.heartbeat_s),
                 "--inflight", str(args.inflight), "--connect-timeout-s", str(args.connect_timeout_s),
                 "--sources", str(args.sources), "--attempts", str(args.attempts)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        connected: dict[int, dict] = {}
        done: dict[int, dict] = {}
        import selectors

        sel = selectors.DefaultSelector()
        for i, wp in enumerate(workers):
            sel.register(wp.stdout, selectors.EVENT_READ, i)
        full_at = None
        hard_deadline = t0 + args.connect_timeout_s + args.hold_s + 120
        cpu_full = None
        hold_until = None
        while len(done) < len(workers) and time.monotonic() < hard_deadline:
            if hold_until is not None and time.monotonic() >= hold_until:
                hold_until = None
                c0, _cl0, t_h = result.pop("_cpu_hold0")
                elapsed = time.monotonic() - t_h
                result["hold_s_measured"] = round(elapsed, 1)
                result["server_cpu_pct_hold"] = round(
                    100 * (sum(cpu_s(pid) for pid in server_pids) - sum(c0.values())) / max(1e-9, elapsed), 1)
                result["client_cpu_pct_hold"] = round(
                    100 * (sum(cpu_s(w.pid) for w in workers) - _cl0) / max(1e-9, elapsed), 1)
                result["sessions_in_register_end_of_hold"] = _count_sessions(cluster)
                for wp in workers:
                    wp.stdin.close()  # end of the hold for every worker at once
            for key, _ in sel.select(timeout=1):
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    done.setdefault(key.data, {"event": "exited"})
                    continue
                msg = json.loads(line)
                i = key.data
                if msg.get("event") == "connected":
                    connected[i] = msg
                elif msg.get("event") == "done":
                    done[i] = msg
                # other lines are per-second progress; only the phase events matter here
            if full_at is None and len(connected) == len(workers):
                full_at = time.monotonic()
                cpu_full = ({pid: cpu_s(pid) for pid in server_pids}, sum(cpu_s(w.pid) for w in workers))
                held = sum(c["held"] for c in connected.values())
                result["held_at_full"] = held
                result["time_to_full_s"] = round(full_at - t0, 2)
                result["connect_rate_per_s"] = round(held / (full_at - t0))
                result["server_cpu_s_connect"] = round(sum(cpu_full[0].values()) - sum(cpu0.values()), 1)
                by_service: dict[str, float] = {}
                for pid, used in cpu_full[0].items():
                    by_service[names[pid]] = by_service.get(names[pid], 0) + used - cpu0[pid]
                result["server_cpu_s_connect_by_service"] = {k: round(v, 2) for k, v in sorted(by_service.items())}
                result["client_cpu_s_connect"] = round(cpu_full[1], 1)
                # memory after a short settle: per-connection RSS of the room processes
                time.sleep(min(10, args.hold_s / 2))
                rss = {pid: rss_kib(pid) for pid in room_pids}
                result["room_rss_kib_total"] = sum(rss.values())
                result["room_rss_bytes_per_connection"] = round(
                    (sum(rss.values()) - sum(base_rss.values())) * 1024 / max(1, held))
                result["sessions_in_register"] = _count_sessions(cluster)
                with open("/proc/meminfo") as fh:
                    result["meminfo_kib"] = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh
                                             if ln.split(":")[0] in ("MemTotal", "MemAvailable", "Slab")}
                cpu_hold0 = ({pid: cpu_s(pid) for pid in server_pids}, sum(cpu_s(w.pid) for w in workers),
                             time.monotonic())
                result["_cpu_hold0"] = cpu_hold0
                hold_until = time.monotonic() + args.hold_s
        result["held_at_end"] = sum(d.get("held", 0) for d in done.values())
        result["pongs_total"] = sum(d.get("pongs", 0) for d in done.values())
        result["failed_connects"] = sum(c.get("failed", 0) for c in connected.values())
        result["server_errors"] = sum(d.get("errors", 0) for d in done.values())
        result["retries"] = sum(d.get("retries", 0) for d in done.values())
        kinds: dict[str, int] = {}
        for d in done.values():
            for k, v in d.get("error_kinds", {}).items():
                kinds[k] = kinds.get(k, 0) + v
        result["server_error_kinds"] = kinds
        result["workers"] = len(workers)
    finally:
        for wp in workers:
            if wp.poll() is None:
                wp.kill()
            wp.wait()
        cluster.stop()
        restore_sysctls(previous_sysctls)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            result["tmp"] = tmp
    print(json.dumps(result, indent=2))
    return 0


def _count_sessions(cluster) -> dict:
    """Sessions in register two ways: members of the per-instance sets, fields of the per-uid hashes."""
    import redis

    r = redis.Redis(host=cluster.host, port=cluster.ports.redis)
    by_instance = {key.decode()[8:]: r.scard(key) for key in r.scan_iter(match="pylon:r:*", count=1000)}
    in_sets = sum(by_instance.values())
    in_hashes = 0
    pipe = r.pipeline(transaction=False)
    for i, key in enumerate(r.scan_iter(match="pylon:u:*", count=5000)):
        pipe.hlen(key)
        if i % 5000 == 4999:
            in_hashes += sum(pipe.execute())
    in_hashes += sum(pipe.execute())
    # what each room instance itself holds, from its /metrics
    import urllib.request

    rooms_say: dict = {}
    room_metrics: dict = {}
    for raw in r.hvals("pylon:discinfo:room"):
        info = json.loads(raw)
        try:
            with urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=5) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("pylon_room_sessions "):
                        rooms_say[info["id"]] = int(float(line.split()[1]))
                    elif line.startswith(("pylon_room_connections ", "pylon_room_auths_total{",
                                          "pylon_room_closed_total{")):
                        name, value = line.rsplit(" ", 1)
                        room_metrics[name] = room_metrics.get(name, 0) + int(float(value))
        except OSError:
            rooms_say[info["id"]] = -1
    return {"instance_set_members": in_sets, "user_hash_fields": in_hashes, "room_metrics": room_metrics,
            "by_instance": {k: [by_instance.get(k, 0), rooms_say.get(k)] for k in sorted(set(by_instance) | set(rooms_say))}}


if __name__ == "__main__":
    sys.exit(main())
