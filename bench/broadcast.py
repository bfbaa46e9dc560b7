"""Broadcast through a private Pylon system: N connected clients that ack, K broadcasts sent back
to back over HTTP, then late joiners and re-connectors; prints one JSON object.

    .venv/bin/python bench/broadcast.py                                # 50,000 clients, 20 x 512 B
    .venv/bin/python bench/broadcast.py --clients 1000000 --one-shot   # one broadcast: time to reach all
    .venv/bin/python bench/broadcast.py --clients 2000 --broadcasts 5 --late-joiners 100 --reconnectors 100

Starts its own Redis, MariaDB and all services (like bench/unicast.py), then client worker
processes (bench/connections.py's epoll worker, at most 18,000 connections each, loopback source
addresses 127.0.1.2 ...) that route their uids through the dispatcher, authenticate and hold.
Every message of every PUSH frame is counted (a frame with several messages counts each) and
acked, broadcast copies like any message (their msg_id is the broadcast id). Copies are deduped
per (client, broadcast id), so a second copy to one client counts as a duplicate.

Phases, each bounded in count and time:
  1. broadcast: ``--broadcasts`` K broadcasts of ``--payload-bytes`` from ``--publishers`` keep-alive
     HTTP connections (``POST /v1/broadcast``; each connection sends its next one when answered).
     A payload begins ``b<k>:<CLOCK_MONOTONIC send time>:``, so a receiver knows the API call →
     receipt latency. The phase ends when every expected delivery (clients held × broadcasts
     answered 200) has arrived, after ``--stall-s`` without a new one, or at ``--drain-timeout-s``.
     Meanwhile probe clients log in (``--probe-logins-per-s``, AUTH → AUTH_OK) and ping
     (``--probe-pings-per-s`` over ``--probe-conns`` held connections, PING → PONG); their server
     CPU is in the window below (``--probe-logins-per-s 0 --probe-pings-per-s 0`` leaves it out).
  2. idle: wait (at most ``--idle-timeout-s``) until the servers' CPU falls back to what it was
     before the first call, so the acks are processed; server CPU counts from the first API call
     to that point, summed over every server process (rooms, register, saver, coordinator,
     center, dispatcher, Redis, MariaDB).
  3. after: ``--reconnectors`` R of the original clients (held from the start by a worker of
     their own, so they acked everything) disconnect and log in again (a normal login, no
     resume token): they must receive none of the broadcasts again. At the same time
     ``--late-joiners`` L new uids connect: within the TTL they must get each broadcast exactly
     once (in their login's inbox load).
  4. progress: ``GET /v1/broadcasts/{id}`` of every broadcast (a 404 is reported, not fatal).

JSON: deliveries expected / arrived / duplicates, deliveries/s (first API call to last receipt),
server CPU µs per delivery (also net of the idle rate measured before), API call → receipt
latency p50/p99/p999 overall and per broadcast with the time until it reached every client, the
API replies, probe AUTH_OK and PONG latency, late joiners (got all K exactly once / missing /
duplicates), re-connectors (what they received), and each broadcast's final progress.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import connections as conn_bench  # noqa: E402  (worker, /proc readers, sysctls)
import unicast  # noqa: E402  (acking worker, HTTP keep-alive client, pipes, server processes)
from logins import Logins  # noqa: E402  (open-loop AUTH → AUTH_OK probe)
from unicast import HttpConn, percentiles  # noqa: E402

PER_WORKER = unicast.PER_WORKER
# --sysctls auto: apply bench/connections.py's sysctls from this many connections on (a connect
# storm of that size overflows the default listen backlog); smaller runs leave the machine alone.
SYSCTL_AUTO_FROM = 50_000
# idle = server CPU over one second at most 1.2 x the rate before the first call + 5 % of one core
# (with a million connections the idle rate itself is ~25 % of a core and moves by more than 5 %)
IDLE_FACTOR, IDLE_MARGIN_CORES = 1.2, 0.05
MAX_PROBE_LOGINS = 2_000  # AUTH frames built for the login probe (each one a held socket to the end)


# ---------------------------------------------------------------------------- client worker
class BroadcastWorker(unicast.AckingWorker):
    """The acking worker, counting broadcast copies per (client, broadcast id): one bytearray per
    broadcast id, indexed by the client's position in the worker's uid range (copies received,
    capped at 255). Progress (deliveries so far, last receipt) goes to the parent every 0.2 s."""

    PROGRESS_S = 0.2

    def __init__(self, args) -> None:
        super().__init__(args)
        self.index_of: dict[int, int] = {}  # fd -> position of its uid in this worker's range
        self.copies: dict[int, bytearray] = {}  # broadcast id -> copies per client
        self.stamps: dict[int, float | None] = {}  # broadcast id -> send time in its payload
        self.tags: dict[int, str] = {}  # broadcast id -> "b<k>" of its payload
        self.latency_by_id: dict[int, list[float]] = {}
        self.last_at: dict[int, float] = {}  # broadcast id -> last first-copy receipt
        self.deliveries = self.non_broadcast = 0
        self.last_receipt = 0.0
        self.expect = [int(x) for x in args.expect.split(",") if x] if args.expect else []

    def _authenticated(self, fd: int, i: int, data: bytes) -> None:
        self.index_of[fd] = i
        super()._authenticated(fd, i, data)

    def _message(self, fd: int, msg, now: float) -> None:
        if not msg.broadcast:
            self.non_broadcast += 1
            return
        bid = msg.msg_id
        arr = self.copies.get(bid)
        if arr is None:
            arr = self.copies[bid] = bytearray(self.args.count)
            head = msg.payload[:40].split(b":", 2)
            try:
                self.stamps[bid] = float(head[1]) if len(head) == 3 else None
                self.tags[bid] = head[0].decode()
            except (ValueError, UnicodeDecodeError):
                self.stamps[bid] = None
            self.latency_by_id[bid] = []
        i = self.index_of[fd]
        seen = arr[i]
        if seen:
            self.duplicates += 1
            if seen < 255:
                arr[i] = seen + 1
            return
        arr[i] = 1
        self.deliveries += 1
        self.last_at[bid] = self.last_receipt = now
        stamp = self.stamps[bid]
        if stamp is not None:
            self.latency_by_id[bid].append(now - stamp)

    async def _report(self) -> None:
        sent = (-1, -1)
        while True:
            await asyncio.sleep(self.PROGRESS_S)
            if (self.deliveries, self.duplicates) != sent:
                sent = (self.deliveries, self.duplicates)
                print(json.dumps({"event": "progress", "deliveries": self.deliveries, "duplicates": self.duplicates,
                                  "last": self.last_receipt, "held": self.held}), flush=True)

    def summary(self) -> dict:
        """Per broadcast id: clients reached, duplicate copies, last receipt, latencies; per client
        over the expected ids (or every id with a bench payload): how many it got, how many twice."""
        clients = sorted(set(self.index_of.values()))
        ids = self.expect or [bid for bid, tag in self.tags.items() if tag.startswith("b")]
        got_hist: dict[int, int] = {}
        clients_with_duplicates = exactly_once = 0
        for i in clients:
            got = dup = 0
            for bid in ids:
                arr = self.copies.get(bid)
                if arr is not None and arr[i]:
                    got += 1
                    dup += arr[i] > 1
            got_hist[got] = got_hist.get(got, 0) + 1
            clients_with_duplicates += dup > 0
            exactly_once += got == len(ids) and not dup
        per_id = {}
        for bid, arr in self.copies.items():
            reached = len(arr) - arr.count(0)
            per_id[str(bid)] = {"tag": self.tags.get(bid, ""), "clients": reached,
                                "duplicates": sum(arr) - reached, "last_at": self.last_at.get(bid, 0.0),
                                "latency": [round(x, 4) for x in self.latency_by_id.get(bid, [])]}
        return {"event": "broadcast_report", "clients": len(clients), "deliveries": self.deliveries,
                "duplicates": self.duplicates, "non_broadcast": self.non_broadcast, "acks_sent": self.acks_sent,
                "push_frames": self.push_frames, "other_frames": self.other_frames, "lost": self.lost,
                "held": self.held, "failed": self.failed, "fail_kinds": self.fail_kinds, "per_id": per_id,
                "got_hist": {str(k): v for k, v in sorted(got_hist.items())},
                "clients_with_duplicates": clients_with_duplicates, "exactly_once": exactly_once,
                "expected_ids": len(ids)}

    async def run(self) -> None:
        reporter = asyncio.get_running_loop().create_task(self._report())
        await conn_bench.Worker.run(self)
        reporter.cancel()
        print(json.dumps(self.summary()), flush=True)


def worker_main(args) -> int:
    import uvloop

    uvloop.run(BroadcastWorker(args).run())
    return 0


# ---------------------------------------------------------------------------- worker groups
class Group:
    """Worker processes holding the uids bench-<start> ... bench-<start + count - 1>, with their
    own event queue (so one group ending does not disturb a wait on another)."""

    def __init__(self, name: str, start: int, count: int) -> None:
        self.name, self.start, self.count = name, start, count
        self.procs: list[subprocess.Popen] = []
        self.events: asyncio.Queue = asyncio.Queue()
        self.sink: dict = {}
        self.progress: dict[int, dict] = {}

    async def spawn(self, cluster, app: dict, hold_s: float, connect_timeout_s: float, expect: str = "") -> None:
        from services.launcher.cluster import ROOM_NICE

        if self.count <= 0:
            return
        loop = asyncio.get_running_loop()
        n_workers = -(-self.count // PER_WORKER)
        per = -(-self.count // n_workers)
        inflight = max(200, min(1000, conn_bench.INFLIGHT_TOTAL // n_workers))
        for w in range(n_workers):
            count = min(per, self.count - w * per)
            # --secret=...: a base64url secret may start with "-", which argparse would take for an option
            wp = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--uid-start", str(self.start + w * per), "--count", str(count),
                 "--dispatcher", cluster.dispatcher_url, "--app", app["id"], f"--secret={app['secret']}",
                 "--hold-s", str(int(hold_s)), "--heartbeat-s", "300", "--inflight", str(inflight),
                 "--connect-timeout-s", str(int(connect_timeout_s)), "--sources", "16", "--attempts", "6",
                 f"--expect={expect}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, preexec_fn=lambda: os.nice(ROOM_NICE))
            self.procs.append(wp)
            await loop.connect_read_pipe(lambda w=w: unicast.WorkerPipe(w, self.events), wp.stdout)

    async def wait(self, kind: str, timeout: float, progress: conn_bench.Progress | None = None) -> None:
        if self.procs:
            await unicast.wait_workers(self.events, len(self.procs), kind, timeout, self.sink, progress, self.count)

    def go(self) -> None:
        for wp in self.procs:
            wp.stdin.write(b"go\n")
            wp.stdin.flush()

    def held(self) -> int:
        return sum(m["held"] for m in self.sink.get("connected", {}).values())

    def poll(self) -> None:
        """Take the progress lines queued so far."""
        while True:
            try:
                i, msg = self.events.get_nowait()
            except asyncio.QueueEmpty:
                return
            ev = msg.get("event")
            if ev == "progress":
                self.progress[i] = msg
            elif ev is not None:
                self.sink.setdefault(ev, {})[i] = msg

    def deliveries(self) -> int:
        return sum(m["deliveries"] for m in self.progress.values())

    def last_receipt(self) -> float:
        return max((m["last"] for m in self.progress.values()), default=0.0)

    async def finish(self, timeout: float) -> list[dict]:
        """End the hold (stdin EOF) and collect every worker's report."""
        for wp in self.procs:
            wp.stdin.close()
        reports = self.sink.get("broadcast_report", {})
        if self.procs and len(reports) < len(self.procs):
            try:
                await unicast.wait_workers(self.events, len(self.procs) - len(reports), "broadcast_report",
                                           timeout, self.sink)
            except (RuntimeError, TimeoutError) as exc:  # a worker died: report the others
                self.sink["finish_error"] = str(exc) or type(exc).__name__
        for wp in self.procs:
            try:
                await asyncio.get_running_loop().run_in_executor(None, wp.wait, 30)
            except subprocess.TimeoutExpired:
                wp.kill()
        return list(self.sink.get("broadcast_report", {}).values())

    def kill(self) -> None:
        for wp in self.procs:
            if wp.poll() is None:
                wp.kill()
            wp.wait()

    def pids(self) -> list[int]:
        return [wp.pid for wp in self.procs]


