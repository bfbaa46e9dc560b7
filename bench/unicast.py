"""Unicast through a private Pylon system: N connected clients that ack, app servers pushing over
HTTP; prints JSON.

    .venv/bin/python bench/unicast.py                          # 20,000 clients, every phase
    .venv/bin/python bench/unicast.py --clients 50000 --phases single,paced:500,paced:1000

Starts its own Redis, MariaDB and all services (like bench/connections.py), then W client worker
processes that route their uids through the dispatcher, connect, authenticate and hold, with no
coroutine, task or timer per connection (bench/connections.py's epoll worker). Each worker reads
PUSH frames, records when each message arrived and ACKs every frame's messages at once.

Payloads are 512 bytes and begin with ``<phase>:<monotonic send time>:``, so a client knows the
API → client latency (CLOCK_MONOTONIC is one clock for every process of the machine). The app
server side is C keep-alive HTTP/1.1 connections (default 16) driven by a lean client (request
bytes built once per message, replies parsed by Content-Length), one uid per request.

Phases (``--phases``, comma-separated, each bounded by ``--phase-s`` and ``--phase-messages``):
  single       closed loop: each connection sends its next request as soon as the last is answered;
  batch:K      closed loop, the batch form of POST /v1/push with K messages per request (skipped,
               with the reason, when the center answers it with a 4xx);
  paced:R      open loop at R messages/s (one uid per request); latencies count from the scheduled
               send time, so a backed-up API shows up in them.

Per phase: messages/s, API latency p50/p99/p999, API → client latency p50/p99/p999, messages sent,
answered 200, received by clients (each counted once per uid), and server CPU per message summed
over every server process (rooms, register, saver, coordinator, center, dispatcher, Redis,
MariaDB; /proc/<pid>/stat before and after), client CPU separately (workers + this process). At
the end a sample of msg_ids is read back with GET /v1/messages/{id}: each should be ``acked``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import connections as conn_bench  # noqa: E402  (bench/connections.py: worker, /proc readers)

PAYLOAD_BYTES = 512
PER_WORKER = 18_000


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """p50/p99/p999/max of ``values`` (seconds) in ms."""
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def at(q: float) -> float:
        return round(v[min(n - 1, int(q * n))] * scale, 2)

    return {"p50": at(0.50), "p99": at(0.99), "p999": at(0.999), "max": round(v[-1] * scale, 2), "n": n}


# ---------------------------------------------------------------------------- client worker
class AckingWorker(conn_bench.Worker):
    """bench/connections.py's worker, and once connected: PUSH frames are read (a partial frame
    waits in a per-fd leftover, the only per-connection state besides the socket), every message
    counted and timed by its payload's send stamp, and one ACK frame per PUSH frame."""

    def __init__(self, args) -> None:
        super().__init__(args)
        from services.common.codec import Op, encode
        from services.common.pb import client_pb2 as cpb

        self.Push, self.Ack, self.encode, self.ACK = cpb.Push, cpb.Ack, encode, Op.ACK
        self.leftover: dict[int, bytes] = {}
        self.latency: dict[str, list[float]] = {}  # phase -> API → client seconds
        self.received: dict[str, int] = {}
        self.duplicates = self.acks_sent = self.other_frames = self.push_frames = 0
        self.seen: set[int] = set()

    def _held_event(self, fd: int) -> None:
        sock = self.socks.get(fd)
        if sock is None:
            return
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.socks[fd]
            self.leftover.pop(fd, None)
            sock.close()
            self.held -= 1
            self.lost += 1
            return
        self._feed(fd, sock, data)

    def _authenticated(self, fd: int, i: int, data: bytes) -> None:
        rest = data[int.from_bytes(data[:4], "big"):]  # frames that came in the AUTH_OK's read
        if rest:
            self._feed(fd, self.socks[fd], rest)

    def _feed(self, fd: int, sock, data: bytes) -> None:
        """Frames of ``data`` (after what an earlier read left of a partial frame): each PUSH's
        messages go to _message, and one ACK frame answers them."""
        now = time.monotonic()
        left = self.leftover.pop(fd, None)
        if left:
            data = left + data
        pos, n = 0, len(data)
        ack_ids: list[int] = []
        while pos + 12 <= n:
            length = int.from_bytes(data[pos:pos + 4], "big")
            if length < 12:
                pos = n  # garbage: drop the rest
                break
            if pos + length > n:
                break
            op = data[pos + 5]
            if op == 5:  # PUSH
                self.push_frames += 1
                for msg in self.Push.FromString(data[pos + 12:pos + length]).messages:
                    ack_ids.append(msg.msg_id)
                    self._message(fd, msg, now)
            elif op == 4:
                self.pongs += 1
            else:
                self.other_frames += 1
            pos += length
        if pos < n:
            self.leftover[fd] = data[pos:]
        if ack_ids:
            try:
                sock.send(self.encode(self.ACK, self.Ack(msg_ids=ack_ids).SerializeToString()))
                self.acks_sent += len(ack_ids)
            except OSError:
                pass

    def _message(self, fd: int, msg, now: float) -> None:
        if msg.msg_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(msg.msg_id)
        head = msg.payload[:40].split(b":", 2)
        if len(head) == 3:
            phase = head[0].decode()
            self.received[phase] = self.received.get(phase, 0) + 1
            self.latency.setdefault(phase, []).append(now - float(head[1]))

    async def run(self) -> None:
        await super().run()
        out = {"event": "unicast", "received": self.received, "duplicates": self.duplicates,
               "acks_sent": self.acks_sent, "other_frames": self.other_frames,
               "latency": {k: [round(x, 6) for x in v] for k, v in self.latency.items()}}
        print(json.dumps(out), flush=True)


