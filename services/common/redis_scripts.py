"""Lua scripts run by SHA inside pipelines, reloaded when Redis forgot them (after a restart).

Every command the stores pipeline is idempotent, so replaying a pipeline after NOSCRIPT is
harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from redis.exceptions import NoScriptError


class Script:
    __slots__ = ("text", "sha")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def queue(self, pipe, keys: list, args: list) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def run_pipeline(redis, build: Callable[[object], None], scripts: tuple[Script, ...] = ()) -> list:
    """Build a non-transactional pipeline with ``build(pipe)`` and execute it (one round trip)."""
    for attempt in (0, 1):
        pipe = redis.pipeline(transaction=False)
        build(pipe)
        try:
            return await pipe.execute()
        except NoScriptError:
            if attempt or not scripts:
                raise
            for s in scripts:
                await redis.script_load(s.text)
    raise AssertionError("unreachable")