def merge_reports(reports: list[dict]) -> dict:
    """One group's worker reports summed: per broadcast id clients, duplicates, last receipt and
    every latency; per-client histogram of broadcasts got."""
    out = {"clients": 0, "deliveries": 0, "duplicates": 0, "non_broadcast": 0, "acks_sent": 0, "push_frames": 0,
           "other_frames": 0, "lost": 0, "clients_with_duplicates": 0, "exactly_once": 0, "failed": 0}
    per_id: dict[str, dict] = {}
    got_hist: dict[str, int] = {}
    fail_kinds: dict[str, int] = {}
    for r in reports:
        for k in out:
            out[k] += r.get(k, 0)
        for bid, d in r["per_id"].items():
            m = per_id.setdefault(bid, {"tag": d["tag"], "clients": 0, "duplicates": 0, "last_at": 0.0, "latency": []})
            m["clients"] += d["clients"]
            m["duplicates"] += d["duplicates"]
            m["last_at"] = max(m["last_at"], d["last_at"])
            m["latency"].extend(d["latency"])
        for k, v in r["got_hist"].items():
            got_hist[k] = got_hist.get(k, 0) + v
        for k, v in r.get("fail_kinds", {}).items():
            fail_kinds[k] = fail_kinds.get(k, 0) + v
    out.update(per_id=per_id, got_hist=dict(sorted(got_hist.items(), key=lambda kv: int(kv[0]))),
               fail_kinds=fail_kinds)
    return out


def completeness(merged: dict, k: int, clients: int) -> dict:
    """How many of ``clients`` got each of the ``k`` broadcasts (at least once), how many got
    none, how many deliveries are missing; from the per-client histogram."""
    hist = {int(g): n for g, n in merged["got_hist"].items()}
    counted = sum(hist.values())
    hist[0] = hist.get(0, 0) + max(0, clients - counted)  # clients that never authenticated
    return {"clients": clients, "got_all": hist.get(k, 0), "got_none": hist.get(0, 0),
            "got_some": sum(n for g, n in hist.items() if 0 < g < k),
            "missing_deliveries": sum((k - g) * n for g, n in hist.items() if g < k),
            "clients_with_duplicates": merged["clients_with_duplicates"], "duplicates": merged["duplicates"],
            "got_all_exactly_once": merged["exactly_once"],
            "got_histogram": {str(g): n for g, n in sorted(hist.items())}}


# ---------------------------------------------------------------------------- probes
class PingProbe(asyncio.Protocol):
    """One held probe connection: AUTH, then PINGs whose PONG latency is measured (matched by
    seq, which the room echoes); PUSH frames are acked and counted."""

    def __init__(self, auth_frame: bytes) -> None:
        from services.common.codec import FrameDecoder

        self.auth_frame = auth_frame
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.messages = self.errors = 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.auth_frame)

    def data_received(self, data: bytes) -> None:
        from services.common.codec import FrameError, Op, encode
        from services.common.pb import client_pb2 as cpb

        now = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except FrameError:
            self.transport.close()
            return
        acks: list[int] = []
        for f in frames:
            if f.op == Op.PONG:
                t0 = self.sent.pop(f.seq, None)
                if t0 is not None:
                    self.latencies.append(now - t0)
            elif f.op == Op.PUSH:
                acks += [m.msg_id for m in cpb.Push.FromString(f.body).messages]
            elif f.op == Op.AUTH_OK and not self.ready.done():
                self.ready.set_result(True)
            elif f.op == Op.ERROR:
                self.errors += 1
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"probe AUTH refused: {cpb.Error.FromString(f.body)}"))
        if acks:
            self.messages += len(acks)
            self.transport.write(encode(Op.ACK, cpb.Ack(msg_ids=acks).SerializeToString()))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("probe connection closed before AUTH_OK"))

    def ping(self, seq: int) -> None:
        from services.common.codec import Op, encode

        if self.closed or self.transport is None:
            return
        self.sent[seq] = time.monotonic()
        self.transport.write(encode(Op.PING, b"", seq))


