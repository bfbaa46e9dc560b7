"""A raw wire-protocol client for tests: exact frames in, exact frames out."""

from __future__ import annotations

import asyncio
import socket

from services.common.codec import ErrorCode, Frame, FrameDecoder, Op, encode
from services.common.pb import client_pb2 as cpb

BODY = {Op.AUTH_OK: cpb.AuthOk, Op.PONG: cpb.Pong, Op.PUSH: cpb.Push, Op.UPSTREAM_ACK: cpb.UpstreamAck,
        Op.KICK: cpb.Kick, Op.COMMAND: cpb.Command, Op.ERROR: cpb.Error}


class WireClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(max_frame=1 << 24)
        self.frames: list[Frame] = []
        self.seq = 0

    @classmethod
    async def connect(cls, host: str, port: int, rcvbuf: int = 0) -> WireClient:
        if not rcvbuf:
            return cls(*await asyncio.open_connection(host, port))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return cls(*await asyncio.open_connection(sock=sock))

    def send(self, op: int, msg=None, seq: int | None = None) -> int:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.writer.write(encode(op, msg.SerializeToString() if msg is not None else b"", seq))
        return seq

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> tuple[Frame, object]:
        """Next frame and its decoded body; raises EOFError when the server closed."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("server closed the connection")
            self.frames += self.decoder.feed(data)
        f = self.frames.pop(0)
        cls = BODY.get(f.op)
        return f, (cls.FromString(f.body) if cls else None)

    async def expect(self, op: int, timeout: float = 5.0):
        f, body = await self.recv(timeout)
        assert f.op == op, f"expected {Op(op).name}, got {Op(f.op).name}: {body}"
        return f, body

    async def auth(self, token: str, uid: str, **kw) -> cpb.AuthOk:
        self.send(Op.AUTH, cpb.Auth(token=token, uid=uid, **kw))
        _, ok = await self.expect(Op.AUTH_OK)
        return ok

    async def expect_error(self, code: ErrorCode, timeout: float = 5.0) -> cpb.Error:
        _, err = await self.expect(Op.ERROR, timeout)
        assert err.code == code, f"expected {code.name}, got {ErrorCode(err.code).name}: {err.message}"
        return err

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (reads to EOF, dropping frames)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass
