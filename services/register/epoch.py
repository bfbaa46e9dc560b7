"""The register epoch: a random name for the generation of register's Redis data.

The epoch lives in one Redis key. While the key exists, every Register and Epoch reply carries
its value. When it is missing, the data it named is gone with it (FLUSHALL, a Redis without
persistence restarted, a failover to an empty replica): the first call that notices creates a
new epoch with ``SET NX`` (two registers racing agree on one), in the same pipeline as that
call's writes, so a Register batch written into an empty Redis is answered with the new epoch.
Rooms that see an epoch other than the last one they saw register all of their sessions again.
"""

from __future__ import annotations

import logging
import secrets

from services.register import keys
from services.register import metrics as m

log = logging.getLogger(__name__)


def new_epoch() -> str:
    # 64 random bits: two generations never collide, and it is short enough to log
    return secrets.token_hex(8)


class EpochTracker:
    """Queues the epoch commands at the end of a pipeline and reads their replies; remembers
    the epoch last seen, to count and log changes."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = ""

    @staticmethod
    def queue(pipe) -> None:
        """Two commands: create the epoch if it is missing, then read it."""
        pipe.execute_command("SET", keys.EPOCH_KEY, new_epoch(), "NX")
        pipe.execute_command("GET", keys.EPOCH_KEY)

    def observe(self, set_reply, get_reply) -> str:
        """The epoch from the replies of ``queue``'s two commands ("" if the key vanished
        between them: the caller asks again)."""
        if get_reply is None:
            return ""
        epoch = get_reply.decode() if isinstance(get_reply, bytes) else str(get_reply)
        if set_reply is not None:  # SET NX answers OK when it wrote, nil when the key existed
            m.EPOCHS_STARTED.inc()
            log.warning("register started a new epoch %s: Redis held no epoch (first start, or its data was lost); "
                        "rooms will register their sessions again", epoch)
        if epoch != self.current:
            if self.current:
                m.EPOCH_CHANGES.inc()
                log.warning("register epoch changed from %s to %s", self.current, epoch)
            m.EPOCH_INFO.clear()
            m.EPOCH_INFO.labels(epoch).set(1)
            self.current = epoch
        return epoch
