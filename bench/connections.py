"""Hold N authenticated connections against a private Pylon system and print JSON.

    .venv/bin/python bench/connections.py --connections 100000

Starts its own Redis, MariaDB and all services (room instances sized for N) on free ports in a
temp dir, then W client worker processes (each under the 20,000 open-file cap). Each worker first
builds the AUTH frame of every uid it owns (token signing is the app server's job, so it is kept
out of the timing) and says it is ready; when all are, the parent starts the clock and the
workers route their uids through the dispatcher, connect from loopback source addresses
127.0.0.2... (so the ephemeral-port range is per source address), authenticate, and keep
heartbeats. Bounded in count and time: every phase has a deadline, and everything stops by itself.

With --tls the workers connect to the rooms' TLS ports (each TLS session an SSLObject over memory
BIOs in the same epoll loop) and verify them against the CA the launcher made in var/tls/.

Printed JSON: connections held, connect rate, time to full, room RSS per connection, per-instance
baseline RSS, sessions in register, CPU seconds of servers and clients per phase (client CPU for
the connect phase counts from the start signal, so it excludes imports and frame building).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import gc
import heapq
import json
import os
import random
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

INFLIGHT_TOTAL = 16_000
PER_WORKER = 18_000
SYSCTLS = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.core.netdev_max_backlog": "16384",
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
}
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SOCK_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # one syscall less than setblocking()


# ---------------------------------------------------------------------------- process facts
# A progress line on stderr this often during a long run (stdout carries only the result JSON).
PROGRESS_EVERY_S = 5.0


class Progress:
    """``[bench 12s] text`` on stderr at most every PROGRESS_EVERY_S (``maybe``), or now (``say``)."""

    def __init__(self, bench: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.bench, self.every_s = bench, every_s
        self.started = time.monotonic()
        self._next = self.started + every_s

    def say(self, text: str) -> None:
        print(f"[{self.bench} {time.monotonic() - self.started:5.0f}s] {text}", file=sys.stderr, flush=True)

    def maybe(self, text) -> None:
        """``text()`` (called only when a line is due) as the next line, if one is due."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            self.say(text())


def held_text(progress_lines, target: int) -> str:
    """What the workers' latest per-second lines ({"held", "failed", "inflight"}) add up to."""
    lines = list(progress_lines)
    held = sum(m.get("held", 0) for m in lines)
    failed = sum(m.get("failed", 0) for m in lines)
    inflight = sum(m.get("inflight", 0) for m in lines)
    return f"connections held {held:,}/{target:,} (handshakes in flight {inflight:,}, failed {failed:,})"


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck
    except OSError:
        return 0.0, 0.0


def pss_uss_kib(pid: int) -> tuple[int, int]:
    """(PSS, USS) in KiB: RSS counts shared library pages in every process; PSS splits them among
    the processes sharing them, USS leaves them out (what the process alone costs)."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    uss += int(line.split()[1])
    except OSError:
        pass
    return pss, uss


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of a process's main thread so far."""
    n = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    except OSError:
        pass
    return n


def cpu_s(pid: int) -> float:
    return sum(cpu_times(pid))


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (every process, kernel threads, interrupts)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


class Lines:
    """Whole lines from a child's stdout pipe, read unbuffered: a buffered readline() can leave a
    second line in its buffer where select() does not see it (an event read a second late)."""

    def __init__(self, fh) -> None:
        self.fd = fh.fileno()
        self.buf = b""
        self.eof = False

    def read(self) -> list[str]:
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return [self.buf.decode()] if self.buf.strip() else []
        *lines, self.buf = (self.buf + data).split(b"\n")
        return [ln.decode() for ln in lines if ln.strip()]


