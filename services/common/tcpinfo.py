"""Fields of Linux's ``struct tcp_info`` (``getsockopt(IPPROTO_TCP, TCP_INFO)``), read by offset.

For a socket in LISTEN the kernel reuses two fields: ``tcpi_unacked`` is the number of
connections waiting in the accept queue and ``tcpi_sacked`` the backlog.
"""

from __future__ import annotations

import socket
import struct

STATE = 0              # u8: 1 = ESTABLISHED
UNACKED = 24           # u32: segments sent and not acknowledged; LISTEN: accept-queue length
LAST_DATA_RECV = 52    # u32: ms since data last arrived (since the connection completed, if none)
_SIZE = 104            # the struct's stable prefix (Linux 2.6+): every field above is in it
_U32 = struct.Struct("I")


def read(sock, offset: int) -> int:
    """One field of ``sock``'s tcp_info: the u8 state at 0, a u32 elsewhere. OSError if unavailable."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _SIZE)
    return raw[0] if offset == STATE else _U32.unpack_from(raw, offset)[0]
