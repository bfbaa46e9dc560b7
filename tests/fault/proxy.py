"""A TCP proxy for fault tests: forwards loopback connections and can cut them all at once.

One background thread runs an asyncio loop that serves every proxy of a test system. A proxy
listens on ``listen`` and forwards each accepted connection to ``target``. ``cut()`` aborts every
proxied connection at once (both sides see a reset), like a NAT or load balancer that dropped
its state. ``cut(blackhole_s)`` also black-holes the path for that long: connections accepted
meanwhile are held open without a byte forwarded (the peer sees a hang, not a refusal) and
aborted when the black hole ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

READ_CHUNK = 65_536


class ProxyLoop:
    """The event loop thread that every ``TcpProxy`` of a system runs on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout_s: float = 10.0):
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout_s)

    def close(self) -> None:
        if self.loop.is_running():
            try:
                self.call(_cancel_all(), 5)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


async def _cancel_all() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Pair:
    __slots__ = ("client", "upstream", "tasks", "peer")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task] = []
        self.peer: tuple[str, int] = client.get_extra_info("peername")[:2]

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


class TcpProxy:
    def __init__(self, loop: ProxyLoop, name: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.name = name
        self.listen = listen
        self.target = target
        self._loop = loop
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[_Pair] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._blackhole_until = 0.0
        self._blackhole_only: Callable[[tuple[str, int]], bool] | None = None
        self.accepted = 0
        self.upstream_failures = 0
        self.cuts = 0
        self.aborted = 0

    # ---------------------------------------------------------------- called from the test thread

    def start(self) -> TcpProxy:
        self._loop.call(self._start())
        return self

    def cut(self, blackhole_s: float = 0.0, only: Callable[[tuple[str, int]], bool] | None = None) -> int:
        """Abort every proxied connection now; black-hole new ones for ``blackhole_s``. With
        ``only``, just the connections whose peer (host, port) it accepts, during the black hole
        too. Returns how many connections were cut."""
        return self._loop.call(self._cut(blackhole_s, only), 60 if only is not None else 10)

    def stop(self) -> None:
        self._loop.call(self._stop())

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def stats(self) -> dict:
        return {"accepted": self.accepted, "open": len(self._pairs), "cuts": self.cuts, "aborted": self.aborted,
                "upstream_failures": self.upstream_failures}

    # ---------------------------------------------------------------- on the proxy loop

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], reuse_address=True,
                                                  backlog=1024)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._cut(0.0)

    async def _cut(self, blackhole_s: float, only: Callable[[tuple[str, int]], bool] | None = None) -> int:
        if blackhole_s > 0:
            self._blackhole_until = time.monotonic() + blackhole_s
            self._blackhole_only = only
            asyncio.get_running_loop().call_later(blackhole_s, self._end_blackhole)
        pairs = list(self._pairs)
        if only is not None:  # it may read /proc or run ss: off the loop, which keeps forwarding meanwhile
            chosen = await asyncio.get_running_loop().run_in_executor(None, lambda: [only(p.peer) for p in pairs])
            pairs = [p for p, yes in zip(pairs, chosen, strict=True) if yes]
        self._pairs.difference_update(pairs)
        for p in pairs:
            p.abort()
        self.cuts += 1
        self.aborted += len(pairs)
        return len(pairs)

    def _end_blackhole(self) -> None:
        if time.monotonic() + 0.001 < self._blackhole_until:
            return  # a later cut extended the black hole; its own timer ends it
        held = list(self._held)
        self._held.clear()
        for w in held:
            w.transport.abort()
        self.aborted += len(held)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        only = self._blackhole_only
        if time.monotonic() < self._blackhole_until:
            writer.transport.pause_reading()
            peer = writer.get_extra_info("peername")[:2]
            if only is None or await asyncio.get_running_loop().run_in_executor(None, only, peer):
                self._held.add(writer)
                if time.monotonic() >= self._blackhole_until:  # ended while we looked: drop it now
                    self._end_blackhole()
                return
            writer.transport.resume_reading()
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            self.upstream_failures += 1
            self._pairs.discard(pair)
            writer.transport.abort()
            return
        if pair not in self._pairs:  # cut while connecting
            up_writer.transport.abort()
            return
        pair.upstream = up_writer
        loop = asyncio.get_running_loop()
        pair.tasks = [loop.create_task(self._pump(reader, up_writer, pair)),
                      loop.create_task(self._pump(up_reader, writer, pair))]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair) -> None:
        try:
            while True:
                data = await src.read(READ_CHUNK)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # one side ended: end both, as a connection through a real middlebox would
            if pair in self._pairs:
                self._pairs.discard(pair)
                for w in (pair.client, pair.upstream):
                    if w is not None and not w.transport.is_closing():
                        w.close()