class Probes:
    """AUTH and PING latency while the broadcasts fan out: an open loop of fresh logins (bench/
    logins.py's Logins, one epoll set in this process) and pings over a few held connections."""

    def __init__(self, args) -> None:
        self.args = args
        self.logins: Logins | None = None
        self.pingers: list[PingProbe] = []
        self.task: asyncio.Task | None = None
        self.started = self.stopped = 0.0
        self.login_starts = 0

    async def prepare(self, cluster, app: dict) -> None:
        import aiohttp

        from services.common import tokens
        from services.common.codec import Op, encode
        from services.common.pb import client_pb2 as cpb

        a = self.args
        n_logins = min(MAX_PROBE_LOGINS, int(a.probe_logins_per_s * a.drain_timeout_s) + 1) \
            if a.probe_logins_per_s > 0 else 0
        uids = [f"probe-login-{i}" for i in range(n_logins)] + [f"probe-ping-{i}" for i in range(a.probe_conns)]
        now = time.time()

        def frame(uid: str) -> bytes:
            token, _ = tokens.sign(app["secret"], uid, app["id"], 3600 + int(a.drain_timeout_s), now=now)
            return encode(Op.AUTH, cpb.Auth(token=token, uid=uid, net="wifi", heartbeat_hint_s=300).SerializeToString(), 1)

        addrs: list = []
        async with aiohttp.ClientSession() as http:
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                async with http.post(f"{cluster.dispatcher_url}/v1/routes", json={"uids": chunk, "count": 1}) as r:
                    routes = (await r.json())["routes"]
                addrs += [(routes[u][0]["host"], routes[u][0]["port"]) for u in chunk]
        frames = [frame(u) for u in uids]
        if n_logins:
            self.logins = Logins(frames[:n_logins], addrs[:n_logins])
            asyncio.get_running_loop().add_reader(self.logins.ep.fileno(), self.logins.on_events)
        loop = asyncio.get_running_loop()
        for k in range(a.probe_conns):
            host, port = addrs[n_logins + k]
            _, probe = await loop.create_connection(lambda k=k: PingProbe(frames[n_logins + k]), host, port,
                                                    local_addr=(f"127.0.1.{2 + k % 250}", 0))
            await asyncio.wait_for(probe.ready, 30)
            self.pingers.append(probe)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Logins every 1/rate s, pings every 1/rate s round-robin over the held probes; both from
        their own schedule, so a slow answer does not slow the probing (open loop)."""
        a = self.args
        self.started = t0 = time.monotonic()
        step = 0.01
        seq = 1
        n_login = n_ping = 0
        while True:
            now = time.monotonic()
            if self.logins is not None:
                due = int((now - t0) * a.probe_logins_per_s) + 1
                while n_login < due and self.logins.next < len(self.logins.frames):
                    self.logins.start(t0 + n_login / a.probe_logins_per_s)
                    n_login += 1
                self.logins.expire()
            if self.pingers and a.probe_pings_per_s > 0:
                due = int((now - t0) * a.probe_pings_per_s) + 1
                while n_ping < due:
                    seq += 1
                    self.pingers[n_ping % len(self.pingers)].ping(seq)
                    n_ping += 1
            await asyncio.sleep(step)

    async def stop(self) -> dict:
        self.stopped = time.monotonic()
        if self.task is not None:
            self.task.cancel()
        out: dict = {"window_s": round(self.stopped - self.started, 2) if self.started else 0.0}
        if self.logins is not None:
            lg = self.logins
            # answers to logins already started, within their own timeout
            deadline = time.monotonic() + 10
            while lg.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            out["auth_ok_ms"] = percentiles(lg.latencies)
            out["logins_started"] = lg.next
            out["logins_failed"] = dict(lg.fails)
            out["logins_unanswered"] = len(lg.pending)
        if self.pingers:
            deadline = time.monotonic() + 10
            while any(p.sent for p in self.pingers if not p.closed) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            out["pong_ms"] = percentiles([x for p in self.pingers for x in p.latencies])
            out["pings_unanswered"] = sum(len(p.sent) for p in self.pingers)
            out["probe_conns_lost"] = sum(p.closed for p in self.pingers)
            out["probe_messages_received"] = sum(p.messages for p in self.pingers)
        return out

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.logins is not None:
            asyncio.get_running_loop().remove_reader(self.logins.ep.fileno())
            for sock in self.logins.held:
                sock.close()
            for sock, *_ in self.logins.pending.values():
                sock.close()
            self.logins.ep.close()
        for p in self.pingers:
            if p.transport is not None:
                p.transport.close()


# ---------------------------------------------------------------------------- publishers
class Publishers:
    """``--publishers`` keep-alive connections sending K broadcasts back to back: each takes the
    next one as soon as its last is answered."""

    def __init__(self, host: str, port: int, api_key: str, app: str, n: int, payload_bytes: int, ttl_s: int) -> None:
        self.host, self.port, self.app, self.n = host, port, app, n
        self.payload_bytes, self.ttl_s = payload_bytes, ttl_s
        self.conns: list[HttpConn] = []
        self.head = (f"POST /v1/broadcast HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.n):
            _, proto = await loop.create_connection(HttpConn, self.host, self.port)
            self.conns.append(proto)

    def _raw(self, k: int, stamp: float) -> bytes:
        head = f"b{k}:{stamp:.6f}:"
        body = json.dumps({"app": self.app, "payload": head + "x" * (self.payload_bytes - len(head)),
                           "ttl_s": self.ttl_s}, separators=(",", ":")).encode()
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body

    async def send(self, k_total: int, timeout_s: float) -> list[dict]:
        """One record per broadcast k: send time, status, API latency, reply."""
        sent: list[dict] = []

        async def loop_one(c: HttpConn) -> None:
            while len(sent) < k_total and not c.closed:
                k = len(sent)
                stamp = time.monotonic()
                rec = {"k": k, "sent_at": stamp}
                sent.append(rec)
                try:
                    status, body = await asyncio.wait_for(c.request(self._raw(k, stamp)), timeout_s)
                except (ConnectionError, TimeoutError) as exc:
                    rec.update(status=0, error=type(exc).__name__, api_s=time.monotonic() - stamp)
                    c.closed = True  # an unanswered request leaves the connection unusable
                    return
                rec.update(status=status, api_s=time.monotonic() - stamp)
                try:
                    rec["reply"] = json.loads(body)
                except ValueError:
                    rec["reply"] = body[:300].decode(errors="replace")

        await asyncio.gather(*(loop_one(c) for c in self.conns))
        return sent

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()


# ---------------------------------------------------------------------------- helpers
def get_json(url: str, key: str) -> tuple[int, object]:
    """GET with the API key: (status, JSON body, or the text when it is not JSON)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw[:200].decode(errors="replace")