def stuck_where(sock: socket.socket) -> str:
    """Why a handshake got no answer, from the client socket: the answer is here but unread
    (the load generator's fault), our AUTH is not even acknowledged by the server's kernel (the
    connection never became a full server socket: SYN-RECV, a dropped ACK), or the server's
    kernel has the AUTH and the room did not answer (still in the accept queue, or unread)."""
    try:
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return "answer_unread"
    except OSError:
        pass
    from services.common import tcpinfo

    try:
        state, unacked = tcpinfo.read(sock, tcpinfo.STATE), tcpinfo.read(sock, tcpinfo.UNACKED)
    except OSError:
        return "unknown"
    if state != 1:  # not ESTABLISHED
        return f"tcp_state_{state}"
    return "auth_unacked" if unacked else "auth_acked_no_answer"


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
def auth_frames(args) -> list[bytes]:
    """Every uid's AUTH frame (token, protobuf, header), built before the timed phase: minting
    tokens is the app server's job, not the client's."""
    from services.common import tokens
    from services.common.codec import Op, encode
    from services.common.pb import client_pb2 as cpb

    ttl = int(max(3600, args.connect_timeout_s + args.hold_s + 600))  # retries may come late
    now = time.time()
    frames = []
    for i in range(args.uid_start, args.uid_start + args.count):
        uid = f"bench-{i}"
        token, _ = tokens.sign(args.secret, uid, args.app, ttl, now=now)
        frames.append(encode(Op.AUTH, cpb.Auth(token=token, uid=uid, net="wifi",
                                                heartbeat_hint_s=args.heartbeat_s).SerializeToString(), 1))
    return frames


class Control(asyncio.Protocol):
    """The parent's orders on stdin: a line = go (start the timed phase), EOF = end of the hold."""

    def __init__(self, go: asyncio.Event, stop: asyncio.Event) -> None:
        self.go, self.stop = go, stop

    def data_received(self, data: bytes) -> None:
        if b"\n" in data:
            self.go.set()

    def eof_received(self) -> bool:
        self.stop.set()
        return False

    def connection_lost(self, exc) -> None:
        self.stop.set()
        self.go.set()


