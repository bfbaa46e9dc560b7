"""Login latency through a private Pylon system: connect → AUTH → AUTH_OK; prints JSON.

    .venv/bin/python bench/logins.py                                  # 200/s and 1,000/s open loop, then 64 in flight
    .venv/bin/python bench/logins.py --phases open:1000 --phase-s 20

Starts its own Redis, MariaDB and all services (room tier of ``--rooms`` instances, default 6 as
``pylon up`` starts), builds every uid's AUTH frame and fetches its room from the dispatcher
(``POST /v1/routes``) before the clock, then runs phases, each on fresh uids:
  open:R     open loop: a connect starts every 1/R s whatever the answers do (latency counts from
             the scheduled start, so a backed-up server shows in it);
  inflight:K closed loop: K handshakes in flight, each answer starts the next (connects/s).
A login is a full AUTH: token check, registration in register/Redis, offline-inbox load from
saver. Sessions stay open to the end. Per phase: AUTH_OK latency p50/p99/p999, connects/s,
failures by kind, server CPU per login summed over every server process, client CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import connections as conn_bench  # noqa: E402
from unicast import percentiles, server_processes  # noqa: E402

TIMEOUT_S = 30.0
# Sessions one phase holds open in this one process: under the 20,000 open-file cap.
MAX_PHASE_LOGINS = 18_000


class Logins:
    """Handshakes from one epoll set; per open handshake only (socket, start time)."""

    def __init__(self, frames: list[bytes], addrs: list[tuple[str, int]]) -> None:
        self.frames, self.addrs = frames, addrs
        self.sources = [(f"127.0.{1 + i // 250}.{2 + i % 250}", 0) for i in range(16)]
        self.ep = select.epoll()
        self.pending: dict[int, tuple[socket.socket, float]] = {}
        self.held: list[socket.socket] = []
        self.latencies: list[float] = []
        self.fails: dict[str, int] = {}
        self.next = 0
        self.on_answer = None  # closed loop: start the next one

    def start(self, due: float) -> None:
        i = self.next
        self.next += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE: the 20,000 open-file cap (see MAX_PHASE_LOGINS)
            self._fail(f"socket:{exc.errno}")
            return
        try:
            sock.setsockopt(socket.IPPROTO_IP, conn_bench.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(self.sources[i % len(self.sources)])
            sock.connect_ex(self.addrs[i])
            fd = sock.fileno()
            try:
                sock.send(self.frames[i])
                self.ep.register(fd, select.EPOLLIN)
            except BlockingIOError:
                self.ep.register(fd, select.EPOLLOUT)
            self.pending[fd] = (sock, due, i)
        except OSError as exc:
            sock.close()
            self._fail(f"connect:{exc.errno}")

    def _fail(self, kind: str) -> None:
        self.fails[kind] = self.fails.get(kind, 0) + 1

    def on_events(self) -> None:
        now = time.monotonic()
        for fd, ev in self.ep.poll(0, 1024):
            st = self.pending.get(fd)
            if st is None:
                continue
            sock = st[0]
            if ev & select.EPOLLOUT:
                try:
                    sock.send(self.frames[st[2]])
                    self.ep.modify(fd, select.EPOLLIN)
                except OSError:
                    self._end(fd, "send")
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if len(data) >= 12 and data[5] == 2:  # AUTH_OK
                del self.pending[fd]
                self.ep.unregister(fd)
                self.held.append(sock)
                self.latencies.append(now - st[1])
            else:
                self._end(fd, "error_frame" if len(data) >= 12 and data[5] == 13 else "closed")
            if self.on_answer is not None:
                self.on_answer()

    def _end(self, fd: int, kind: str) -> None:
        sock = self.pending.pop(fd)[0]
        sock.close()
        self._fail(kind)
        if self.on_answer is not None:
            self.on_answer()

    def expire(self) -> None:
        now = time.monotonic()
        for fd, (_, due, _) in list(self.pending.items()):
            if now - due > TIMEOUT_S:
                self._end(fd, "timeout")


async def run(args, result: dict) -> None:
    import aiohttp

    from services.common import tokens
    from services.common.codec import Op, encode
    from services.common.pb import client_pb2 as cpb
    from services.launcher.cluster import LocalCluster, Ports

    tmp = tempfile.mkdtemp(prefix="pylon-bench-logins-")
    env = {"PYLON_LOG_LEVEL": "WARNING", **dict(kv.split("=", 1) for kv in args.env)}
    cluster = LocalCluster(tmp, Ports.free(args.rooms), room_instances=args.rooms, env=env)
    loop = asyncio.get_running_loop()
    specs = args.phases.split(",")
    counts = []
    for spec in specs:
        kind, _, arg = spec.partition(":")
        counts.append(min(MAX_PHASE_LOGINS, int(float(arg) * args.phase_s) if kind == "open" else args.closed_logins))
    total = sum(counts)
    result.update({"bench": "logins", "rooms": args.rooms, "logins": total, "env": args.env,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    try:
        await loop.run_in_executor(None, cluster.start)
        app = await loop.run_in_executor(None, cluster.create_demo_app)
        names = server_processes(cluster)
        if args.pids_out:  # for a profiler attached from outside (py-spy record -p PID)
            with open(args.pids_out, "w") as fh:
                json.dump({str(pid): name for pid, name in names.items()}, fh)
        now = time.time()
        uids = [f"login-{i}" for i in range(total)]
        frames = []
        for uid in uids:
            token, _ = tokens.sign(app["secret"], uid, app["id"], 3600, now=now)
            frames.append(encode(Op.AUTH, cpb.Auth(token=token, uid=uid, net="wifi",
                                                    heartbeat_hint_s=300).SerializeToString(), 1))
        addrs: list = []
        async with aiohttp.ClientSession() as http:
            for i in range(0, total, 500):
                chunk = uids[i:i + 500]
                async with http.post(f"{cluster.dispatcher_url}/v1/routes", json={"uids": chunk, "count": 1}) as r:
                    routes = (await r.json())["routes"]
                addrs += [(routes[u][0]["host"], routes[u][0]["port"]) for u in chunk]
        lg = Logins(frames, addrs)
        loop.add_reader(lg.ep.fileno(), lg.on_events)
        await asyncio.sleep(2)
        me = os.getpid()
        out = []
        for spec, n in zip(specs, counts, strict=True):
            kind, _, arg = spec.partition(":")
            lg.latencies, lg.fails = [], {}
            cpu0 = {pid: conn_bench.cpu_s(pid) for pid in names}
            cl0 = conn_bench.cpu_s(me)
            t0 = time.monotonic()
            if kind == "open":
                rate = float(arg)
                for k in range(n):
                    due = t0 + k / rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    lg.start(due)
            elif kind == "inflight":
                k_in_flight = int(arg)
                started = [0]

                def more(k_in_flight: int = k_in_flight, started: list = started, n: int = n) -> None:
                    while len(lg.pending) < k_in_flight and started[0] < n:
                        started[0] += 1
                        lg.start(time.monotonic())

                lg.on_answer = more
                more()
            else:
                raise SystemExit(f"unknown phase {spec!r}")
            deadline = time.monotonic() + TIMEOUT_S + args.phase_s * 4
            while (lg.pending or (kind == "inflight" and started[0] < n)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                lg.expire()
            elapsed = time.monotonic() - t0
            lg.on_answer = None
            cpu1 = {pid: conn_bench.cpu_s(pid) for pid in names}
            by: dict[str, float] = {}
            for pid in names:
                by[names[pid]] = by.get(names[pid], 0.0) + cpu1[pid] - cpu0[pid]
            ok = max(1, len(lg.latencies))
            out.append({"phase": spec, "logins": n, "auth_ok": len(lg.latencies), "failed": lg.fails,
                        "elapsed_s": round(elapsed, 2), "connects_per_s": round(len(lg.latencies) / elapsed),
                        "auth_ok_latency_ms": percentiles(lg.latencies),
                        "server_cpu_us_per_login": round(sum(by.values()) * 1e6 / ok),
                        "server_cpu_us_per_login_by_service": {k: round(v * 1e6 / ok) for k, v in sorted(by.items())},
                        "client_cpu_us_per_login": round((conn_bench.cpu_s(me) - cl0) * 1e6 / ok)})
            for sock in lg.held:  # logins of the next phase start from a clean slate (and the fd cap)
                sock.close()
            lg.held = []
            print(json.dumps({"phase_done": spec, "p99": out[-1]["auth_ok_latency_ms"].get("p99"),
                              "connects_per_s": out[-1]["connects_per_s"]}), file=sys.stderr, flush=True)
        result["phases"] = out
        loop.remove_reader(lg.ep.fileno())
        for s in lg.held:
            s.close()
    finally:
        await loop.run_in_executor(None, cluster.stop)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=6)
    p.add_argument("--phases", default="open:200,open:1000,inflight:64")
    p.add_argument("--phase-s", type=float, default=10.0, help="length of an open-loop phase")
    p.add_argument("--closed-logins", type=int, default=5_000, help="logins of a closed-loop phase")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pids-out", default="", help="write {pid: service} of the server processes here")
    args = p.parse_args()

    import uvloop

    lock = conn_bench.one_run_at_a_time()
    if lock is None:
        return 2
    result = conn_bench.run_header()
    uvloop.run(run(args, result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
