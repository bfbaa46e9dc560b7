"""One TCP connection: frames in through the shared codec, frames out through a bounded queue.

No protocol decisions here (that is ``client``); this only moves bytes and enforces the bounds.
"""

from __future__ import annotations

import asyncio
import collections
import ssl

from pylon_sdk.errors import FrameTooLarge, NotConnected, SendQueueFull
from pylon_sdk.routing import Address
from services.common import codec

READ_CHUNK = 64 * 1024
_SEQ_MAX = 0xFFFFFFFF


class Link:
    __slots__ = ("address", "tls", "max_frame", "max_queued", "_reader", "_writer", "_decoder", "_out", "_has_out",
                 "_inbox", "_seq", "closed")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: Address,
                 max_frame: int = codec.DEFAULT_MAX_FRAME, max_queued: int = 1024, tls: bool = False) -> None:
        self.address = address
        self.tls = tls  # the bytes travel over TLS (the room's certificate verified)
        self.max_frame = max_frame
        self.max_queued = max_queued
        self._reader = reader
        self._writer = writer
        self._decoder = codec.FrameDecoder(max_frame)
        self._out: collections.deque[bytes] = collections.deque()
        self._has_out = asyncio.Event()
        self._inbox: collections.deque[codec.Frame] = collections.deque()
        self._seq = 0
        self.closed = False

    @classmethod
    async def open(cls, address: Address, timeout_s: float, max_queued: int = 1024,
                   tls: ssl.SSLContext | None = None, server_name: str | None = None) -> Link:
        """Connect; with ``tls`` and an address that offers a TLS port, over TLS to that port, the
        room's certificate verified by ``tls`` for ``server_name`` (default: the address's host).
        ``ssl.SSLCertVerificationError`` when it does not verify."""
        if tls is not None and address.tls_port:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                address.host, address.tls_port, ssl=tls, server_hostname=server_name or address.host,
                ssl_handshake_timeout=timeout_s), timeout_s)
            return cls(reader, writer, address, max_queued=max_queued, tls=True)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
        return cls(reader, writer, address, max_queued=max_queued)

    def set_max_frame(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._decoder.max_frame = max_frame

    def next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < _SEQ_MAX else 1  # 0 means "no reply expected"
        return self._seq

    def check_size(self, body_len: int) -> None:
        size = codec.HEADER_SIZE + body_len
        if size > self.max_frame:
            raise FrameTooLarge(size, self.max_frame)

    def send(self, op: int, body: bytes = b"", seq: int = 0, control: bool = False) -> None:
        """Queue one frame. Control frames (ACK, PING) get headroom beyond the limit for data
        frames, so a full queue of upstream data never starves heartbeats and acks."""
        if self.closed:
            raise NotConnected("connection closed")
        self.check_size(len(body))
        limit = self.max_queued * 2 if control else self.max_queued
        if len(self._out) >= limit:
            raise SendQueueFull(f"{len(self._out)} frames waiting to be written (limit {limit})")
        self._out.append(codec.encode(op, body, seq))
        self._has_out.set()

    async def write_loop(self) -> None:
        """Write queued frames until the connection fails (raises) or is closed (returns)."""
        while not self.closed:
            await self._has_out.wait()
            self._has_out.clear()
            if self._out:
                chunk = b"".join(self._out)
                self._out.clear()
                self._writer.write(chunk)
                await self._writer.drain()

    async def recv(self) -> codec.Frame | None:
        """The next frame, None at EOF. ``codec.FrameError`` if the server sends something unframeable.

        One read may carry several frames (AUTH_OK and the first PUSH often arrive together);
        the extra ones wait in ``_inbox``, which is bounded by what one read can hold.
        """
        while not self._inbox:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                return None
            self._inbox.extend(self._decoder.feed(data))
        return self._inbox.popleft()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._has_out.set()
        try:
            self._writer.close()
        except RuntimeError:  # the loop is already closed: nothing left to release
            pass