class Worker:
    """Connects, authenticates and holds ``count`` connections with no coroutine, future, task or
    timer per connection: plain non-blocking sockets in one epoll set of our own, whose fd the
    event loop watches (the loop also runs the dispatcher requests and one ticker). A handshake
    is socket, bind, connect, send AUTH (on loopback the connection is usually established when
    connect returns; if not, AUTH goes out on EPOLLOUT), then one read for AUTH_OK or ERROR. At
    most ``inflight`` handshakes are open; each one that ends starts the next routed uid."""

    HANDSHAKE_TIMEOUT_TICKS = 60  # seconds (the ticker counts whole seconds)

    def __init__(self, args) -> None:
        from services.common.codec import Op, encode
        from services.common.pb import client_pb2 as cpb

        self.args = args
        self.Error = cpb.Error
        self.frames = auth_frames(args)
        self.addrs: list = [None] * args.count  # (host, port) of each uid's room once routed
        self.sources = [(f"127.0.{1 + i // 250}.{2 + i % 250}", 0) for i in range(args.sources)]
        self.ready: collections.deque[int] = collections.deque()  # routed, waiting for a slot
        self.later: list[tuple[float, int]] = []  # heap of (due, i): refused with a retry-after
        self.tries: dict[int, int] = {}  # attempts made, only for uids that were refused
        self.pending: dict[int, tuple] = {}  # fd -> (sock, i, tick): handshakes in flight
        self.socks: dict[int, socket.socket] = {}  # fd -> sock: authenticated, held
        self.ep = select.epoll()
        self.tick = 0
        self.routing = True
        self.connected = asyncio.Event()
        self.ping = encode(Op.PING)
        self.ping_due: collections.deque = collections.deque()  # (tick held or last pinged, fd) while connecting
        self.held = self.errors = self.failed = self.pongs = self.lost = self.retries = 0
        self.auth_on_writable = 0  # AUTHs that waited for EPOLLOUT (connect not done on return)
        self.error_kinds: dict[str, int] = {}
        self.tls_errors: dict[str, int] = {}
        self.fail_kinds: dict[str, int] = {}  # why uids ended without a session
        self.deadline = float("inf")
        # --tls: each connection's TLS runs in an SSLObject over memory BIOs, fed from the same epoll
        # loop (fd -> [SSLObject, incoming BIO, outgoing BIO, handshake done]); the room's certificate
        # is verified against the launcher's CA, as the SDK does
        tls_ca = getattr(args, "tls_ca", "")  # the unicast and broadcast workers have no --tls-ca
        self.tls_ctx = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.tls: dict[int, list] = {}
        self.first: dict[int, bytes] = {}  # fd -> bytes to send once connected (EPOLLOUT)

    # ------------------------------------------------------------ TLS
    def _tls_start(self, fd: int, host: str) -> bytes:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.tls_ctx.wrap_bio(inc, out, server_hostname=host)
        self.tls[fd] = [obj, inc, out, False]
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return out.read()  # the ClientHello

    def _tls_feed(self, fd: int, sock: socket.socket, data: bytes, auth: bytes = b"") -> bytes | None:
        """Bytes from the socket in, application bytes out (b"" while a record is incomplete or
        the handshake goes on; AUTH is written when it is done). None: TLS failed."""
        st = self.tls[fd]
        obj, inc, out = st[0], st[1], st[2]
        inc.write(data)
        plain = []
        try:
            if not st[3]:
                obj.do_handshake()
                st[3] = True
                obj.write(auth)
            while True:
                chunk = obj.read(65536)
                if not chunk:
                    break
                plain.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            self.tls_errors[getattr(exc, "reason", None) or type(exc).__name__] = \
                self.tls_errors.get(getattr(exc, "reason", None) or type(exc).__name__, 0) + 1
            return None
        pending = out.read()
        if pending:
            try:
                sock.send(pending)
            except OSError:
                return None
        return b"".join(plain)

    # ------------------------------------------------------------ handshakes
    def fill(self) -> None:
        """Start routed uids until ``inflight`` handshakes are open."""
        pending, ready, limit = self.pending, self.ready, self.args.inflight
        if len(pending) >= limit:
            return
        frames, addrs, sources, nsrc = self.frames, self.addrs, self.sources, len(self.sources)
        register, tick = self.ep.register, self.tick
        while ready and len(pending) < limit:
            i = ready.popleft()
            sock = socket.socket(socket.AF_INET, SOCK_STREAM_NONBLOCK)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind(sources[i % nsrc])
                err = sock.connect_ex(addrs[i])
                if err and err != errno.EINPROGRESS:
                    raise OSError(err, os.strerror(err))
                fd = sock.fileno()
                first = self._tls_start(fd, addrs[i][0]) if self.tls_ctx is not None else frames[i]
                try:
                    sock.send(first)  # a fresh socket takes a ~300-byte frame whole
                    register(fd, select.EPOLLIN)
                except BlockingIOError:  # still SYN_SENT: send when writable
                    register(fd, select.EPOLLOUT)
                    self.first[fd] = first
                    self.auth_on_writable += 1
                pending[fd] = (sock, i, tick)
            except OSError as exc:
                sock.close()
                self._fail("connect:" + (errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"))
        if not pending:
            self._check_done()

    def on_events(self) -> None:
        pending, socks, ep = self.pending, self.socks, self.ep
        for fd, ev in ep.poll(0, 1024):
            st = pending.get(fd)
            if st is None:
                self._held_event(fd)
                continue
            sock = st[0]
            if ev & select.EPOLLOUT:
                try:
                    sock.send(self.first.pop(fd, b"") or self.frames[st[1]])
                    ep.modify(fd, select.EPOLLIN)
                except OSError:
                    self._end(fd, sock, st[1], 0, "send")
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data and self.tls_ctx is not None:
                data = self._tls_feed(fd, sock, data, self.frames[st[1]])
                if data is None:
                    self._end(fd, sock, st[1], 0, "tls")
                    continue
                if not data:
                    continue  # the TLS handshake goes on, or a record is not complete yet
            # frames arrive whole on loopback: the first one's op decides the handshake
            if len(data) >= 12 and data[5] == 2:  # AUTH_OK
                del pending[fd]
                socks[fd] = sock
                self.held += 1
                self.ping_due.append((self.tick, fd))
                self._authenticated(fd, st[1], data)
            elif len(data) >= 12 and data[5] == 13:  # ERROR, maybe with a retry-after
                self._end(fd, sock, st[1], self._error(data[12:int.from_bytes(data[:4], "big")]))
            else:  # closed, or something other than an answer to AUTH
                self._end(fd, sock, st[1], 0, "closed" if not data else "unexpected_reply")
        self.fill()

    def _fail(self, kind: str, n: int = 1) -> None:
        self.failed += n
        self.fail_kinds[kind] = self.fail_kinds.get(kind, 0) + n

    def _end(self, fd: int, sock: socket.socket, i: int, retry_ms: int, why: str = "error") -> None:
        """A handshake that did not end in AUTH_OK: retry after the server's retry-after, with full
        jitter as the SDK does, or count it failed."""
        del self.pending[fd]
        self.tls.pop(fd, None)
        self.first.pop(fd, None)
        sock.close()  # closing the last reference also takes the fd out of the epoll set
        if retry_ms <= 0:
            self._fail(why)
            return
        self.retries += 1
        n = self.tries.get(i, 1)
        if n >= self.args.attempts:
            self._fail("retries_exhausted")
            return
        self.tries[i] = n + 1
        heapq.heappush(self.later, (time.monotonic() + retry_ms / 1000 * (1 + random.random()), i))

    def _error(self, body: bytes) -> int:
        self.errors += 1
        retry_ms = 0
        try:
            err = self.Error.FromString(body)
            key = f"{err.code}:{err.message[:60]}"
            retry_ms = err.retry_after_ms
        except Exception:
            key = "undecodable"
        self.error_kinds[key] = self.error_kinds.get(key, 0) + 1
        return retry_ms

    def _authenticated(self, fd: int, i: int, data: bytes) -> None:
        """Hook: uid ``i`` holds ``fd`` now; ``data`` is the read that brought its AUTH_OK (frames
        after it, such as the login's inbox load, are in the same read when the room was quick)."""

    def _held_event(self, fd: int) -> None:
        sock = self.socks.get(fd)
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and self.tls_ctx is not None:
            data = self._tls_feed(fd, sock, data)
            if data is None:
                data = b""
            elif not data:
                return
        if not data:
            del self.socks[fd]
            self.tls.pop(fd, None)
            sock.close()
            self.held -= 1
            self.lost += 1
            return
        # only PONGs are expected; count them (op is byte 5 of each 12-byte header)
        pos, n = 0, len(data)
        while pos + 12 <= n:
            length = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 5] == 4:
                self.pongs += 1
            if length < 12:
                break
            pos += length

    def _check_done(self) -> None:
        if not (self.routing or self.pending or self.ready or self.later):
            self.connected.set()

    async def ticker(self, started: float) -> None:
        """Every 50 ms: due retries back into the queue. Every second: handshake timeouts, progress."""
        later, ready = self.later, self.ready
        next_second = time.monotonic() + 1
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            while later and later[0][0] <= now:
                ready.append(heapq.heappop(later)[1])
            if now > self.deadline:  # give up on what has not started
                self._fail("deadline", len(ready) + len(later))
                ready.clear()
                later.clear()
            if now >= next_second:
                next_second += 1
                self.tick += 1
                for fd, st in [(fd, st) for fd, st in self.pending.items()
                               if self.tick - st[2] >= self.HANDSHAKE_TIMEOUT_TICKS]:
                    self._end(fd, st[0], st[1], 0, "handshake_timeout:" + stuck_where(st[0]))
                print(json.dumps({"t": round(now - started, 2), "held": self.held, "failed": self.failed,
                                  "errors": self.errors, "inflight": len(self.pending)}), flush=True)
                if not self.connected.is_set():
                    self._ping_while_connecting()
            self.fill()

    def _ping_while_connecting(self) -> None:
        """Once a second while others still connect: PING the held connections that have gone a
        heartbeat without one, as a client does. A connect phase longer than the heartbeat
        deadline (interval x 1.5 + grace, ~8 min at 300 s) would else see the room close the
        first connections for silence; a shorter one sends none (as before)."""
        due, socks, hb = self.ping_due, self.socks, self.args.heartbeat_s
        conns = []
        while due and due[0][0] <= self.tick - hb:
            fd = due.popleft()[1]
            sock = socks.get(fd)
            if sock is not None:
                conns.append((fd, sock))
                due.append((self.tick, fd))
        self._send_pings(conns)

    def _send_pings(self, conns) -> None:
        ping, tls = self.ping, self.tls
        for fd, sock in conns:
            try:
                if tls:
                    st = tls.get(fd)
                    if st is None:
                        continue
                    st[0].write(ping)
                    sock.send(st[2].read())
                else:
                    sock.send(ping)
            except (OSError, ssl.SSLError):
                pass  # lost (closed) or a full buffer: the next round pings again

    # ------------------------------------------------------------ phases
    async def run(self) -> None:
        import aiohttp

        a = self.args
        loop = asyncio.get_running_loop()
        go, stop = asyncio.Event(), asyncio.Event()
        await loop.connect_read_pipe(lambda: Control(go, stop), sys.stdin)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        # Nothing here makes garbage cycles worth collecting, but every socket object is GC-tracked:
        # the collector's passes over 18,000 of them were ~3 % of the worker's CPU while connecting.
        gc.freeze()
        gc.disable()
        print(json.dumps({"event": "ready"}), flush=True)
        await go.wait()
        if stop.is_set():
            await http.close()
            return  # the parent went away before the start

        started = time.monotonic()
        self.deadline = started + a.connect_timeout_s
        loop.add_reader(self.ep.fileno(), self.on_events)
        ticker = loop.create_task(self.ticker(started))
        route_slots = asyncio.Semaphore(2)  # route requests in flight per worker
        room_addrs: dict[tuple, tuple] = {}

        async def fetch_routes(first: int, n: int) -> None:
            # one dispatcher request per 500 uids: per-connection HTTP would cost more than the
            # connection. Each batch is connected as soon as its routes are in.
            uids = [f"bench-{a.uid_start + i}" for i in range(first, first + n)]
            for attempt in range(8):  # the dispatcher is one process sharing 2 cores with everything
                try:
                    async with route_slots, http.post(f"{a.dispatcher}/v1/routes", json={"uids": uids, "count": 1},
                                                      timeout=aiohttp.ClientTimeout(total=120)) as r:
                        body = await r.json()
                    routes = body["routes"]
                    break
                except (aiohttp.ClientError, ValueError, TimeoutError, KeyError, TypeError):
                    await asyncio.sleep(0.2 * 2 ** attempt)
            else:
                self._fail("routes", n)  # these uids count as failed connects
                return
            for k, uid in enumerate(uids):
                try:
                    room = routes[uid][0]
                    addr = (room["host"], room["tls_port"] if self.tls_ctx is not None else room["port"])
                except (KeyError, IndexError, TypeError):
                    self._fail("no_route")
                    continue
                self.addrs[first + k] = room_addrs.setdefault(addr, addr)
                self.ready.append(first + k)
            self.fill()

        await asyncio.gather(*(fetch_routes(i, min(500, a.count - i)) for i in range(0, a.count, 500)))
        routed = time.monotonic()
        await http.close()
        self.routing = False
        self._check_done()
        await self.connected.wait()
        connected_at = time.monotonic()
        self.frames = []
        print(json.dumps({"event": "connected", "t": round(connected_at - started, 2), "held": self.held,
                          "route_s": round(routed - started, 2), "failed": self.failed}), flush=True)
        # Hold until the parent closes our stdin (it does so hold_s after *every* worker is connected:
        # a per-worker timer would let early workers drop their connections before the last one is
        # done). PING every heartbeat, spread evenly over the interval: one loop, no timer per connection.
        hard_end = connected_at + a.connect_timeout_s + a.hold_s + 60  # the parent died: stop anyway
        # in the order of their last PING (or AUTH_OK): each connection keeps its cadence across
        # the switch from the connect phase's schedule to this one, within the heartbeat deadline
        conns, seen = [], set()
        for _, fd in self.ping_due:
            sock = self.socks.get(fd)
            if sock is not None and fd not in seen:
                seen.add(fd)
                conns.append((fd, sock))
        self.ping_due.clear()
        slices = max(1, a.heartbeat_s * 10)
        k = 0
        while not stop.is_set() and time.monotonic() < hard_end:
            step = len(conns) // slices + 1
            self._send_pings(conns[(k % slices) * step:(k % slices + 1) * step])
            k += 1
            await asyncio.sleep(0.1)
        ticker.cancel()
        print(json.dumps({"event": "done", "held": self.held, "pongs": self.pongs, "lost": self.lost,
                          "error_kinds": self.error_kinds, "fail_kinds": self.fail_kinds, "retries": self.retries,
                          "auth_on_writable": self.auth_on_writable, "tls_errors": self.tls_errors,
                          "failed": self.failed, "errors": self.errors}), flush=True)
        loop.remove_reader(self.ep.fileno())
        for sock in self.socks.values():
            sock.close()


def worker_main(args) -> int:
    import uvloop

    uvloop.run(Worker(args).run())
    return 0


# ---------------------------------------------------------------------------- coordinator
def one_run_at_a_time(busy: str = "another benchmark run is in progress"):
    """The lock every benchmark holds while it runs (keep the returned file open), or None, with
    ``busy`` printed as the JSON error, if another run holds it: two runs would share the CPU
    (every figure wrong) and each would restore the sysctls the other had set when it started."""
    import fcntl

    lock = open(os.path.join(tempfile.gettempdir(), "pylon-bench-connections.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        print(json.dumps({"error": busy}), file=sys.stderr)
        return None
    return lock


def rpc_counts(cluster) -> dict[str, float]:
    """Client-side RPC counts of every process, by "service.Method" (pylon_rpc_seconds_count)."""
    import urllib.request

    import redis

    r = redis.Redis(host=cluster.host, port=cluster.ports.redis)
    out: dict[str, float] = {}
    try:
        for service in ("room", "center", "register", "saver", "coordinator", "dispatcher"):
            for raw in r.hvals(f"pylon:discinfo:{service}"):
                info = json.loads(raw)
                if not info.get("metrics"):
                    continue
                try:
                    with urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=5) as resp:
                        body = resp.read().decode()
                except OSError:
                    continue
                for line in body.splitlines():
                    # client-side RPCs (count and seconds), the saver's MySQL statements and rows
                    for prefix, kind, name in (("pylon_rpc_seconds_", "rpc", "method"),
                                               ("pylon_saver_mysql_seconds_", "mysql", "op"),
                                               ("pylon_saver_mysql_batch_rows_", "mysql_rows", "op")):
                        if not line.startswith(prefix) or "_bucket" in line or "{" not in line:
                            continue
                        stat = line[len(prefix):line.index("{")]  # count | sum
                        labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.index("}")].split(","))
                        label = labels[name].strip(chr(34))
                        if kind == "rpc":
                            label = f"{labels['service'].strip(chr(34))}.{label}"
                        key = f"{kind}:{label}:{stat}"
                        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    finally:
        r.close()
    return out


def internal_stats(before: dict[str, float], after: dict[str, float], messages: int) -> dict:
    """Per phase: internal RPCs per message and their mean latency (ms); the saver's MySQL
    statements per message, their mean latency (the group commit: innodb_flush_log_at_trx_commit
    = 1, so each one waits for its log flush) and rows per statement."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    rpcs, rpc_ms, mysql, mysql_ms, rows = {}, {}, {}, {}, {}
    for key, v in d.items():
        kind, label, stat = key.split(":")
        if stat != "count" or v <= 0:
            continue
        total = d.get(f"{kind}:{label}:sum", 0.0)
        if kind == "rpc":
            rpcs[label], rpc_ms[label] = round(v / messages, 3), round(1000 * total / v, 2)
        elif kind == "mysql":
            mysql[label], mysql_ms[label] = round(v / messages, 3), round(1000 * total / v, 2)
        else:
            rows[label] = round(total / v, 1)
    return {"rpcs_per_msg": dict(sorted(rpcs.items())), "rpc_mean_ms": dict(sorted(rpc_ms.items())),
            "mysql_statements_per_msg": mysql, "mysql_statement_mean_ms": mysql_ms, "mysql_rows_per_statement": rows}


def run_header() -> dict:
    """What a benchmark's JSON starts with: the machine's CPUs, the commit and the load before."""
    result: dict = {"cpus": os.cpu_count()}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    with open("/proc/loadavg") as fh:
        result["loadavg_before"] = fh.read().split()[:3]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--rooms", type=int, default=0, help="room instances (default: sized for --connections)")
    p.add_argument("--hold-s", type=float, default=60, help="hold time after the last connect")
    p.add_argument("--heartbeat-s", type=int, default=300, help="heartbeat the clients ask for")
    # 200 per worker capped the rate once rooms batch the connect path in a storm (2 workers: 400 /
    # 0.25 s = 1,600 connects/s at 36k); 1,000 lets CPU be the limit. But 56 workers x 1,000 = 56k
    # handshakes in flight at ~6.5k/s is a ~9 s queue, mostly in the rooms' accept queues, and at
    # 1M its tail passed the 60 s handshake timeout (5 and 5,969 in two runs). So the default is
    # 1,000 per worker up to INFLIGHT_TOTAL in flight in all.
    p.add_argument("--inflight", type=int, default=0,
                   help=f"handshakes in flight per worker (default: 1,000, at most {INFLIGHT_TOTAL:,} over all workers)")
    p.add_argument("--connect-timeout-s", type=float, default=900)
    p.add_argument("--sources", type=int, default=32, help="loopback source addresses")
    p.add_argument("--attempts", type=int, default=6, help="connect attempts per uid when refused with a retry-after")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--tls", action="store_true",
                   help="connect to the rooms' TLS ports, verifying them against the launcher's CA")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the services, e.g. PYLON_ROOM_BATCH_DELAY_MS=10")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uid-start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dispatcher", default="", help=argparse.SUPPRESS)
    p.add_argument("--app", default="", help=argparse.SUPPRESS)
    p.add_argument("--secret", default="", help=argparse.SUPPRESS)
    p.add_argument("--tls-ca", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)

    lock = one_run_at_a_time("another bench/connections.py run is in progress")
    if lock is None:
        return 2

    from services.launcher.cluster import ROOM_NICE, LocalCluster, Ports
    from services.launcher.procs import children
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
                    "tls": args.tls,
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
        base_mem = [pss_uss_kib(pid) for pid in room_pids]
        result["room_baseline_pss_kib_per_instance"] = round(sum(m[0] for m in base_mem) / max(1, len(base_mem)))
        result["room_baseline_uss_kib_per_instance"] = round(sum(m[1] for m in base_mem) / max(1, len(base_mem)))
        result["room_baseline_threads"] = _threads(room_pids[0]) if room_pids else 0
        n_workers = -(-n // PER_WORKER)
        per = -(-n // n_workers)
        if not args.inflight:
            args.inflight = max(200, min(1000, INFLIGHT_TOTAL // n_workers))
        for w in range(n_workers):
            count = min(per, n - w * per)
            # --secret=...: a base64url secret may start with "-", which argparse would take for an option
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--uid-start", str(w * per), "--count", str(count),
                 "--dispatcher", cluster.dispatcher_url, "--app", app["id"], f"--secret={app['secret']}",
                 "--hold-s", str(args.hold_s), "--heartbeat-s", str(args.heartbeat_s),
                 "--inflight", str(args.inflight), "--connect-timeout-s", str(args.connect_timeout_s),
                 "--sources", str(args.sources), "--attempts", str(args.attempts),
                 *(["--tls-ca", cluster.tls_files.ca] if args.tls else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                # clients are many processes, like the room tier: same niceness, so neither starves
                # the lone register, saver and dispatcher (see ROOM_NICE in the launcher)
                preexec_fn=lambda: os.nice(ROOM_NICE)))
        connected: dict[int, dict] = {}
        done: dict[int, dict] = {}
        import selectors

        sel = selectors.DefaultSelector()
        for i, wp in enumerate(workers):
            sel.register(wp.stdout, selectors.EVENT_READ, (i, Lines(wp.stdout)))
        # The timed phase starts when every worker is ready: each one builds its uids' AUTH frames
        # (token, protobuf, header) first, which is the app server's job and not timed. Routing
        # through the dispatcher and everything after it is timed.
        ready: set[int] = set()
        ready_deadline = time.monotonic() + 600
        while len(ready) < len(workers) and time.monotonic() < ready_deadline:
            for key, _ in sel.select(timeout=1):
                i, lines = key.data
                for line in lines.read():
                    if json.loads(line).get("event") == "ready":
                        ready.add(i)
                if lines.eof:
                    raise RuntimeError(f"worker {i} exited before it was ready")
        if len(ready) < len(workers):
            raise RuntimeError(f"{len(workers) - len(ready)} workers not ready after 600 s")
        rpc0 = rpc_counts(cluster)
        cpu0 = {pid: cpu_s(pid) for pid in server_pids}
        room_ctx0 = sum(ctx_switches(pid) for pid in room_pids)
        client0 = [cpu_times(w.pid) for w in workers]
        machine0 = machine_busy_s()
        result["client_cpu_s_prep"] = round(sum(u + s for u, s in client0), 2)
        t0 = time.monotonic()
        for wp in workers:
            wp.stdin.write(b"go\n")
            wp.stdin.flush()
        full_at = None
        progress = Progress("connections")
        latest: dict[int, dict] = {}  # worker -> its last per-second line
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
                i, lines = key.data
                for line in lines.read():
                    msg = json.loads(line)
                    if msg.get("event") == "connected":
                        connected[i] = msg
                    elif msg.get("event") == "done":
                        done[i] = msg
                    elif "held" in msg and "event" not in msg:
                        latest[i] = msg  # per-second progress: only for the stderr line
                if lines.eof:
                    sel.unregister(key.fileobj)
                    done.setdefault(i, {"event": "exited"})
            phase = "connect" if full_at is None else ("hold" if hold_until is not None else "closing")
            progress.maybe(lambda phase=phase: f"{phase}: {held_text(latest.values(), n)}")
            if full_at is None and len(connected) == len(workers):
                full_at = time.monotonic()
                client_full = [cpu_times(w.pid) for w in workers]
                client_user = sum(c[0] - c0[0] for c, c0 in zip(client_full, client0, strict=True))
                client_sys = sum(c[1] - c0[1] for c, c0 in zip(client_full, client0, strict=True))
                cpu_full = ({pid: cpu_s(pid) for pid in server_pids}, client_user + client_sys)
                machine_full = machine_busy_s()
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
                # user = the load generator's Python; system = mostly the kernel's TCP work for
                # both ends of the loopback handshake, which runs in the connecting process
                result["client_cpu_s_connect_user"] = round(client_user, 2)
                result["client_cpu_s_connect_sys"] = round(client_sys, 2)
                result["client_cpu_us_per_connect"] = round(cpu_full[1] * 1e6 / max(1, held))
                result["server_cpu_us_per_connect"] = round(
                    (sum(cpu_full[0].values()) - sum(cpu0.values())) * 1e6 / max(1, held))
                # a room wakes up (and its caches are cold) about this often per connection
                result["room_wakeups_per_connect"] = round(
                    (sum(ctx_switches(pid) for pid in room_pids) - room_ctx0) / max(1, held), 2)
                # everything busy on the machine meanwhile (ksoftirqd, and anything else running)
                result["machine_cpu_s_connect"] = round(machine_full - machine0, 1)
                # internal calls per connect by method, with their mean latency (scraped after the
                # CPU reading: a scrape of every process costs a little CPU itself)
                stats = internal_stats(rpc0, rpc_counts(cluster), max(1, held))
                result["rpcs_per_connect"] = stats["rpcs_per_msg"]
                result["rpc_mean_ms"] = stats["rpc_mean_ms"]
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
        result["auth_sent_on_writable"] = sum(d.get("auth_on_writable", 0) for d in done.values())
        kinds: dict[str, int] = {}
        for d in done.values():
            for k, v in d.get("error_kinds", {}).items():
                kinds[k] = kinds.get(k, 0) + v
        result["server_error_kinds"] = kinds
        fails: dict[str, int] = {}
        for d in done.values():
            for k, v in d.get("fail_kinds", {}).items():
                fails[k] = fails.get(k, 0) + v
        result["failed_kinds"] = fails
        result["workers"] = len(workers)
        result["inflight_per_worker"] = args.inflight
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


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
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
                                          "pylon_room_closed_total{", "pylon_room_accept_wait_sampled_total{",
                                          "pylon_room_overdue_handshakes ")):
                        name, value = line.rsplit(" ", 1)
                        room_metrics[name] = room_metrics.get(name, 0) + int(float(value))
        except OSError:
            rooms_say[info["id"]] = -1
    return {"instance_set_members": in_sets, "user_hash_fields": in_hashes, "room_metrics": room_metrics,
            "by_instance": {k: [by_instance.get(k, 0), rooms_say.get(k)] for k in sorted(set(by_instance) | set(rooms_say))}}


if __name__ == "__main__":
    sys.exit(main())