def worker_main(args) -> int:
    import uvloop

    uvloop.run(AckingWorker(args).run())
    return 0


# ---------------------------------------------------------------------------- app-server side
class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; the reply is parsed just enough:
    status line and Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buf) < head_end + 4 + length:
            return
        status = int(head[9:12])
        body = self.buf[head_end + 4:head_end + 4 + length]
        self.buf = self.buf[head_end + 4 + length:]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("center closed the connection"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class Pusher:
    def __init__(self, host: str, port: int, api_key: str, app: str, uids: list[str], conns: int) -> None:
        self.host, self.port, self.app = host, port, app
        self.uids = uids
        self.n_conns = conns
        self.conns: list[HttpConn] = []
        self.head = (f"POST /v1/push HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.next_uid = 0
        self.sample: list[int] = []  # msg_ids read back at the end
        self.stats: dict = {}

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.n_conns):
            _, proto = await loop.create_connection(HttpConn, self.host, self.port)
            self.conns.append(proto)

    def _payload(self, phase: str, stamp: float) -> str:
        head = f"{phase}:{stamp:.6f}:"
        return head + "x" * (PAYLOAD_BYTES - len(head))

    def _uid(self) -> str:
        uid = self.uids[self.next_uid % len(self.uids)]
        self.next_uid += 1
        return uid

    def _raw(self, body: dict) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        return self.head + str(len(data)).encode() + b"\r\n\r\n" + data

    def single(self, phase: str, stamp: float) -> tuple[bytes, int]:
        return self._raw({"app": self.app, "uids": [self._uid()], "payload": self._payload(phase, stamp)}), 1

    def batch(self, phase: str, stamp: float, k: int) -> tuple[bytes, int]:
        msgs = [{"uid": self._uid(), "payload": self._payload(phase, stamp)} for _ in range(k)]
        return self._raw({"app": self.app, "messages": msgs}), k

    def _record(self, st: dict, status: int, body: bytes, n: int, latency: float) -> None:
        st["api_latency"].append(latency)
        if status == 200:
            st["ok"] += n
            if len(self.sample) < 2000 and random.random() < 0.02:
                try:
                    self.sample.append(int(json.loads(body)["msg_ids"][0]))
                except (ValueError, KeyError, IndexError):
                    pass
            try:
                reply = json.loads(body)
                st["delivered_reported"] += int(reply.get("delivered", 0))
            except ValueError:
                pass
        else:
            st["errors"][str(status)] = st["errors"].get(str(status), 0) + 1
            if len(st["error_bodies"]) < 3:
                st["error_bodies"].append(body[:300].decode(errors="replace"))

    async def closed_loop(self, phase: str, seconds: float, max_messages: int, k: int) -> dict:
        st = self.current = self._new_stats()
        deadline = time.monotonic() + seconds

        async def loop_one(c: HttpConn) -> None:
            while time.monotonic() < deadline and st["sent"] < max_messages and not c.closed:
                stamp = time.monotonic()
                raw, n = self.single(phase, stamp) if k == 1 else self.batch(phase, stamp, k)
                st["sent"] += n
                try:
                    status, body = await c.request(raw)
                except ConnectionError:
                    st["errors"]["closed"] = st["errors"].get("closed", 0) + 1
                    return
                self._record(st, status, body, n, time.monotonic() - stamp)

        started = time.monotonic()
        await asyncio.gather(*(loop_one(c) for c in self.conns))
        st["elapsed_s"] = time.monotonic() - started
        return st

    async def paced(self, phase: str, rate: float, seconds: float, max_messages: int) -> dict:
        """Open loop: request i is due at start + i / rate; it waits for a free connection if all
        are busy, and both latencies count from when it was due."""
        st = self.current = self._new_stats()
        free: asyncio.Queue[HttpConn] = asyncio.Queue()
        for c in self.conns:
            free.put_nowait(c)
        total = min(max_messages, int(rate * seconds))
        start = time.monotonic() + 0.05
        tasks: set[asyncio.Task] = set()

        async def one(c: HttpConn, due: float) -> None:
            raw, n = self.single(phase, due)
            try:
                status, body = await c.request(raw)
            except ConnectionError:
                st["errors"]["closed"] = st["errors"].get("closed", 0) + 1
                return
            self._record(st, status, body, n, time.monotonic() - due)
            free.put_nowait(c)

        for i in range(total):
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            c = await free.get()
            st["sent"] += 1
            t = asyncio.get_running_loop().create_task(one(c, due))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        st["elapsed_s"] = time.monotonic() - start
        return st

    @staticmethod
    def _new_stats() -> dict:
        return {"sent": 0, "ok": 0, "errors": {}, "error_bodies": [], "api_latency": [], "delivered_reported": 0}

    current: dict | None = None  # the running phase's stats (for the progress line)

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()


# ---------------------------------------------------------------------------- coordinator
class WorkerPipe(asyncio.Protocol):
    def __init__(self, index: int, events: asyncio.Queue) -> None:
        self.index, self.events, self.buf = index, events, b""

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        for ln in lines:
            if ln.strip():
                try:
                    self.events.put_nowait((self.index, json.loads(ln)))
                except ValueError:
                    pass

    def connection_lost(self, exc) -> None:
        self.events.put_nowait((self.index, {"event": "eof"}))


def server_processes(cluster) -> dict[int, str]:
    """pid -> service name of every server process: room and center supervisors' children too."""
    from services.launcher.procs import children

    names: dict[int, str] = {}
    for name, proc in cluster.services.items():
        kids = children(proc.pid)
        for pid in kids or [proc.pid]:
            names[pid] = name
        if kids:
            names[proc.pid] = name  # the supervisor itself (little CPU, but counted)
    for st in cluster.stores:
        names[st.proc.pid] = st.name
    return names


def cpu_by_pid(pids) -> dict[int, float]:
    return {pid: conn_bench.cpu_s(pid) for pid in pids}


async def wait_workers(events: asyncio.Queue, n: int, kind: str, timeout: float, sink: dict,
                       progress: conn_bench.Progress | None = None, target: int = 0) -> None:
    """Until ``n`` workers sent event ``kind``; with ``progress``, a stderr line every few seconds
    of the connections their per-second lines report (``target``: connections expected)."""
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{n - len(got)} workers gave no {kind!r} within {timeout:.0f}s")
        i, msg = await asyncio.wait_for(events.get(), left)
        ev = msg.get("event")
        if ev == "eof" and i not in got:
            raise RuntimeError(f"worker {i} exited before its {kind!r}")
        if ev in ("connected", "done", "unicast") or ev == kind:
            sink.setdefault(ev, {})[i] = msg
        if ev == kind:
            got.add(i)
        if ev is None and "held" in msg:
            sink.setdefault("progress", {})[i] = msg
        if progress is not None:
            progress.maybe(lambda: conn_bench.held_text(sink.get("progress", {}).values(), target))


async def run(args, result: dict) -> None:
    from services.launcher.cluster import ROOM_NICE, LocalCluster, Ports
    from services.room.config import RoomConfig

    n = args.clients
    rooms = args.rooms or RoomConfig(instances=0, target_connections=n).instance_count()
    tmp = tempfile.mkdtemp(prefix="pylon-bench-unicast-")
    env = {"PYLON_LOG_LEVEL": "WARNING", **dict(kv.split("=", 1) for kv in args.env)}
    cluster = LocalCluster(tmp, Ports.free(rooms), room_instances=rooms, env=env)
    result.update({"bench": "unicast", "clients": n, "rooms": rooms, "http_connections": args.http_connections,
                   "payload_bytes": PAYLOAD_BYTES, "env": args.env, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())})
    workers: list[subprocess.Popen] = []
    loop = asyncio.get_running_loop()
    pusher = None
    try:
        await loop.run_in_executor(None, cluster.start)
        app = await loop.run_in_executor(None, cluster.create_demo_app)
        names = server_processes(cluster)
        if args.pids_out:  # for a profiler attached from outside (py-spy record -p PID)
            with open(args.pids_out, "w") as fh:
                json.dump({str(pid): name for pid, name in names.items()}, fh)
        n_workers = -(-n // PER_WORKER)
        per = -(-n // n_workers)
        events: asyncio.Queue = asyncio.Queue()
        for w in range(n_workers):
            count = min(per, n - w * per)
            wp = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--uid-start", str(w * per), "--count", str(count),
                 "--dispatcher", cluster.dispatcher_url, "--app", app["id"], f"--secret={app['secret']}",
                 "--hold-s", "0", "--heartbeat-s", "300", "--inflight", "1000", "--connect-timeout-s", "300",
                 "--sources", "16", "--attempts", "6"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, preexec_fn=lambda: os.nice(ROOM_NICE))
            workers.append(wp)
            await loop.connect_read_pipe(lambda w=w: WorkerPipe(w, events), wp.stdout)
        sink: dict = {}
        await wait_workers(events, n_workers, "ready", 600, sink)
        for wp in workers:
            wp.stdin.write(b"go\n")
            wp.stdin.flush()
        t0 = time.monotonic()
        progress = conn_bench.Progress("unicast")
        await wait_workers(events, n_workers, "connected", 400, sink, progress, n)
        held = sum(m["held"] for m in sink["connected"].values())
        result["held"] = held
        result["connect_s"] = round(time.monotonic() - t0, 1)
        if held < n:
            result["connect_failed"] = n - held
        await asyncio.sleep(2)  # let the last registrations settle

        host, port = cluster.host, cluster.ports.center
        uids = [f"bench-{i}" for i in range(n)]
        random.Random(1).shuffle(uids)
        pusher = Pusher(host, port, app["api_key"], app["id"], uids, args.http_connections)
        await pusher.open()
        server_pids = list(names)
        me = os.getpid()
        phases_out = []

        async def report() -> None:  # every few seconds: what the running phase has pushed so far
            while True:
                await asyncio.sleep(progress.every_s)
                st = pusher.current
                if st is not None:
                    errors = sum(st["errors"].values())
                    progress.say(f"phase {len(phases_out) + 1}/{n_phases}: {st['ok']:,} messages pushed, "
                                 f"{st['delivered_reported']:,} delivered to connections (center's count), "
                                 f"{errors:,} errors")

        n_phases = len(args.phases.split(","))
        reporter = loop.create_task(report())
        for spec in args.phases.split(","):
            kind, _, arg = spec.partition(":")
            phase = f"p{len(phases_out)}"
            rpc0 = await loop.run_in_executor(None, conn_bench.rpc_counts, cluster)
            cpu0 = cpu_by_pid(server_pids)
            cl0 = sum(conn_bench.cpu_s(w.pid) for w in workers) + conn_bench.cpu_s(me)
            m0 = conn_bench.machine_busy_s()
            if kind == "single":
                st = await pusher.closed_loop(phase, args.phase_s, args.phase_messages, 1)
            elif kind == "batch":
                k = int(arg or 100)
                probe_raw, _ = pusher.batch("probe", time.monotonic(), 1)
                status, body = await pusher.conns[0].request(probe_raw)
                if status != 200:
                    phases_out.append({"phase": spec, "skipped": f"batch form answered {status}: "
                                       f"{body[:200].decode(errors='replace')}"})
                    continue
                st = await pusher.closed_loop(phase, args.phase_s, args.phase_messages, k)
            elif kind == "paced":
                st = await pusher.paced(phase, float(arg), args.phase_s, args.phase_messages)
            else:
                raise SystemExit(f"unknown phase {spec!r}")
            # let the last deliveries and acks land before the CPU is read
            await asyncio.sleep(args.settle_s)
            cpu1 = cpu_by_pid(server_pids)
            cl1 = sum(conn_bench.cpu_s(w.pid) for w in workers) + conn_bench.cpu_s(me)
            m1 = conn_bench.machine_busy_s()
            rpc1 = await loop.run_in_executor(None, conn_bench.rpc_counts, cluster)
            by_service: dict[str, float] = {}
            for pid in server_pids:
                by_service[names[pid]] = by_service.get(names[pid], 0.0) + cpu1[pid] - cpu0[pid]
            server_s = sum(by_service.values())
            ok = max(1, st["ok"])
            elapsed = st["elapsed_s"]
            phases_out.append({
                "phase": spec, "tag": phase, "sent": st["sent"], "ok": st["ok"], "errors": st["errors"],
                "error_bodies": st["error_bodies"], "elapsed_s": round(elapsed, 2),
                "messages_per_s": round(st["ok"] / max(elapsed, 1e-9)),
                "api_latency_ms": percentiles(st["api_latency"]),
                "delivered_reported": st["delivered_reported"],
                "server_cpu_s": round(server_s, 2),
                "server_cpu_us_per_msg": round(server_s * 1e6 / ok),
                "server_cpu_us_per_msg_by_service": {k: round(v * 1e6 / ok) for k, v in sorted(by_service.items())},
                "server_cpu_pct": round(100 * server_s / max(elapsed + args.settle_s, 1e-9)),
                "client_cpu_us_per_msg": round((cl1 - cl0) * 1e6 / ok),
                "machine_busy_pct": round(100 * (m1 - m0) / max(elapsed + args.settle_s, 1e-9) / os.cpu_count()),
                **conn_bench.internal_stats(rpc0, rpc1, ok),
            })
            print(json.dumps({"phase_done": phases_out[-1]["phase"],
                              "messages_per_s": phases_out[-1].get("messages_per_s"),
                              "server_cpu_us_per_msg": phases_out[-1].get("server_cpu_us_per_msg")}),
                  file=sys.stderr, flush=True)
        reporter.cancel()
        result["phases"] = phases_out
        # end the hold: the workers print what they received
        for wp in workers:
            wp.stdin.close()
        await wait_workers(events, n_workers, "unicast", 120, sink)
        received: dict[str, int] = {}
        latency: dict[str, list[float]] = {}
        for msg in sink["unicast"].values():
            for k, v in msg["received"].items():
                received[k] = received.get(k, 0) + v
            for k, v in msg["latency"].items():
                latency.setdefault(k, []).extend(v)
        for ph in phases_out:
            tag = ph.get("tag")
            if tag is None:
                continue
            ph["received"] = received.get(tag, 0)
            ph["all_received"] = ph["received"] == ph["ok"]
            ph["api_to_client_ms"] = percentiles(latency.get(tag, []))
        result["duplicates"] = sum(m["duplicates"] for m in sink["unicast"].values())
        result["acks_sent"] = sum(m["acks_sent"] for m in sink["unicast"].values())
        result["client_lost_connections"] = sum(m.get("lost", 0) for m in sink.get("done", {}).values())
        result["acked_sample"] = await loop.run_in_executor(None, check_acked, cluster, app, pusher.sample)
    finally:
        if pusher is not None:
            pusher.close()
        for wp in workers:
            if wp.poll() is None:
                wp.kill()
            wp.wait()
        await loop.run_in_executor(None, cluster.stop)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            result["tmp"] = tmp


def check_acked(cluster, app: dict, sample: list[int]) -> dict:
    """States of sampled msg_ids (GET /v1/messages/{id}); waits up to 10 s for acks to land."""
    states: dict[str, int] = {}
    deadline = time.monotonic() + 10
    for msg_id in sample:
        while True:
            status, body = cluster.api("GET", f"/v1/messages/{msg_id}", key=app["api_key"])
            state = body.get("state", f"http_{status}") if isinstance(body, dict) else f"http_{status}"
            if state == "acked" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        states[state] = states.get(state, 0) + 1
    return {"sampled": len(sample), "states": states, "all_acked": states.get("acked", 0) == len(sample)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20_000)
    p.add_argument("--rooms", type=int, default=0, help="room instances (default: sized for --clients)")
    p.add_argument("--http-connections", type=int, default=16)
    p.add_argument("--phases", default="single,batch:100,paced:500,paced:1000,paced:2000")
    p.add_argument("--phase-s", type=float, default=20.0, help="longest time a phase sends")
    p.add_argument("--phase-messages", type=int, default=200_000, help="most messages a phase sends")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait after a phase before CPU is read")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--pids-out", default="", help="write {pid: service} of the server processes here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the services, e.g. PYLON_ROOM_BATCH_DELAY_MS=10")
    # worker mode (internal; same flags as bench/connections.py's worker)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--uid-start", int), ("--count", int), ("--hold-s", float), ("--heartbeat-s", int),
                       ("--inflight", int), ("--connect-timeout-s", float), ("--sources", int), ("--attempts", int)):
        p.add_argument(flag, type=kind, default=0, help=argparse.SUPPRESS)
    for flag in ("--dispatcher", "--app", "--secret"):
        p.add_argument(flag, default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)

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
