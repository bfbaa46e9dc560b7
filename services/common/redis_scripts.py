"""Batches of Redis commands in one round trip, and Lua scripts run by SHA inside them.

``run_pipeline`` is the hot path of register and saver (every AUTH, push and ack passes through
it), so it does not use redis-py's Pipeline: that one parses each reply under its own
``asyncio.timeout`` and looks up a response callback per command, which cost ~15 µs per
command, more than Redis itself spends. Here the commands are packed once, sent in one write,
and the replies are read back raw (HGETALL is a dict under RESP3, a flat list under RESP2) under
one deadline for the whole batch. Connections still come from the client's redis-py pool, which
connects, authenticates and replaces dead connections.

A pipeline is sent again in two cases only: after NOSCRIPT (Redis ran none of its scripts, and
the stores' other commands are idempotent), and when a pooled connection turns out to have been
closed by Redis before it read anything (see ``round_trip``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_TIMEOUT_S = 5.0


class Script:
    __slots__ = ("text", "sha")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def queue(self, pipe: Pipe, keys: list, args: list) -> None:
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class Pipe:
    """The commands of one round trip. Method names follow redis-py; replies are raw."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple] = []

    def execute_command(self, *args) -> None:
        self.commands.append(args)

    def hset(self, key, field, value) -> None:
        self.commands.append(("HSET", key, field, value))

    def hgetall(self, key) -> None:
        self.commands.append(("HGETALL", key))

    def hmget(self, key, fields) -> None:
        self.commands.append(("HMGET", key, *fields))

    def sadd(self, key, *members) -> None:
        self.commands.append(("SADD", key, *members))

    def srem(self, key, *members) -> None:
        self.commands.append(("SREM", key, *members))

    def zrange(self, key, start: int, end: int) -> None:
        self.commands.append(("ZRANGE", key, start, end))

    def zrem(self, key, *members) -> None:
        self.commands.append(("ZREM", key, *members))


def pack(commands: list[tuple]) -> bytes:
    """RESP-encode commands (bytes, str, int and float arguments) into one buffer."""
    out: list[bytes] = []
    append = out.append
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for a in args:
            t = type(a)
            if t is str:
                a = a.encode()
            elif t is int:
                a = b"%d" % a
            elif t is float:
                a = repr(a).encode()
            elif t is not bytes:  # subclasses: bool, enum members, bytearray ...
                if isinstance(a, int):
                    a = b"%d" % a
                elif isinstance(a, str):
                    a = str(a).encode()
                elif isinstance(a, (bytes, bytearray, memoryview)):
                    a = bytes(a)
                else:
                    raise TypeError(f"cannot send a {t.__name__} to Redis")
            append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


async def round_trip(redis, commands: list[tuple], timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Send ``commands`` in one write and read every reply; an error reply is returned in place
    (a ResponseError instance), a connection problem raises redis's ConnectionError/TimeoutError
    and the connection is dropped (its stream may be mid-reply).

    A pooled connection that Redis closed while it sat idle (a restart, ``CLIENT KILL``, its
    ``timeout`` setting, a proxy) is not always noticed by the pool: the first batch sent on it
    reads "Connection closed by server". When that happens before any reply was read, the batch
    goes once more on a fresh connection; Redis closed the connection before it read the batch."""
    packed = pack(commands)
    pool = redis.connection_pool
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for attempt in (0, 1):
        conn = await pool.get_connection()
        replies: list = []
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await conn.send_packed_command(packed, check_health=False)
                    read = conn.read_response
                    for _ in range(len(commands)):
                        try:
                            replies.append(await read(timeout=math.inf))
                        except ResponseError as exc:
                            replies.append(exc)
            except TimeoutError:
                raise RedisTimeoutError(f"Redis did not answer {len(commands)} commands within {timeout}s") from None
            return replies
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if attempt or replies or not isinstance(exc, RedisConnectionError):
                raise
        finally:
            await pool.release(conn)
    raise AssertionError("unreachable")


async def run_pipeline(redis, build: Callable[[Pipe], None], scripts: tuple[Script, ...] = (),
                       timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Build a batch with ``build(pipe)`` and run it in one round trip; raw replies in order.
    The first error reply raises (after every reply was read). NOSCRIPT loads ``scripts`` and
    runs the batch once more."""
    pipe = Pipe()
    build(pipe)
    if not pipe.commands:
        return []
    for attempt in (0, 1):
        replies = await round_trip(redis, pipe.commands, timeout)
        first = next((r for r in replies if isinstance(r, ResponseError)), None)
        if first is None:
            return replies
        if scripts and not attempt and any(isinstance(r, NoScriptError) for r in replies):
            for s in scripts:
                await redis.script_load(s.text)
            continue
        raise first
    raise AssertionError("unreachable")