def progress_of(cluster, app: dict, ids: list[int]) -> dict:
    """GET /v1/broadcasts/{id} of each broadcast; states counted, 404s and other answers reported."""
    per: dict[str, object] = {}
    states: dict[str, int] = {}
    for bid in ids:
        status, body = get_json(f"{cluster.center_url}/v1/broadcasts/{bid}", app["api_key"])
        if status == 200 and isinstance(body, dict):
            per[str(bid)] = body
            states[str(body.get("state"))] = states.get(str(body.get("state")), 0) + 1
        else:
            per[str(bid)] = {"http_status": status, "body": body}
            states[f"http_{status}"] = states.get(f"http_{status}", 0) + 1
    return {"states": states, "by_broadcast": per}


def server_cpu(pids) -> float:
    return sum(conn_bench.cpu_s(pid) for pid in pids)


async def cpu_rate(pids, seconds: float) -> float:
    """Server CPU in cores over the next ``seconds``."""
    c0, t0 = server_cpu(pids), time.monotonic()
    await asyncio.sleep(seconds)
    return (server_cpu(pids) - c0) / max(1e-9, time.monotonic() - t0)


async def wait_idle(pids, baseline: float, timeout_s: float) -> tuple[bool, float]:
    """Until the servers' CPU over one second is back near ``baseline`` (IDLE_FACTOR); at most
    ``timeout_s``. Returns (went idle, the last rate)."""
    deadline = time.monotonic() + timeout_s
    rate = float("nan")
    while time.monotonic() < deadline:
        rate = await cpu_rate(pids, 1.0)
        if rate <= baseline * IDLE_FACTOR + IDLE_MARGIN_CORES:
            return True, rate
    return False, rate


async def wait_deliveries(groups: list[Group], expected: int, stall_s: float, deadline: float,
                          on_tick=None) -> str:
    """Poll the groups' progress until ``expected`` deliveries arrived ("all"), none arrived for
    ``stall_s`` ("stalled"), or ``deadline`` ("timeout")."""
    last_n, last_change = -1, time.monotonic()
    while True:
        for g in groups:
            g.poll()
        n = sum(g.deliveries() for g in groups)
        now = time.monotonic()
        if n >= expected:
            return "all"
        if n != last_n:
            last_n, last_change = n, now
        elif now - last_change >= stall_s:
            return "stalled"
        if now >= deadline:
            return "timeout"
        if on_tick is not None:
            on_tick(n)
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- coordinator
async def run(args, result: dict) -> None:
    from services.launcher.cluster import LocalCluster, Ports
    from services.room.config import RoomConfig

    n, k_total = args.clients, args.broadcasts
    r_count = min(args.reconnectors, n)
    total_conns = n + args.late_joiners + args.probe_conns
    rooms = args.rooms or RoomConfig(instances=0, target_connections=total_conns).instance_count()
    sysctl_on = args.sysctls == "on" or (args.sysctls == "auto" and total_conns >= SYSCTL_AUTO_FROM)
    sysctls, previous = (conn_bench.set_sysctls([k for k in conn_bench.SYSCTLS if k != "net.ipv4.ip_local_port_range"])
                         if sysctl_on else ({}, {}))
    tmp = tempfile.mkdtemp(prefix="pylon-bench-broadcast-")
    env = {"PYLON_LOG_LEVEL": "WARNING", "PYLON_ROOM_BACKLOG": "65535", **dict(kv.split("=", 1) for kv in args.env)}
    cluster = LocalCluster(tmp, Ports.free(rooms), room_instances=rooms, env=env)
    result.update({"bench": "broadcast", "clients": n, "broadcasts": k_total, "publishers": args.publishers,
                   "payload_bytes": args.payload_bytes, "ttl_s": args.ttl_s, "one_shot": args.one_shot,
                   "rooms": rooms, "late_joiners_requested": args.late_joiners, "reconnectors_requested": r_count,
                   "env": args.env,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    # the workers' own hard stop, past every bounded phase below
    hold_s = args.drain_timeout_s + args.idle_timeout_s + args.late_timeout_s + 300
    main = Group("main", r_count, n - r_count)  # uids bench-R ... bench-(N-1)
    keep = Group("reconnectors_before", 0, r_count)  # bench-0 ... bench-(R-1): they reconnect later
    late = Group("late_joiners", n, args.late_joiners)  # new uids bench-N ...
    again = Group("reconnectors_after", 0, r_count)
    groups = [main, keep, late, again]
    publishers = probes = None
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, cluster.start)
        if sysctl_on:  # widened only now that every service port is bound (see bench/connections.py)
            more, before = conn_bench.set_sysctls(["net.ipv4.ip_local_port_range"])
            sysctls.update(more)
            previous.update(before)
        result["sysctls"] = sysctls
        app = await loop.run_in_executor(None, cluster.create_demo_app)
        names = unicast.server_processes(cluster)
        server_pids = list(names)
        if args.pids_out:  # for a profiler attached from outside (py-spy record -p PID)
            with open(args.pids_out, "w") as fh:
                json.dump({str(pid): name for pid, name in names.items()}, fh)

        # ---- connect the N clients
        for g in (main, keep):
            await g.spawn(cluster, app, hold_s, args.connect_timeout_s)
        for g in (main, keep):
            await g.wait("ready", 600)
        t_connect = time.monotonic()
        for g in (main, keep):
            g.go()
        progress = conn_bench.Progress("broadcast")
        for g in (main, keep):
            await g.wait("connected", args.connect_timeout_s + 60, progress)
        held = main.held() + keep.held()
        result["held"] = held
        result["connect_s"] = round(time.monotonic() - t_connect, 1)
        if held < n:
            result["connect_failed"] = n - held
        await asyncio.sleep(2)  # let the last registrations settle

        publishers = Publishers(cluster.host, cluster.ports.center, app["api_key"], app["id"], args.publishers,
                                args.payload_bytes, args.ttl_s)
        await publishers.open()
        probes = Probes(args)
        await probes.prepare(cluster, app)
        baseline = await cpu_rate(server_pids, args.baseline_s)
        result["server_cpu_cores_idle_before"] = round(baseline, 3)

        # ---- phase 1: K broadcasts back to back; wait for the deliveries
        rpc0 = await loop.run_in_executor(None, conn_bench.rpc_counts, cluster)
        client_pids = main.pids() + keep.pids()
        me = os.getpid()
        cpu0 = {pid: conn_bench.cpu_s(pid) for pid in server_pids}
        cl0 = sum(conn_bench.cpu_s(p) for p in client_pids) + conn_bench.cpu_s(me)
        m0 = conn_bench.machine_busy_s()
        t_first = time.monotonic()
        probes.start()
        sends = await publishers.send(k_total, args.api_timeout_s)
        t_answered = time.monotonic()
        ok = [s for s in sends if s["status"] == 200]
        expected = held * len(ok)
        reason = await wait_deliveries(
            [main, keep], expected, args.stall_s, t_first + args.drain_timeout_s,
            on_tick=lambda got: progress.maybe(lambda: f"{len(ok)} broadcasts: {got:,}/{expected:,} deliveries so far"))
        t_drained = time.monotonic()
        result["probes"] = await probes.stop()

        # ---- phase 2: idle (acks processed), then the CPU window closes
        went_idle, last_rate = await wait_idle(server_pids, baseline, args.idle_timeout_s)
        t_idle = time.monotonic()
        cpu1 = {pid: conn_bench.cpu_s(pid) for pid in server_pids}
        cl1 = sum(conn_bench.cpu_s(p) for p in client_pids) + conn_bench.cpu_s(me)
        m1 = conn_bench.machine_busy_s()
        rpc1 = await loop.run_in_executor(None, conn_bench.rpc_counts, cluster)
        for g in (main, keep):
            g.poll()
        arrived = main.deliveries() + keep.deliveries()
        last_receipt = max(main.last_receipt(), keep.last_receipt())
        by_service: dict[str, float] = {}
        for pid in server_pids:
            by_service[names[pid]] = by_service.get(names[pid], 0.0) + cpu1[pid] - cpu0[pid]
        server_s = sum(by_service.values())
        window = t_idle - t_first
        per = max(1, arrived)
        span = (last_receipt - t_first) if last_receipt > t_first else 0.0
        result["phase"] = {
            "broadcasts_sent": len(sends), "broadcasts_ok": len(ok),
            "api_errors": {str(s["status"]): sum(1 for x in sends if x["status"] == s["status"])
                           for s in sends if s["status"] != 200},
            "api_latency_ms": percentiles([s["api_s"] for s in sends]),
            "api_all_answered_s": round(t_answered - t_first, 3),
            "deliveries_expected": expected, "deliveries_arrived": arrived,
            "all_arrived": arrived >= expected and expected > 0, "wait_ended": reason,
            "first_call_to_last_receipt_s": round(span, 3),
            "deliveries_per_s": round(arrived / span) if span > 0 else None,
            "drain_s": round(t_drained - t_first, 2),
            "went_idle": went_idle, "cpu_window_s": round(window, 2),
            "server_cpu_cores_at_end": round(last_rate, 3),
            "server_cpu_s": round(server_s, 2),
            "server_cpu_us_per_delivery": round(server_s * 1e6 / per, 2),
            "server_cpu_us_per_delivery_net_of_idle": round(max(0.0, server_s - baseline * window) * 1e6 / per, 2),
            "server_cpu_us_per_delivery_by_service": {k: round(v * 1e6 / per, 2) for k, v in sorted(by_service.items())},
            "client_cpu_us_per_delivery": round((cl1 - cl0) * 1e6 / per, 2),
            "machine_busy_pct": round(100 * (m1 - m0) / max(window, 1e-9) / os.cpu_count()),
            **{k.replace("_per_msg", "_per_delivery"): v for k, v in conn_bench.internal_stats(rpc0, rpc1, per).items()},
        }
        print(json.dumps({"broadcast_phase_done": reason, "arrived": arrived, "expected": expected,
                          "deliveries_per_s": result["phase"]["deliveries_per_s"],
                          "server_cpu_us_per_delivery": result["phase"]["server_cpu_us_per_delivery"]}),
              file=sys.stderr, flush=True)

        # ---- phase 3: re-connectors log in again, late joiners log in for the first time
        ids = [int(s["reply"]["broadcast_id"]) for s in ok if isinstance(s.get("reply"), dict)
               and "broadcast_id" in s["reply"]]
        keep_reports = await keep.finish(60)  # their connections close when the worker exits
        expect = ",".join(str(b) for b in ids)
        t_after = time.monotonic()
        try:
            for g in (late, again):
                await g.spawn(cluster, app, hold_s, args.connect_timeout_s, expect=expect)
            for g in (late, again):
                await g.wait("ready", 300)
            for g in (late, again):
                g.go()
            for g in (late, again):
                await g.wait("connected", args.connect_timeout_s + 60, progress)
            result["after_s_since_first_call"] = round(time.monotonic() - t_first, 1)
            result["within_ttl"] = time.monotonic() - t_first < args.ttl_s
            if late.procs:
                late_expected = late.held() * len(ids)
                await wait_deliveries(
                    [late], late_expected, args.late_stall_s, time.monotonic() + args.late_timeout_s,
                    on_tick=lambda got: progress.maybe(
                        lambda: f"late joiners: {got:,}/{late_expected:,} deliveries so far"))
            await asyncio.sleep(args.late_settle_s)  # a window for copies that should not come
        except (RuntimeError, TimeoutError) as exc:  # keep the broadcast phase's figures
            result["after_phase_error"] = str(exc) or type(exc).__name__
        late_reports = await late.finish(60)
        again_reports = await again.finish(60)
        result["after_phase_s"] = round(time.monotonic() - t_after, 1)
        main_reports = await main.finish(120)

        errors = {g.name: g.sink["finish_error"] for g in groups if "finish_error" in g.sink}
        if errors:
            result["worker_errors"] = errors

        # ---- phase 4: progress as center sees it
        result["progress"] = await loop.run_in_executor(None, progress_of, cluster, app, ids)

        # ---- tallies
        initial = merge_reports(main_reports + keep_reports)
        stamp_of = {str(int(s["reply"]["broadcast_id"])): s for s in ok
                    if isinstance(s.get("reply"), dict) and "broadcast_id" in s["reply"]}
        per_broadcast = []
        all_lat: list[float] = []
        for s in sends:
            bid = str(s["reply"]["broadcast_id"]) if s["status"] == 200 and isinstance(s.get("reply"), dict) \
                else None
            d = initial["per_id"].get(bid or "", {"clients": 0, "duplicates": 0, "last_at": 0.0, "latency": []})
            all_lat += d["latency"]
            reply = s.get("reply") if isinstance(s.get("reply"), dict) else {"body": s.get("reply")}
            per_broadcast.append({
                "k": s["k"], "broadcast_id": bid, "status": s["status"], "api_ms": round(s["api_s"] * 1000, 2),
                "reply": {k: v for k, v in reply.items() if k != "broadcast_id"},
                "clients_reached": d["clients"], "duplicates": d["duplicates"],
                "reached_all_s": round(d["last_at"] - s["sent_at"], 3) if d["clients"] >= held and held else None,
                "latency_ms": percentiles(d["latency"])})
        result["per_broadcast"] = per_broadcast
        result["latency_ms"] = percentiles(all_lat)
        if args.one_shot and per_broadcast:
            result["one_shot_reached_all_s"] = per_broadcast[0]["reached_all_s"]
        strangers = [b for b in initial["per_id"] if b not in stamp_of]
        result["deliveries"] = {
            "expected": expected, "arrived": initial["deliveries"], "duplicates": initial["duplicates"],
            "missing": max(0, expected - initial["deliveries"]),
            "unknown_broadcast_ids": len(strangers), "non_broadcast_messages": initial["non_broadcast"],
            "push_frames": initial["push_frames"],
            "messages_per_push_frame": round(initial["acks_sent"] / max(1, initial["push_frames"]), 2),
            "acks_sent": initial["acks_sent"], "client_lost_connections": initial["lost"],
            "clients": completeness(initial, len(ok), held)}
        if late.procs:
            lm = merge_reports(late_reports)
            lat = [x for bid in map(str, ids) for x in lm["per_id"].get(bid, {}).get("latency", [])]
            result["late_joiners"] = {
                **completeness(lm, len(ids), late.held()), "connected": late.held(),
                "connect_failed": args.late_joiners - late.held(), "deliveries": lm["deliveries"],
                "exactly_once_all": lm["exactly_once"] == args.late_joiners and lm["duplicates"] == 0,
                "non_broadcast_messages": lm["non_broadcast"],
                "unknown_broadcast_ids": len([b for b in lm["per_id"] if b not in stamp_of]),
                "api_call_to_receipt_ms": percentiles(lat)}
        if again.procs:
            am = merge_reports(again_reports)
            result["reconnectors"] = {
                "clients": r_count, "reconnected": again.held(), "connect_failed": r_count - again.held(),
                "broadcast_copies_received": am["deliveries"] + am["duplicates"],
                "clients_that_received_any": sum(n for g, n in am["got_hist"].items() if int(g) > 0),
                "by_broadcast": {b: d["clients"] for b, d in am["per_id"].items()},
                "non_broadcast_messages": am["non_broadcast"],
                "received_nothing_again": am["deliveries"] == 0 and am["duplicates"] == 0}
        result["summary"] = summary(result)
    finally:
        if probes is not None:
            probes.close()
        if publishers is not None:
            publishers.close()
        for g in groups:
            g.kill()
        await loop.run_in_executor(None, cluster.stop)
        conn_bench.restore_sysctls(previous)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            result["tmp"] = tmp


def summary(result: dict) -> dict:
    """The headline figures, in the terms of the targets (issue: broadcast for real)."""
    ph, d, pr = result.get("phase", {}), result.get("deliveries", {}), result.get("probes", {})
    out = {"deliveries_arrived_of_expected": f"{d.get('arrived', 0)}/{d.get('expected', 0)}",
           "duplicates": d.get("duplicates"), "deliveries_per_s": ph.get("deliveries_per_s"),
           "server_cpu_us_per_delivery": ph.get("server_cpu_us_per_delivery"),
           "latency_p99_ms": result.get("latency_ms", {}).get("p99"),
           "probe_auth_ok_p99_ms": pr.get("auth_ok_ms", {}).get("p99"),
           "probe_pong_p99_ms": pr.get("pong_ms", {}).get("p99"),
           "progress_states": result.get("progress", {}).get("states")}
    if result.get("one_shot"):
        out["reached_all_s"] = result.get("one_shot_reached_all_s")
    if isinstance(result.get("late_joiners"), dict):
        lj = result["late_joiners"]
        out["late_joiners_exactly_once"] = f"{lj['got_all_exactly_once']}/{lj['clients']}"
    if isinstance(result.get("reconnectors"), dict):
        out["reconnectors_received_again"] = result["reconnectors"]["broadcast_copies_received"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50_000)
    p.add_argument("--broadcasts", type=int, default=None, help="K broadcasts (default 20; 1 with --one-shot)")
    p.add_argument("--publishers", type=int, default=None,
                   help="concurrent keep-alive HTTP connections (default 16; 1 with --one-shot)")
    p.add_argument("--payload-bytes", type=int, default=512)
    p.add_argument("--ttl-s", type=int, default=600, help="ttl_s of each broadcast (late joiners come within it)")
    p.add_argument("--one-shot", action="store_true",
                   help="one broadcast to N online connections: time until all reached (no late joiners or "
                        "re-connectors unless asked for)")
    p.add_argument("--late-joiners", type=int, default=None, help="new uids connecting after the broadcasts "
                                                                   "(default 1,000; 0 with --one-shot)")
    p.add_argument("--reconnectors", type=int, default=None, help="original clients that log in again after "
                                                                   "acking (default 1,000; 0 with --one-shot)")
    p.add_argument("--rooms", type=int, default=0, help="room instances (default: sized for the connections)")
    p.add_argument("--probe-logins-per-s", type=float, default=10.0, help="AUTH probe rate during the broadcasts")
    p.add_argument("--probe-pings-per-s", type=float, default=50.0, help="PING probe rate during the broadcasts")
    p.add_argument("--probe-conns", type=int, default=5, help="held connections the PING probe uses")
    p.add_argument("--connect-timeout-s", type=float, default=900)
    p.add_argument("--api-timeout-s", type=float, default=60, help="longest wait for one POST /v1/broadcast")
    p.add_argument("--drain-timeout-s", type=float, default=120, help="longest wait for the deliveries")
    p.add_argument("--stall-s", type=float, default=10, help="the wait ends this long after the last new delivery")
    p.add_argument("--idle-timeout-s", type=float, default=30, help="longest wait for the servers to go idle")
    p.add_argument("--baseline-s", type=float, default=3, help="idle CPU rate measured this long before")
    p.add_argument("--late-timeout-s", type=float, default=60, help="longest wait for late joiners' deliveries")
    p.add_argument("--late-stall-s", type=float, default=5)
    p.add_argument("--late-settle-s", type=float, default=3,
                   help="wait after the late joiners are served, for copies re-connectors should not get")
    p.add_argument("--sysctls", choices=("auto", "on", "off"), default="auto",
                   help=f"apply bench/connections.py's sysctls (auto: from {SYSCTL_AUTO_FROM:,} connections)")
    p.add_argument("--out", default="", help="also write the JSON result here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--pids-out", default="", help="write {pid: service} of the server processes here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the services, e.g. PYLON_ROOM_BATCH_DELAY_MS=10")
    # worker mode (internal; bench/connections.py's worker flags, and the broadcast ids to expect)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--uid-start", int), ("--count", int), ("--hold-s", float), ("--heartbeat-s", int),
                       ("--inflight", int), ("--sources", int), ("--attempts", int)):
        p.add_argument(flag, type=kind, default=0, help=argparse.SUPPRESS)
    for flag in ("--dispatcher", "--app", "--secret", "--expect"):
        p.add_argument(flag, default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.broadcasts is None:
        args.broadcasts = 1 if args.one_shot else 20
    if args.publishers is None:
        args.publishers = 1 if args.one_shot else 16
    if args.late_joiners is None:
        args.late_joiners = 0 if args.one_shot else 1_000
    if args.reconnectors is None:
        args.reconnectors = 0 if args.one_shot else 1_000
    problems = [f"{name} must be {what}" for name, ok_, what in (
        ("--clients", args.clients >= 1, ">= 1"), ("--broadcasts", 1 <= args.broadcasts <= 10_000, "1 .. 10,000"),
        ("--publishers", 1 <= args.publishers <= 1_000, "1 .. 1,000"),
        ("--payload-bytes", 40 <= args.payload_bytes <= 60_000, "40 .. 60,000 (the payload starts with a stamp)"),
        ("--late-joiners", args.late_joiners >= 0, ">= 0"), ("--reconnectors", args.reconnectors >= 0, ">= 0"),
        ("--probe-conns", 0 <= args.probe_conns <= 250, "0 .. 250"), ("--ttl-s", args.ttl_s >= 1, ">= 1"))
        if not ok_]
    if problems:
        p.error("; ".join(problems))

    import uvloop

    lock = conn_bench.one_run_at_a_time()
    if lock is None:
        return 2
    result = conn_bench.run_header()
    try:
        uvloop.run(run(args, result))
    except Exception as exc:  # report what was measured up to the failure, then fail
        result["error"] = f"{type(exc).__name__}: {exc}"
    if "summary" in result:  # first, where a reader looks
        result = {"summary": result.pop("summary"), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
